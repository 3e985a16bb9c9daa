"""An inference-only twin of ESPNet: batch norms folded, channels-last, no subnormal numbers.

What makes plain eager ESPNet slow on a CPU, largest first (p2q8, 1024×512, 2 cores):

* subnormal numbers.  Weight decay drove the weights of dead channels in the authors' released
  files smoothly towards zero, down into float32's subnormal range (below 1.2e-38).  Products with
  them are subnormal, and an x86 core takes a micro-code assist for each subnormal operand or
  result: the released p2q8 file runs ten times slower in eager mode than the same network with
  random weights.  ``torch.set_flush_denormal(True)`` helps only the calling thread (OpenMP
  workers started earlier keep their own setting).  The twin stores every parameter below 1e-20
  in magnitude as 0, which no float32 output can show;
* fresh memory.  A frame allocates ~150 MB of feature maps; glibc hands large freed blocks back to
  the kernel and their pages fault (and are zeroed) again on the next frame: 45 ms of system time
  per frame here.  :func:`.runtime.retain_freed_memory` keeps them in the process;
* memory passes over the feature maps (batch norms, concatenations, hierarchical sums, residual
  adds, PReLUs), and the convolutions themselves (4.7 G multiply-adds per frame).

The twin folds every batch norm that follows a convolution or deconvolution into its weights and
bias (the decoder's norms before a concatenation go into the layer that produces each half),
splits the decoder's last convolution so that its input is never concatenated, does the
hierarchical sums in place, pools the input with a depthwise convolution, and runs channels-last
(NHWC), which oneDNN prefers on CPU and cuDNN on tensor-core GPUs.

The batch norm *inside* an ESP module is not folded.  It acts on ``residual + concat(o_1, o_2,
o_2+o_4, o_2+o_4+o_8, …)``: the partial sums are shared between channel groups, so group ``k``'s
scale cannot enter branch ``k``'s weights.  A recurrence ``y_k = (s_k/s_{k-1})·y_{k-1} + …`` would
allow it, but every module of every released file has dead channels with scales near 1e-40, where
those ratios overflow.  It stays one multiply-add pass, and ``compile=True`` (``torch.compile``
with frozen weights) fuses it with the concatenation, residual and PReLU into one loop.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .espnet import DILATIONS, ESPModule, ESPNet, ESPNetC, StridedESPModule, Upsampled
from .runtime import retain_freed_memory

# Parameters smaller than this in magnitude are stored as 0 (see _stored).
NEGLIGIBLE = 1e-20
# A compiled model must agree with the uncompiled twin this closely (max |diff| / max |logit|).
COMPILE_TOLERANCE = 1e-5


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as ``scale·x + shift``, computed in float64 so that folding adds no
    rounding of its own."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("a batch norm without running statistics normalises by each batch: it cannot be folded")
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    weight = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale


def _channel(t: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over NCHW."""
    return _stored(t.reshape(1, -1, 1, 1))


def _stored(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy with every value below ``NEGLIGIBLE`` (1e-20) in magnitude set to zero.

    Why: weight decay drove the weights of dead channels in the released checkpoints towards zero,
    smoothly, down into float32's subnormal range: of the p2q8 file's 368,341 values 18,302 are
    subnormal and 5,063 more lie between 1.2e-38 and 1e-20 (tiny enough that their products with
    small activations are subnormal).  x86 cores take a micro-code assist for every subnormal
    operand or result: the released p2q8 file runs ten times slower in plain eager mode than the
    same network with random weights.  Zeroing them cannot show: a zeroed weight changes a sum by
    at most 1e-20 times its input, which float32 (7 digits) cannot see next to any term above 1e-13.
    """
    t = t.detach().to(torch.float32).clone()
    return t.masked_fill_(t.abs() < NEGLIGIBLE, 0.0)


def _check_plain(conv: nn.Conv2d | nn.ConvTranspose2d) -> None:
    """The fold keeps one stride, padding and dilation per layer: ESPNet's layers are all square,
    zero-padded and ungrouped; anything else is refused rather than silently mis-folded."""
    square = all(len(set(v)) == 1 for v in (conv.stride, conv.padding, conv.dilation))
    if conv.groups != 1 or conv.padding_mode != "zeros" or not square:
        raise ValueError(f"only ungrouped, zero-padded, square convolutions are folded, not {conv}")


class FoldedConv(nn.Module):
    """Convolution (or 2×2-stride-2 style deconvolution) with its batch norm folded into weight and
    bias, and an optional PReLU after it."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        alpha: torch.Tensor | None = None,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", _stored(weight))
        self.register_buffer("bias", None if bias is None else _stored(bias))
        self.register_buffer("alpha", None if alpha is None else _stored(alpha))
        self.stride, self.padding, self.dilation, self.transposed = stride, padding, dilation, transposed
        # A 1×1, stride-1, unpadded convolution: a matrix product over the channels.
        self.pointwise = not transposed and tuple(weight.shape[-2:]) == (1, 1) and stride == 1 and padding == 0

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, act: nn.PReLU | None = None) -> "FoldedConv":
        """``act(bn(conv(x)))`` as one convolution (plus PReLU)."""
        _check_plain(conv)
        weight = conv.weight.detach().double()
        bias = conv.bias.detach().double() if conv.bias is not None else None
        if bn is not None:
            scale, shift = bn_affine(bn)
            weight = weight * scale.reshape(-1, 1, 1, 1)
            bias = shift if bias is None else bias * scale + shift
        return cls(
            weight, bias, stride=conv.stride[0], padding=conv.padding[0], dilation=conv.dilation[0],
            alpha=None if act is None else act.weight,
        )

    @classmethod
    def from_deconv(
        cls,
        deconv: nn.ConvTranspose2d,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        act: nn.PReLU | None = None,
    ) -> "FoldedConv":
        """``act(scale·deconv(x) + shift)``; a deconvolution's weight is (in, out, k, k)."""
        _check_plain(deconv)
        if deconv.output_padding != (0, 0):
            raise ValueError("deconvolutions with output padding are not folded")
        weight = deconv.weight.detach().double()
        bias = deconv.bias.detach().double() if deconv.bias is not None else None
        if scale is not None:
            weight = weight * scale.reshape(1, -1, 1, 1)
            bias = shift if bias is None else bias * scale + shift
        return cls(
            weight, bias, stride=deconv.stride[0], padding=deconv.padding[0], dilation=deconv.dilation[0],
            alpha=None if act is None else act.weight, transposed=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            y = F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, 0, 1, self.dilation)
        elif self.pointwise and _onednn_pointwise(x):
            y = torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, [0, 0], [1, 1], [1, 1], 1)
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return y if self.alpha is None else F.prelu(y, self.alpha)


def _onednn_pointwise(x: torch.Tensor) -> bool:
    """Whether to run a 1×1 convolution on ``x`` through oneDNN directly.

    Why: PyTorch sends a 1×1 convolution of a batch under 16 on one thread to its own
    im2col-and-GEMM kernel ("THNN is faster when single-threaded", its comment says), which on this
    project's CPUs is 2-3.5× slower than oneDNN for ESPNet's shapes (e.g. (2, 128, 64, 64) → 25
    channels: 0.88 against 0.33 ms), and the pipeline's ``streams`` schedule runs every model call
    on one thread: 6 % of a 512² frame.  With more threads PyTorch takes oneDNN itself.  Not under
    ``torch.compile``, which picks its own kernels."""
    if torch.compiler.is_compiling():
        return False
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


def _affine_prelu_(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``prelu(scale·x + shift)``, the multiply-add in place: ``x`` must be a fresh map of the
    caller's own.  Under ``torch.compile`` out of place, which inductor fuses with the PReLU into one
    loop anyway (an ``out=`` write would break its graph)."""
    if torch.compiler.is_compiling():
        return F.prelu(torch.addcmul(shift, x, scale), alpha)
    return F.prelu(torch.addcmul(shift, x, scale, out=x), alpha)


class ConcatConv(nn.Module):
    """``conv(cat(parts))`` computed as ``conv_1(part_1) + conv_2(part_2) + …`` (then the PReLU).

    Why: the concatenation is a full copy of its inputs, and a wide one at the decoder's last
    resolution; split along its input channels, a convolution needs none, and under
    ``torch.compile`` each add becomes a post-op of the convolution before it.
    """

    def __init__(self, conv: FoldedConv, widths: list[int]) -> None:
        super().__init__()
        if conv.transposed or sum(widths) != conv.weight.shape[1]:
            raise ValueError(f"cannot split a {tuple(conv.weight.shape)} convolution into inputs of {widths}")
        weights = torch.split(conv.weight, widths, dim=1)
        self.parts = nn.ModuleList(
            FoldedConv(
                w, conv.bias if i == 0 else None, stride=conv.stride, padding=conv.padding, dilation=conv.dilation
            )
            for i, w in enumerate(weights)
        )
        self.register_buffer("alpha", conv.alpha)

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        if len(parts) != len(self.parts):
            raise ValueError(f"expected {len(self.parts)} inputs, got {len(parts)}")
        y = self.parts[0](parts[0])
        for conv, part in zip(self.parts[1:], parts[1:]):
            y = y.add_(conv(part))
        return y if self.alpha is None else F.prelu(y, self.alpha)


class CatAffinePReLU(nn.Module):
    """Concatenation, eval-mode batch norm, PReLU: the encoder's joins of activations, where there
    is no linear layer to fold the norm into.  The norm is applied in place to the fresh
    concatenation: at 1/4 size that map is 17 MB for two 512² tiles, and each pass over it that
    allocates a new one costs a cold write (~2.5 ms on one thread here)."""

    def __init__(self, bn: nn.BatchNorm2d, act: nn.PReLU) -> None:
        super().__init__()
        scale, shift = bn_affine(bn)
        self.register_buffer("scale", _channel(scale))
        self.register_buffer("shift", _channel(shift))
        self.register_buffer("alpha", _stored(act.weight))

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        return _affine_prelu_(torch.cat(parts, 1), self.shift, self.scale, self.alpha)


class FastESP(nn.Module):
    """An ESP module (plain or strided) with in-place hierarchical sums; its batch norm stays one
    multiply-add pass (why it cannot be folded: see the module's docstring)."""

    def __init__(self, esp: ESPModule) -> None:
        super().__init__()
        strided = isinstance(esp, StridedESPModule)
        bn, act = (esp.bn, esp.act) if strided else (esp.bn.bn, esp.bn.act)
        self.residual = bool(esp.residual)
        self.reduce = FoldedConv.from_conv(esp.c1.conv)
        self.branches = nn.ModuleList(FoldedConv.from_conv(getattr(esp, f"d{k}").conv) for k in DILATIONS)
        scale, shift = bn_affine(bn)
        self.register_buffer("scale", _channel(scale))
        self.register_buffer("shift", _channel(shift))
        self.register_buffer("alpha", _stored(act.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reduce(x)
        o = [branch(r) for branch in self.branches]
        for k in range(2, len(o)):  # hierarchical feature fusion, in place
            o[k].add_(o[k - 1])
        y = torch.cat(o, 1)
        if self.residual:
            y.add_(x)
        return _affine_prelu_(y, self.shift, self.scale, self.alpha)


class PoolAsConv(nn.Module):
    """A 3×3 stride-2 average pool (zero padding counted, as ``nn.AvgPool2d``'s default) written as a
    depthwise convolution with weights 1/9.

    Why: on channels-last input with 3 channels oneDNN's depthwise convolution is about six times
    faster than PyTorch's pooling kernel (0.6 against 4 ms at 1024×512), and under
    ``torch.compile`` a convolution stays one kernel instead of being inlined, window in window,
    into its consumers.  Results equal the pool's within float32 rounding.
    """

    def __init__(self, pool: nn.AvgPool2d, channels: int = 3) -> None:
        super().__init__()
        k, s, p = (_single(pool.kernel_size), _single(pool.stride), _single(pool.padding))
        if not pool.count_include_pad or pool.ceil_mode or pool.divisor_override is not None:
            raise ValueError("only zero-padded average pools whose padding counts fold into a convolution")
        self.register_buffer("weight", torch.full((channels, 1, k, k), 1.0 / (k * k)))
        self.stride, self.padding, self.channels = s, p, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding, 1, self.channels)


def _single(v: int | tuple[int, ...]) -> int:
    if isinstance(v, int):
        return v
    if len(set(v)) != 1:
        raise ValueError(f"square pools only, not {v}")
    return int(v[0])


class FastEncoder(nn.Module):
    """ESPNet-C's features, folded.  ``classifier`` is the 1×1 conv to logits at 1/8 size."""

    def __init__(self, enc: ESPNetC) -> None:
        super().__init__()
        self.level1 = FoldedConv.from_conv(enc.level1.conv, enc.level1.bn, enc.level1.act)
        # sample2 pools sample1 once more (InputReinforcement(2) pools the image twice with the same
        # pool as InputReinforcement(1)): the twin reuses sample1 instead of pooling the image again
        pools = [*enc.sample1.pool, *enc.sample2.pool]
        if len(enc.sample1.pool) != 1 or len(enc.sample2.pool) != 2 or len({repr(p) for p in pools}) != 1:
            raise ValueError("input reinforcement with unexpected pools")
        self.pool = PoolAsConv(enc.sample1.pool[0])
        self.b1 = CatAffinePReLU(enc.b1.bn, enc.b1.act)
        self.level2_0 = FastESP(enc.level2_0)
        self.level2 = nn.ModuleList(FastESP(m) for m in enc.level2)
        self.b2 = CatAffinePReLU(enc.b2.bn, enc.b2.act)
        self.level3_0 = FastESP(enc.level3_0)
        self.level3 = nn.ModuleList(FastESP(m) for m in enc.level3)
        self.b3 = CatAffinePReLU(enc.b3.bn, enc.b3.act)
        self.classifier = FoldedConv.from_conv(enc.classifier.conv)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(level1, level1 reinforced, level2 reinforced, level3): as ESPNetC.features."""
        level1 = self.level1(x)
        sample1 = self.pool(x)
        sample2 = self.pool(sample1)
        level1_cat = self.b1(level1, sample1)
        level2_0 = self.level2_0(level1_cat)
        level2 = level2_0
        for m in self.level2:
            level2 = m(level2)
        level2_cat = self.b2(level2, level2_0, sample2)
        level3_0 = self.level3_0(level2_cat)
        level3 = level3_0
        for m in self.level3:
            level3 = m(level3)
        return level1, level1_cat, level2_cat, self.b3(level3_0, level3)


def _as_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class FastESPNetC(nn.Module):
    """Folded ESPNet-C returning logits at input size (bilinear ×8), like :class:`Upsampled`."""

    def __init__(self, enc: ESPNetC, channels_last: bool = True) -> None:
        super().__init__()
        self.encoder = FastEncoder(enc)
        self.classes = enc.classes
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.encoder.classifier(self.encoder.features(_as_layout(x, self.channels_last))[3])
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class FastESPNet(nn.Module):
    """Folded ESPNet: same inputs, same logits (within float32 rounding) as :class:`ESPNet`."""

    def __init__(self, net: ESPNet, channels_last: bool = True) -> None:
        super().__init__()
        self.encoder = FastEncoder(net.encoder)
        self.classes, self.skip, self.channels_last = net.classes, net.skip, channels_last
        c = net.classes
        # br follows the encoder's classifier directly: fold it into that 1×1 conv.
        self.classifier_l3 = FoldedConv.from_conv(net.encoder.classifier.conv, net.br)
        # combine_l2_l3 = BN+PReLU over cat([l2, l3]): each half's BN goes into its producer.
        scale, shift = bn_affine(net.combine_l2_l3[0].bn)
        self.level3_C = _fold_conv_affine(net.level3_C.conv, scale[:c], shift[:c])
        self.up_l3 = FoldedConv.from_deconv(net.up_l3[0], scale[c:], shift[c:])
        self.register_buffer("combine_alpha", _stored(net.combine_l2_l3[0].act.weight))
        self.combine = FastESP(net.combine_l2_l3[1])
        up_scale, up_shift = bn_affine(net.up_l2[1].bn)
        self.up_l2 = FoldedConv.from_deconv(net.up_l2[0], up_scale, up_shift, net.up_l2[1].act)
        skip_width = net.conv.conv.in_channels - c
        self.conv = ConcatConv(FoldedConv.from_conv(net.conv.conv, net.conv.bn, net.conv.act), [c, skip_width])
        self.classifier = FoldedConv.from_deconv(net.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level1, level1_cat, level2, level3 = self.encoder.features(_as_layout(x, self.channels_last))
        l3 = self.up_l3(self.classifier_l3(level3))
        l2 = self.level3_C(level2)
        merged = self.up_l2(self.combine(F.prelu(torch.cat([l2, l3], 1), self.combine_alpha)))
        skip = level1 if self.skip == "level1" else level1_cat
        return self.classifier(self.conv(merged, skip))


def _fold_conv_affine(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> FoldedConv:
    """``scale·conv(x) + shift`` as one convolution."""
    weight = conv.weight.detach().double() * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias.detach().double() * scale + shift
    return FoldedConv(weight, bias, stride=conv.stride[0], padding=conv.padding[0], dilation=conv.dilation[0])


def fold(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """The folded twin of an :class:`ESPNet`, an :class:`ESPNetC` wrapped in :class:`Upsampled`, or a
    bare :class:`ESPNetC` (whose output stays at 1/8 size, as the module's own)."""
    if isinstance(model, ESPNet):
        return FastESPNet(model, channels_last)
    if isinstance(model, Upsampled):
        return FastESPNetC(model.encoder, channels_last)
    if isinstance(model, ESPNetC):
        return _BareFastESPNetC(model, channels_last)
    raise TypeError(f"optimize_for_inference takes an ESPNet, ESPNetC or Upsampled model, not {type(model).__name__}")


class _BareFastESPNetC(FastESPNetC):
    """ESPNet-C without the ×8 upsampling, as :class:`ESPNetC` returns it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.classifier(self.encoder.features(_as_layout(x, self.channels_last))[3])


class Compiled(nn.Module):
    """``torch.compile`` of the twin with frozen weights (inductor's ``freezing``: weights become
    constants, so convolutions get pre-packed oneDNN weights and fused adds, and each ESP module's
    concatenation, residual, batch norm and PReLU become one loop).

    Freezing only applies under inference mode and is an inductor setting read at compile time,
    so every call enters both; inputs are passed as ordinary (non-inference) tensors because the
    compiled graph is specialised on that too, and each new input shape compiles once more.
    """

    def __init__(self, fast: nn.Module) -> None:
        super().__init__()
        self.fast = fast
        self.compiled = torch.compile(fast, dynamic=False)
        for extra in ("config", "arch", "source", "meta"):
            if hasattr(fast, extra):
                setattr(self, extra, getattr(fast, extra))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        if x.is_inference():
            with torch.inference_mode(False):
                x = x.clone()  # an ordinary tensor: the graph was compiled for those
        with torch.inference_mode(), inductor_config.patch(freezing=True):
            return self.compiled(x)


def optimize_for_inference(
    model: nn.Module,
    example_shape: tuple[int, int, int, int] = (1, 3, 512, 1024),
    channels_last: bool = True,
    compile: bool = False,
    retain_memory: bool = False,
) -> nn.Module:
    """A module that computes the same logits as ``model`` (NCHW float32 normalised input, logits
    at input size) faster, for inference only (eval-mode semantics: batch norms use their running
    statistics).  ``model`` is not modified; the result lives on ``model``'s device and accepts every
    batch size and image size that ``model`` accepts.

    The output has the eager model's shape, dtype and values (within 1e-4 of ``max|logits|``; about
    2e-6 in practice) but may be channels-last in memory: call ``.contiguous()`` where NCHW strides
    matter.

    ``compile=True`` also wraps the twin in ``torch.compile`` with frozen weights, which fuses each
    ESP module's tail into one pass (it needs a C++ compiler on CPU, and each new input shape then
    compiles for tens of seconds).  The call compiles for ``example_shape`` and checks the compiled
    logits against the twin's (within 1e-5 of their range); if they disagree it warns and returns
    the uncompiled twin.  ``retain_memory=True`` also calls :func:`retain_freed_memory` (when the
    model is on the CPU): 20% faster frames, but a process-wide allocator setting that keeps freed
    memory for good, so a library call never makes it on its own; the command-line entry points
    make it for their process (:func:`.runtime.tune_for_inference`).
    """
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    fast: nn.Module = fold(model, channels_last).to(device).eval()
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    for extra in ("config", "arch", "source", "meta"):
        if hasattr(model, extra):
            setattr(fast, extra, getattr(model, extra))
    if retain_memory and device.type == "cpu":
        retain_freed_memory()
    if compile:
        compiled = Compiled(fast)
        # Compile now, not on the first real call, and check the result: inductor's frozen-weight
        # compilation of the *unfolded* model gives 20% errors on the released weights (their tiny
        # parameters), so a compiled model is only returned once it agrees with the twin.
        x = torch.randn(example_shape, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.inference_mode():
            diff = float((compiled(x) - fast(x)).abs().max() / fast(x).abs().max().clamp_min(1e-30))
        if not diff <= COMPILE_TOLERANCE:
            warnings.warn(
                f"torch.compile changed the logits by {diff:.1e} of their range: using the uncompiled model",
                RuntimeWarning, stacklevel=2,
            )
            return fast
        return compiled
    return fast
