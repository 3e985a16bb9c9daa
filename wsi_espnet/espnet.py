"""ESPNet and ESPNet-C (Mehta et al., "ESPNet: Efficient Spatial Pyramid of Dilated Convolutions
for Semantic Segmentation", ECCV 2018), one module per term of the paper.

Attribute names follow the authors' reference code (``level1``, ``b1``, ``level2_0``, ``level2``,
``c1``, ``d1`` … ``d16``, ``level3_C``, ``up_l3`` …) so that their released state dicts load as
they are; the class names are the paper's.
"""

from __future__ import annotations

import torch
from torch import nn

BN_EPS = 1e-3  # the authors' value; their checkpoints are calibrated with it
DILATIONS = (1, 2, 4, 8, 16)  # K = 5 parallel branches


class ConvBNPReLU(nn.Module):
    """k×k convolution, batch norm, PReLU: the paper's basic unit (``CBR`` in the reference code)."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride, (kernel - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(n_out, eps=BN_EPS)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class BNPReLU(nn.Module):
    """Batch norm then PReLU, applied after concatenations (``BR``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(n, eps=BN_EPS)
        self.act = nn.PReLU(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class Conv(nn.Module):
    """A bias-free convolution, wrapped so checkpoint keys read ``<name>.conv.weight``."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        pad = (kernel - 1) // 2 * dilation
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride, pad, dilation=dilation, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _branch_widths(n_out: int) -> tuple[int, int]:
    """Width d = N/K of each dilated branch; the first branch takes the remainder so the
    concatenation has exactly N channels (the paper's N = K·d, made to work for any N)."""
    d = n_out // len(DILATIONS)
    return d, n_out - (len(DILATIONS) - 1) * d


class ESPModule(nn.Module):
    """The efficient spatial pyramid: Reduce (1×1 conv to N/K channels), Split into K = 5 dilated
    3×3 convs (dilations 1, 2, 4, 8, 16), hierarchical feature fusion (each branch's output added to
    the sum of the smaller-dilation ones before concatenation, which removes the gridding artefacts
    of plain concatenation), a residual add, then BN + PReLU.

    ``residual=False`` is the decoder's use, where input and output widths differ.
    """

    def __init__(self, n_in: int, n_out: int, residual: bool = True) -> None:
        super().__init__()
        d, d1 = _branch_widths(n_out)
        self.c1 = Conv(n_in, d, 1)
        self.d1 = Conv(d, d1, 3, dilation=1)
        self.d2 = Conv(d, d, 3, dilation=2)
        self.d4 = Conv(d, d, 3, dilation=4)
        self.d8 = Conv(d, d, 3, dilation=8)
        self.d16 = Conv(d, d, 3, dilation=16)
        self.bn = BNPReLU(n_out)
        self.residual = residual

    def fuse(self, x: torch.Tensor) -> torch.Tensor:
        """Reduce, split, transform and hierarchically fuse; no residual, no normalisation."""
        r = self.c1(x)
        add1 = self.d2(r)
        add2 = add1 + self.d4(r)
        add3 = add2 + self.d8(r)
        add4 = add3 + self.d16(r)
        return torch.cat([self.d1(r), add1, add2, add3, add4], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fuse(x)
        if self.residual:
            y = x + y
        return self.bn(y)


class StridedESPModule(ESPModule):
    """The ESP module used for down-sampling: the reduce step is a strided 3×3 conv and there is no
    residual connection (shapes differ)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        nn.Module.__init__(self)
        d, d1 = _branch_widths(n_out)
        self.c1 = Conv(n_in, d, 3, stride=2)
        self.d1 = Conv(d, d1, 3, dilation=1)
        self.d2 = Conv(d, d, 3, dilation=2)
        self.d4 = Conv(d, d, 3, dilation=4)
        self.d8 = Conv(d, d, 3, dilation=8)
        self.d16 = Conv(d, d, 3, dilation=16)
        # The reference code keeps BN and PReLU as direct children here (keys level2_0.bn.weight).
        self.bn = nn.BatchNorm2d(n_out, eps=BN_EPS)
        self.act = nn.PReLU(n_out)
        self.residual = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.fuse(x)))


class InputReinforcement(nn.Module):
    """The input image average-pooled ``times`` times by 2, to be concatenated at that level: it
    re-injects the spatial detail the strided layers lose."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.pool = nn.ModuleList(nn.AvgPool2d(3, stride=2, padding=1) for _ in range(times))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for pool in self.pool:
            x = pool(x)
        return x


class ESPNetC(nn.Module):
    """The encoder: logits at 1/8 of the input size.  ``p`` and ``q`` are the number of ESP modules
    at 1/4 and 1/8 resolution."""

    def __init__(self, classes: int = 20, p: int = 2, q: int = 8) -> None:
        super().__init__()
        self.classes, self.p, self.q = classes, p, q
        self.level1 = ConvBNPReLU(3, 16, 3, stride=2)
        self.sample1 = InputReinforcement(1)
        self.sample2 = InputReinforcement(2)
        self.b1 = BNPReLU(16 + 3)
        self.level2_0 = StridedESPModule(16 + 3, 64)
        self.level2 = nn.ModuleList(ESPModule(64, 64) for _ in range(p))
        self.b2 = BNPReLU(128 + 3)
        self.level3_0 = StridedESPModule(128 + 3, 128)
        self.level3 = nn.ModuleList(ESPModule(128, 128) for _ in range(q))
        self.b3 = BNPReLU(256)
        self.classifier = Conv(256, classes, 1)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All the intermediate maps the decoder taps, named as in the paper's figure."""
        level1 = self.level1(x)
        level1_cat = self.b1(torch.cat([level1, self.sample1(x)], 1))
        level2_0 = self.level2_0(level1_cat)
        level2 = level2_0
        for m in self.level2:
            level2 = m(level2)
        level2_cat = self.b2(torch.cat([level2, level2_0, self.sample2(x)], 1))
        level3_0 = self.level3_0(level2_cat)
        level3 = level3_0
        for m in self.level3:
            level3 = m(level3)
        level3_cat = self.b3(torch.cat([level3_0, level3], 1))
        return {"level1": level1, "level1_reinforced": level1_cat, "level2": level2_cat, "level3": level3_cat}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)["level3"])


class ESPNet(nn.Module):
    """ESPNet-C plus the light decoder: the 1/8 logits are upsampled ×2 by deconvolution, fused
    with the 1/4 features projected to C channels through an ESP module, upsampled again, merged
    with the 1/2 features by a 3×3 conv, and upsampled to full size.

    ``skip`` picks the 1/2-resolution features the last conv sees: ``"level1"`` (16 channels, the
    authors' released Cityscapes files) or ``"level1_reinforced"`` (19 channels, with the half-size
    image; their CamVid file and their training code).
    """

    SKIP_WIDTH = {"level1": 16, "level1_reinforced": 19}

    def __init__(self, classes: int = 20, p: int = 2, q: int = 8, skip: str = "level1") -> None:
        super().__init__()
        if skip not in self.SKIP_WIDTH:
            raise ValueError(f"skip must be one of {sorted(self.SKIP_WIDTH)}, not {skip!r}")
        if classes < len(DILATIONS):  # the decoder's ESP module gives each dilated branch classes // 5 maps
            raise ValueError(f"ESPNet needs at least {len(DILATIONS)} classes, got {classes} (use ESPNetC)")
        self.classes, self.p, self.q, self.skip = classes, p, q, skip
        self.encoder = ESPNetC(classes, p, q)
        self.level3_C = Conv(128 + 3, classes, 1)
        self.br = nn.BatchNorm2d(classes, eps=BN_EPS)
        self.conv = ConvBNPReLU(self.SKIP_WIDTH[skip] + classes, classes, 3)
        self.up_l3 = nn.Sequential(nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False))
        self.combine_l2_l3 = nn.Sequential(BNPReLU(2 * classes), ESPModule(2 * classes, classes, residual=False))
        self.up_l2 = nn.Sequential(nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False), BNPReLU(classes))
        self.classifier = nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder.features(x)
        l3 = self.up_l3(self.br(self.encoder.classifier(f["level3"])))
        l2 = self.level3_C(f["level2"])
        merged = self.up_l2(self.combine_l2_l3(torch.cat([l2, l3], 1)))
        return self.classifier(self.conv(torch.cat([merged, f[self.skip]], 1)))


class Upsampled(nn.Module):
    """Wraps ESPNet-C so that, like ESPNet, it returns logits at input size (bilinear ×8, as the
    authors evaluate their encoder-only files)."""

    def __init__(self, encoder: ESPNetC) -> None:
        super().__init__()
        self.encoder = encoder
        self.classes = encoder.classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.encoder(x)
        return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_model(variant: str, classes: int, p: int = 2, q: int = 8, skip: str = "level1") -> nn.Module:
    """``variant``: ``"espnet"`` (full network) or ``"espnet_c"`` (encoder only)."""
    if variant == "espnet":
        return ESPNet(classes, p, q, skip)
    if variant == "espnet_c":
        return ESPNetC(classes, p, q)
    raise ValueError(f"unknown variant {variant!r}: expected 'espnet' or 'espnet_c'")


def count_parameters(model: nn.Module) -> int:
    return sum(t.numel() for t in model.parameters())
