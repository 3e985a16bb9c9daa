"""`wsi-espnet predict` end to end on real photographs with a released file."""

from pathlib import Path

import numpy as np
from skimage import data, io

from wsi_espnet.cli import main
from wsi_espnet.outputs import current_umask

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "espnet-pretrained/decoder/espnet_p_2_q_8.pth"


def test_predict_writes_labels_and_overlays(tmp_path, capsys):
    io.imsave(tmp_path / "coffee.jpg", data.coffee())
    io.imsave(tmp_path / "astro.png", data.astronaut())
    rc = main(["predict", str(tmp_path / "coffee.jpg"), str(tmp_path / "astro.png"), "--model", str(MODEL), "--out", str(tmp_path / "out")])
    assert rc == 0
    labels = io.imread(tmp_path / "out" / "coffee.labels.png")
    overlay = io.imread(tmp_path / "out" / "coffee.overlay.png")
    assert labels.shape == (400, 600) and labels.dtype == np.uint8 and labels.max() < 20
    assert overlay.shape == (400, 600, 3)
    assert len(np.unique(labels)) >= 2
    for name in ("coffee.labels.png", "coffee.overlay.png"):  # as readable as any file the user makes
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "astro.labels.png", "astro.overlay.png", "coffee.labels.png", "coffee.overlay.png"]  # no temporary left


def test_predict_native_size_not_a_multiple_of_8(tmp_path):
    img = data.astronaut()[:301, :203]
    io.imsave(tmp_path / "odd.png", img)
    assert main(["predict", str(tmp_path / "odd.png"), "--model", str(MODEL), "--out", str(tmp_path), "--native"]) == 0
    assert io.imread(tmp_path / "odd.labels.png").shape == (301, 203)


def test_predict_bad_inputs_one_line(tmp_path, capsys):
    (tmp_path / "text.png").write_text("hello")
    assert main(["predict", str(tmp_path / "text.png"), "--model", str(MODEL), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "o").exists()
    assert main(["predict", str(tmp_path / "missing.png"), "--model", str(MODEL), "--out", str(tmp_path / "o")]) == 2
    assert main(["predict", str(tmp_path / "text.png"), "--model", str(tmp_path / "nomodel.pt"), "--out", str(tmp_path / "o")]) == 2


def test_predict_keeps_earlier_results_unless_told_and_wants_a_folder(tmp_path, capsys):
    io.imsave(tmp_path / "a.png", data.astronaut()[:64, :96])
    cmd = ["predict", str(tmp_path / "a.png"), "--model", str(MODEL), "--native", "--out"]
    assert main([*cmd, str(tmp_path / "o")]) == 0
    first = (tmp_path / "o" / "a.labels.png").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*cmd, str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'o' / 'a.labels.png'} exists (and 1 more); pass --overwrite to replace"
    assert (tmp_path / "o" / "a.labels.png").stat().st_mtime_ns == first
    assert main([*cmd, str(tmp_path / "o"), "--overwrite"]) == 0
    assert main([*cmd, str(tmp_path / "a.png")]) == 2  # a file, not a folder: one line, never a traceback
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "is a file" in err and "\n" not in err


def test_the_engine_normalises_as_the_config_says_in_either_channel_order():
    """The engine's fused normalisation (one multiply-add along rows of pixels, the channels swapped
    for a BGR model) against the config's own recipe, at two widths (its row constants are kept
    per width) and batch sizes: what the network sees, read through an identity network."""
    import torch

    from wsi_espnet.checkpoint import DEFAULT_MODEL, load_model
    from wsi_espnet.engine import KEPT_WIDTHS, TorchEngine

    rng = np.random.default_rng(5)
    for path in (DEFAULT_MODEL, MODEL):  # RGB, then BGR with the authors' extra / 255
        engine = TorchEngine(load_model(path), device="cpu", optimize=False)
        engine.net = torch.nn.Identity()
        norm = engine.config.normalization
        for n, h, w in ((2, 16, 24), (1, 8, 40), (3, 16, 24)):
            batch = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
            got = engine.logits(batch).numpy()
            assert got.shape == (n, 3, h, w)
            np.testing.assert_allclose(got, norm.apply(batch).transpose(0, 3, 1, 2), rtol=1e-6, atol=1e-6)
            floats = batch.astype(np.float32)  # a caller's float array: read, never changed
            np.testing.assert_allclose(engine.logits(floats).numpy(), got, rtol=1e-6, atol=1e-6)
            assert np.array_equal(floats, batch)
    for w in range(8, 8 + 2 * KEPT_WIDTHS):  # images of many widths: the kept rows stay few, the values right
        batch = rng.integers(0, 256, (1, 2, w, 3), dtype=np.uint8)
        np.testing.assert_allclose(engine.logits(batch).numpy(), norm.apply(batch).transpose(0, 3, 1, 2),
                                   rtol=1e-6, atol=1e-6)
    assert len(engine._rows) <= KEPT_WIDTHS
