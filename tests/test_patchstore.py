"""`wsi-espnet tile`: real Zarr v3 stores from real slide files (the shared real slides and small
tiled TIFFs written here), their content and metadata, resume after an interruption, and every
kind of bad input through the command line."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from wsi_espnet.cli import main
from wsi_espnet.patchstore import open_patch_store, write_patch_store
from wsi_espnet.slide import open_slide
from wsi_espnet.tissue import TissueMask

REAL = Path(__file__).resolve().parents[2] / "shared" / "slides" / "real"
CMU = REAL / "CMU-1-Small-Region.svs"
REPO = Path(__file__).resolve().parents[1]


def write_tiff(path: Path, rgb: np.ndarray, mpp: float | None = 0.5, tile: int = 128) -> Path:
    """A tiled, JPEG-compressed TIFF with its pixel size in the resolution tags (OpenSlide: generic-tiff)."""
    kw = {}
    if mpp is not None:
        kw = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, rgb, tile=(tile, tile), compression="jpeg", photometric="rgb", **kw)
    return path


def tissue_image(h: int, w: int, seed: int = 0, margin: int = 5) -> np.ndarray:
    """Glass with a textured pink-and-purple rectangle of 'tissue' in the middle (1/margin from the edges)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 242, np.int16)
    img[h // margin : h - h // margin, w // margin : w - w // margin] = (215, 130, 180)
    img[h // 3 : h // 2, w // 3 : w // 2] = (120, 70, 150)
    img += rng.normal(0, 6, img.shape).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["tile", *map(str, args), "--quiet"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc: int, err: str, match: str) -> None:
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert match in errors[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def cmu_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmu") / "cmu.zarr"
    write_patch_store(CMU, out, mpp=1.0, tile=256, tissue_threshold=0.5, workers=2, progress=False)
    return out


def test_real_svs_tiles_at_1um_with_exact_patches_and_metadata(cmu_store):
    g = open_patch_store(cmu_store)
    n = g["patches"].shape[0]
    assert 5 <= n < 30  # the skin section covers about a third of the 5 x 6 grid
    assert g["patches"].shape[1:] == (256, 256, 3) and g["patches"].dtype == np.uint8
    assert g["coords"].shape == (n, 4) and g["done"][...].all()
    a = g.attrs
    assert a["complete"] is True and a["mpp"] == 1.0 and a["tile"] == 256 and a["overlap"] == 0
    assert a["tissue_threshold"] == 0.5
    assert a["source"]["sha256"] == hashlib.sha256(CMU.read_bytes()).hexdigest()
    assert a["source"]["level0_mpp"] == pytest.approx(0.499)
    assert a["source"]["vendor"] == "aperio"
    assert a["grid"]["n_rows"] * a["grid"]["n_cols"] == a["grid"]["n_positions"] == 30
    assert a["software"]["name"] == "wsi-espnet"
    assert not Path(str(cmu_store) + ".partial").exists()
    # Coordinates: level-0 box = working-resolution origin scaled by mpp / level0_mpp.
    xy, coords, tissue = g["xy"][...], g["coords"][...], g["tissue"][...]
    np.testing.assert_allclose(coords[:, :2], xy * (1.0 / 0.499), atol=0.51)
    np.testing.assert_allclose(coords[:, 2:], 256 / 0.499, atol=1.01)
    assert (tissue >= 0.5).all()
    # Pixels: exactly what the reader gives for that tile.
    with open_slide(CMU) as slide:
        for i in (0, n - 1):
            expected = slide.read_at_mpp(int(xy[i, 0]), int(xy[i, 1]), 256, 256, 1.0)
            assert np.array_equal(g["patches"][i], expected)


def test_workers_and_tissue_mask_reuse_give_the_same_store(cmu_store, tmp_path, capsys):
    mask_png = tmp_path / "mask.png"
    out = tmp_path / "again.zarr"
    rc, stdout, err = run_cli(capsys, CMU, "--out", out, "--tile", 256, "--workers", 1, "--save-tissue-mask", mask_png)
    assert rc == 0, err
    a, b = zarr.open_group(str(cmu_store), mode="r"), zarr.open_group(str(out), mode="r")
    assert np.array_equal(a["coords"][...], b["coords"][...])
    assert np.array_equal(a["patches"][...], b["patches"][...])
    mask = TissueMask.load_png(mask_png)
    assert mask.level0_size == (2220, 2967)
    # Reusing the saved mask reproduces the selection without detecting tissue again.
    out2 = tmp_path / "from_mask.zarr"
    rc, _, err = run_cli(capsys, CMU, "--out", out2, "--tile", 256, "--tissue-mask", mask_png)
    assert rc == 0, err
    c = zarr.open_group(str(out2), mode="r")
    assert np.array_equal(a["coords"][...], c["coords"][...])
    assert c.attrs["tissue"]["source"] == "file"


def test_existing_output_needs_overwrite(cmu_store, tmp_path, capsys):
    out = tmp_path / "o.zarr"
    small = write_tiff(tmp_path / "s.tif", tissue_image(300, 400))
    assert run_cli(capsys, small, "--out", out, "--tile", 128)[0] == 0
    first = zarr.open_group(str(out), mode="r").attrs["created"]
    rc, _, err = run_cli(capsys, small, "--out", out, "--tile", 128)
    assert_one_line_error(rc, err, "--overwrite")
    rc, _, err = run_cli(capsys, small, "--out", out, "--tile", 64, "--overwrite")
    assert rc == 0, err
    g = open_patch_store(out)
    assert g.attrs["tile"] == 64 and g["patches"].shape[1] == 64
    assert [p.name for p in tmp_path.iterdir() if "o.zarr" in p.name] == ["o.zarr"]  # no .partial, nothing aside
    del first
    # --overwrite replaces a store, never another folder a mistyped --out names (here the slides').
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "keep.svs").write_bytes(b"precious")
    rc, _, err = run_cli(capsys, small, "--out", slides, "--tile", 64, "--overwrite")
    assert_one_line_error(rc, err, "not a Zarr store")
    assert (slides / "keep.svs").read_bytes() == b"precious"
    # --save-tissue-mask is an output like the store: checked before anything is read.
    mask = tmp_path / "tissue.png"
    mask.write_bytes(b"an earlier mask")
    rc, _, err = run_cli(capsys, small, "--out", tmp_path / "p.zarr", "--tile", 64, "--save-tissue-mask", mask)
    assert_one_line_error(rc, err, "--overwrite")
    assert mask.read_bytes() == b"an earlier mask" and not (tmp_path / "p.zarr").exists()
    rc, _, err = run_cli(capsys, small, "--out", tmp_path / "p.zarr", "--tile", 64, "--save-tissue-mask",
                         tmp_path / "nowhere" / "t.png")
    assert_one_line_error(rc, err, "does not exist")


def test_overlap_grid_is_recorded(tmp_path):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(400, 600), mpp=1.0)
    out = write_patch_store(slide, tmp_path / "o.zarr", mpp=1.0, tile=128, overlap=32, tissue_threshold=0.0,
                            workers=2, progress=False)
    g = open_patch_store(out)
    assert g.attrs["grid"]["xs"] == [0, 96, 192, 288, 384, 472]
    assert g.attrs["grid"]["ys"] == [0, 96, 192, 272]
    assert g["patches"].shape[0] == 24  # threshold 0 keeps every position


def _interrupt_after(args: list[str], chunks: Path, patches: int) -> subprocess.Popen:
    """Run ``args`` and send SIGINT once ``patches`` patch chunks are on disk (or it ended)."""
    # PYTHONFAULTHANDLER: should the interrupted run ever hang, SIGABRT makes it print every
    # thread's stack, and the failure shows where.  SIGINT reset in the child: a disposition this
    # test process may have inherited (SIG_IGN) would otherwise pass on and make it deaf to Ctrl-C.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if sum(1 for _ in chunks.iterdir()) >= patches:
                break
        except OSError:  # not there yet
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    return proc


def test_interrupted_run_resumes_and_matches_a_fresh_run(tmp_path):
    # ~1,700 small patches resampled from 0.499 µm/px: a second or more of work, interrupted after
    # 10.  Should this process see them too late (the run already over: it happened in the full
    # suite now and then), the attempt is repeated on a fresh output, up to three times.
    for attempt in range(3):
        out = tmp_path / f"r{attempt}.zarr"
        partial = Path(str(out) + ".partial")
        args = [sys.executable, "-m", "wsi_espnet.cli", "tile", str(CMU), "--out", str(out), "--mpp-out", "1.0",
                "--tile", "32", "--tissue-threshold", "0", "--workers", "1", "--quiet"]
        proc = _interrupt_after(args, partial / "patches" / "c", 10)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate()
            pytest.fail(f"the interrupted run did not stop within 60 s:\n{err[-6000:]}")
        if proc.returncode != 0 or not out.exists():
            break
    assert proc.returncode == 130, err  # interrupted, not finished
    assert "re-run" in err
    assert partial.exists() and not out.exists()
    done_before = int(zarr.open_group(str(partial), mode="r")["done"][...].sum())
    total = zarr.open_group(str(partial), mode="r")["patches"].shape[0]
    assert 10 <= done_before < total
    # What a SIGKILL in the middle of a chunk write leaves: zarr's temporary file beside the chunk.
    chunk = next(p for p in (partial / "patches" / "c").rglob("*") if p.is_file())
    (chunk.parent / f"{chunk.name}.{'ab' * 16}.partial").write_bytes(b"cut short")

    write_patch_store(CMU, out, mpp=1.0, tile=32, tissue_threshold=0.0, workers=2, progress=False)
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]  # not carried into the store
    resumed = open_patch_store(out)
    assert resumed.attrs["run"]["patches_written"] == total - done_before
    assert not partial.exists()
    fresh_path = write_patch_store(CMU, tmp_path / "fresh.zarr", mpp=1.0, tile=32, tissue_threshold=0.0,
                                   workers=2, progress=False)
    fresh = open_patch_store(fresh_path)
    assert np.array_equal(resumed["patches"][...], fresh["patches"][...])
    assert np.array_equal(resumed["coords"][...], fresh["coords"][...])


def test_partial_with_other_settings_is_restarted(tmp_path):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(300, 400))
    out = tmp_path / "o.zarr"
    partial = Path(str(out) + ".partial")
    write_patch_store(slide, partial, mpp=1.0, tile=32, tissue_threshold=0.0, progress=False)  # a stale store
    write_patch_store(slide, out, mpp=1.0, tile=64, tissue_threshold=0.0, progress=False)
    g = open_patch_store(out)
    assert g["patches"].shape[1] == 64 and g.attrs["run"]["patches_written"] == g["patches"].shape[0]


# ------------------------------------------------------------------------------------------ bad input


def test_missing_path_directory_and_text_file(tmp_path, capsys):
    out = tmp_path / "o.zarr"
    rc, _, err = run_cli(capsys, tmp_path / "nope.svs", "--out", out)
    assert_one_line_error(rc, err, "no such file")
    rc, _, err = run_cli(capsys, tmp_path, "--out", out)
    assert_one_line_error(rc, err, "directory")
    fake = tmp_path / "fake.svs"
    fake.write_text("this is not a slide\n")
    rc, _, err = run_cli(capsys, fake, "--out", out)
    assert_one_line_error(rc, err, "fake.svs")
    assert not list(tmp_path.glob("o.zarr*"))
    rc, _, err = run_cli(capsys, fake, "--out", tmp_path / "new" / "deeper" / "o.zarr")
    assert_one_line_error(rc, err, "fake.svs")
    assert not (tmp_path / "new").exists()  # the folders it made for the store are gone again


def test_truncated_and_unreadable_slides_fail_cleanly(tmp_path, capsys):
    whole = write_tiff(tmp_path / "whole.tif", tissue_image(600, 800))
    data = whole.read_bytes()
    out = tmp_path / "o.zarr"
    # Cut inside the pixel data.
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    rc, _, err = run_cli(capsys, cut, "--out", out)
    assert_one_line_error(rc, err, "cut.tif")
    # A header cut short: not a slide at all.
    stub = tmp_path / "stub.svs"
    stub.write_bytes(data[:100])
    rc, _, err = run_cli(capsys, stub, "--out", out)
    assert_one_line_error(rc, err, "stub.svs")
    assert not list(tmp_path.glob("o.zarr*"))
    # A slide that opens and then fails in the middle of the run, in a worker (the tissue mask is
    # given, so the first failing read is a patch read): one line, nothing at the final path.
    unreadable = REAL.parent / "openslide-python-fixtures" / "unreadable.svs"
    mask_png = TissueMask(mask=np.ones((16, 16), bool), downsample=1.0, level0_size=(16, 16)).save_png(tmp_path / "m.png")
    rc, _, err = run_cli(capsys, unreadable, "--out", out, "--tile", 16, "--mpp-out", "0.499",
                         "--tissue-mask", mask_png, "--tissue-threshold", "0")
    assert_one_line_error(rc, err, "Bogus marker length")
    assert not list(tmp_path.glob("o.zarr*"))  # no patch was written: no .partial either


def test_slide_without_tissue_gives_an_empty_valid_store(tmp_path, capsys):
    rng = np.random.default_rng(0)
    blank = np.clip(rng.normal(243, 3, (500, 700, 3)), 0, 255).astype(np.uint8)
    slide = write_tiff(tmp_path / "blank.tif", blank)
    out = tmp_path / "o.zarr"
    rc, stdout, err = run_cli(capsys, slide, "--out", out, "--tile", 128)
    assert rc == 0, err
    assert "warning:" in err and "no tile" in err
    g = open_patch_store(out)
    assert g["patches"].shape == (0, 128, 128, 3) and g["coords"].shape == (0, 4)
    assert g.attrs["complete"] is True and g.attrs["n_patches"] == 0


def test_slide_smaller_than_one_tile_gives_one_padded_tile(tmp_path, capsys):
    small = tissue_image(150, 200, margin=10)  # 64 % tissue
    slide = write_tiff(tmp_path / "small.tif", small, mpp=1.0, tile=64)
    out = tmp_path / "o.zarr"
    rc, _, err = run_cli(capsys, slide, "--out", out, "--tile", 256)
    assert rc == 0, err
    g = open_patch_store(out)
    assert g["patches"].shape == (1, 256, 256, 3)
    patch = g["patches"][0]
    assert (patch[150:, :] == 255).all() and (patch[:, 200:] == 255).all()  # white padding
    assert np.abs(patch[:150, :200].astype(int) - small).mean() < 8  # JPEG-close to the slide
    assert g["coords"][0].tolist() == [0, 0, 256, 256]


def test_bad_arguments_and_missing_mpp(tmp_path, capsys):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(300, 400))
    nompp = write_tiff(tmp_path / "nompp.tif", tissue_image(300, 400), mpp=None)
    out = tmp_path / "o.zarr"
    for args, match in (
        (("--tile", 0), "tile size"),
        (("--tile", 64, "--overlap", 64), "overlap"),
        (("--tissue-threshold", 2), "threshold"),
        (("--mpp-out", -1), "µm/px"),
        (("--workers", 0), "workers"),
        (("--tissue-mask", tmp_path / "nomask.png"), "nomask.png"),
    ):
        rc, _, err = run_cli(capsys, slide, "--out", out, *args)
        assert_one_line_error(rc, err, match)
    rc, _, err = run_cli(capsys, nompp, "--out", out)
    assert_one_line_error(rc, err, "--mpp")
    assert not list(tmp_path.glob("o.zarr*"))
    rc, _, err = run_cli(capsys, nompp, "--out", out, "--mpp", "0.5", "--tile", 64)
    assert rc == 0, err
    assert open_patch_store(out).attrs["source"]["mpp_overridden"] is True


def test_real_slides_without_mpp_and_fluorescence_go_through(tmp_path, capsys):
    out = tmp_path / "tcga.zarr"
    rc, _, err = run_cli(capsys, REAL / "TCGA-CR-7395-01A-01-TS1.svs", "--out", out)
    assert_one_line_error(rc, err, "--mpp")
    rc, _, err = run_cli(capsys, REAL / "TCGA-CR-7395-01A-01-TS1.svs", "--out", out, "--mpp", "0.5",
                         "--mpp-out", "4", "--tile", 128)
    assert rc == 0, err
    assert open_patch_store(out)["patches"].shape[0] > 0
    out = tmp_path / "dapi.zarr"
    rc, _, err = run_cli(capsys, REAL / "test3-DAPI-2-387.ndpi", "--out", out, "--mpp-out", "4", "--tile", 64)
    assert rc == 0, err
    g = open_patch_store(out)
    assert g["patches"].shape[0] > 0 and g.attrs["tissue"]["mode"] == "fluorescence"


# ------------------------------------------------------------------------------------- demo slides


def test_demo_svs_patches_match_the_demo_content_and_truth(demo_svs, demo_spec, tmp_path):
    from wsi_espnet.demo import BACKGROUND

    out = write_patch_store(demo_svs, tmp_path / "demo.zarr", mpp=1.0, tile=256, tissue_threshold=0.5,
                            workers=2, progress=False)
    g = open_patch_store(out)
    xy, tissue = g["xy"][...], g["tissue"][...]
    n = len(xy)
    assert 0 < n <= g.attrs["grid"]["n_positions"] == 12  # 1024 x 768 at 1 µm/px in 256-px tiles
    assert g.attrs["source"]["vendor"] == "aperio" and g.attrs["source"]["level0_mpp"] == 0.5
    for i in range(n):
        x, y = int(xy[i, 0]), int(xy[i, 1])
        # Pixels: the demo slide's own content at 1 µm/px, up to JPEG and resampling.
        expected = demo_spec.rgb(x, y, 256, 256, 1.0).astype(int)
        assert np.abs(g["patches"][i].astype(int) - expected).mean() < 6
        # Tissue fraction: what the truth says for that patch, within the mask's coarseness.
        truth = (demo_spec.labels(x, y, 256, 256, 1.0) != BACKGROUND).mean()
        assert abs(float(tissue[i]) - truth) < 0.08
        assert truth >= 0.4


def test_tiny_and_empty_demo_slides(tiny_svs, empty_svs, tmp_path, capsys):
    out = tmp_path / "tiny.zarr"
    rc, _, err = run_cli(capsys, tiny_svs, "--out", out, "--tile", 256)  # 200 x 150 at 0.5 -> 100 x 75
    assert rc == 0, err
    g = open_patch_store(out)
    assert g["patches"].shape == (1, 256, 256, 3)
    assert (g["patches"][0][75:] == 255).all() and (g["patches"][0][:, 100:] == 255).all()
    assert "coarser" not in err
    # The same file taken as a 4 µm/px scan: patches at 1 µm/px upsample it 4x, and a line says so.
    rc, _, err = run_cli(capsys, tiny_svs, "--out", tmp_path / "coarse.zarr", "--tile", 256, "--mpp", 4)
    coarse = [line for line in err.splitlines() if "coarser" in line]
    assert rc == 0 and len(coarse) == 1 and coarse[0].startswith("warning:"), err
    assert "4x coarser than the patches' 1 µm/px: it is upsampled to 800x600 px" in coarse[0]
    out = tmp_path / "empty.zarr"
    rc, _, err = run_cli(capsys, empty_svs, "--out", out, "--tile", 256)
    assert rc == 0 and "warning:" in err
    assert open_patch_store(out)["patches"].shape[0] == 0


def test_a_store_being_written_is_not_written_by_a_second_run(tmp_path):
    from wsi_espnet.errors import UserError
    from wsi_espnet.outputs import exclusive_output

    slide = write_tiff(tmp_path / "s.tif", tissue_image(300, 400, seed=3))
    out = tmp_path / "o.zarr"
    with exclusive_output(out):  # the first run
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):  # refused before it reads anything
            write_patch_store(slide, out, mpp=1.0, tile=128, tissue_threshold=0.0, workers=1, progress=False,
                              save_tissue_mask=tmp_path / "tissue.png")
        assert not (tmp_path / "o.zarr.partial").exists() and not (tmp_path / "tissue.png").exists()
    write_patch_store(slide, out, mpp=1.0, tile=128, tissue_threshold=0.0, workers=1, progress=False)
    assert open_patch_store(out)["patches"].shape[0] > 0 and not (tmp_path / "o.zarr.lock").exists()
