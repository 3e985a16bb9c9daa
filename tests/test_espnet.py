"""The ESPNet core against the authors' released files: exact parameter counts, their reference
output, and a sane prediction from every released file on real photographs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data, io

import wsi_espnet
from wsi_espnet.espnet import ESPModule, ESPNet, ESPNetC, StridedESPModule, count_parameters
from wsi_espnet.predict import predict_image
from wsi_espnet.engine import TorchEngine

SHARED = Path(__file__).resolve().parents[2] / "shared"
PRETRAINED = SHARED / "espnet-pretrained"
RELEASED = sorted(PRETRAINED.glob("*/*.pth"))


@pytest.mark.parametrize(
    "model, expected",
    [
        (ESPNet(20, 2, 8), 364_569),
        (ESPNet(20, 2, 5), 267_417),
        (ESPNet(20, 2, 3), 202_649),
        (ESPNetC(20, 2, 8), 349_449),
        (ESPNet(12, 2, 8, skip="level1_reinforced"), 354_517),
    ],
)
def test_parameter_counts_match_the_paper_files(model, expected):
    assert count_parameters(model) == expected


def test_esp_module_shapes_and_hierarchical_fusion():
    m = ESPModule(64, 64).eval()
    x = torch.randn(2, 64, 16, 24)
    assert m(x).shape == x.shape
    # hierarchical feature fusion: the k-th dilated group is the running sum of branches 2..k
    r = m.c1(x)
    fused = m.fuse(x)
    d = 64 // 5
    n1 = 64 - 4 * d
    expected_last = m.d2(r) + m.d4(r) + m.d8(r) + m.d16(r)
    assert torch.allclose(fused[:, n1 + 3 * d :], expected_last, atol=1e-5)
    down = StridedESPModule(19, 64).eval()
    assert down(torch.randn(1, 19, 32, 32)).shape == (1, 64, 16, 16)


def test_every_released_file_is_present():
    assert len(RELEASED) == 7, f"expected the 7 released files in {PRETRAINED}"


@pytest.mark.parametrize("path", RELEASED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_released_file_loads_and_predicts_real_photographs(path):
    model = wsi_espnet.load_model(path)
    assert not model.training
    assert count_parameters(model) == {
        "espnet_p_2_q_3.pth": {"decoder": 202_649, "encoder": 187_529},
        "espnet_p_2_q_5.pth": {"decoder": 267_417, "encoder": 252_297},
        "espnet_p_2_q_8.pth": {"decoder": 364_569, "encoder": 349_449},
        "espnet_p_2_q_8_camvid.pth": {"decoder": 354_517},
    }[path.name][path.parent.name]
    engine = TorchEngine(model, device="cpu")
    for image in (data.astronaut(), data.coffee()):
        labels = predict_image(engine, image, size=model.config.input_size)
        assert labels.shape == image.shape[:2]
        counts = np.bincount(labels.ravel(), minlength=model.config.num_classes)
        # non-degenerate: several classes, none covering everything
        assert (counts > 0.01 * labels.size).sum() >= 2
        assert counts.max() < 0.95 * labels.size


def test_released_p2q8_reproduces_the_authors_argmax():
    """The authors' recipe: BGR, (x - mean) / std, bilinear resize to 1024×512, / 255."""
    ref = io.imread(PRETRAINED / "reference" / "espnet_p_2_q_8_astronaut.png")
    model = wsi_espnet.load_model(PRETRAINED / "decoder" / "espnet_p_2_q_8.pth")
    norm = model.config.normalization
    x = norm.apply(data.astronaut())  # HWC float32, BGR, mean/std and the extra /255
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    t = torch.nn.functional.interpolate(t, size=(512, 1024), mode="bilinear", align_corners=False)
    # The released file holds subnormal weights; flushing them (as the fast path does) only saves time.
    torch.set_flush_denormal(True)
    try:
        with torch.inference_mode():
            ours = model(t)[0].argmax(0).numpy()
    finally:
        torch.set_flush_denormal(False)
    assert ours.shape == ref.shape
    assert (ours == ref).mean() >= 0.999
    # and the engine/predict path (uint8 resize, fused normalisation) agrees just as well
    engine = TorchEngine(model, device="cpu")
    direct = predict_image(engine, np.asarray(
        torch.nn.functional.interpolate(torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float(),
                                        size=(512, 1024), mode="bilinear", align_corners=False)[0]
        .permute(1, 2, 0).numpy()))
    assert (direct == ref).mean() >= 0.999


def test_fewer_than_five_classes_is_refused_up_front_for_espnet_not_espnet_c():
    """The decoder's ESP module spreads the classes over 5 dilated branches: with 2 (tumour / other)
    each would get 0 maps and training would die after its whole encoder stage."""
    from wsi_espnet.config import config_from_dict
    from wsi_espnet.errors import UserError

    raw = {"name": "two", "classes": ["tumour", "other"]}
    with pytest.raises(UserError, match="needs at least 5 classes.*model.variant=espnet_c"):
        config_from_dict(raw)
    cfg = config_from_dict({**raw, "model": {"variant": "espnet_c"}})
    assert ESPNetC(cfg.num_classes)(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 8, 8)  # any number of classes
    with pytest.raises(ValueError, match="at least 5 classes"):
        ESPNet(3)
    with pytest.raises(UserError, match="train.encoder_epochs must be 0 or more"):
        config_from_dict({**raw, "model": {"variant": "espnet_c"}, "train": {"encoder_epochs": -1}})
