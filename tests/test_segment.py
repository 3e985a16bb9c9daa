"""`wsi-segment` end to end on real pyramidal files: outputs that open, resume after an interruption
to a byte-identical mask, and one clear line for every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import torch
import zarr

import wsi_espnet
from wsi_espnet import schedule as scheduling
from wsi_espnet.cli import main
from wsi_espnet.engine import TorchEngine
from wsi_espnet.errors import InputWarning, UserError
from wsi_espnet.mask_tiff import read_mask_info
from wsi_espnet.segment import SegmentOptions, segment_slide
from wsi_espnet.slide import open_slide

FAST = ["--tile", "256", "--overlap", "32", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A real (randomly initialised) ESPNet with the breast-biopsy classes; small p, q for speed."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "rand8.pt"
    return wsi_espnet.save_checkpoint(path, wsi_espnet.ESPNet(8, 2, 3), wsi_espnet.load_config("breast_biopsy"))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_segment_writes_every_output(tmp_path, demo_svs, small_model, capsys):
    import openslide

    out = tmp_path / "res" / "mask.tif"
    rc = main(["segment", str(demo_svs), "--out", str(out), "--model", str(small_model), *FAST,
               "--probs", str(tmp_path / "p.zarr"),
               "--overlay", str(tmp_path / "o.png")])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "tiles" in summary and "mm²" in summary
    mask = tifffile.imread(out)
    assert mask.shape == (768, 1024)  # 2048x1536 at 0.5 µm/px read at 1 µm/px
    assert mask.max() < 8
    with openslide.OpenSlide(str(out)) as osr:
        assert osr.dimensions == (1024, 768)
    probs = zarr.open_array(str(tmp_path / "p.zarr"), mode="r")
    assert probs.shape == (8, 768, 1024) and probs.dtype == np.float16
    p = np.asarray(probs[:, :256, :])
    tissue = p.sum(0) > 0.5  # background outside tissue tiles has no probabilities
    assert np.allclose(p.sum(0)[tissue], 1.0, atol=0.01)
    # float16 storage can only swap classes whose probabilities are within its rounding of each other
    top2 = np.sort(p.astype(np.float32), axis=0)[-2:]
    clear = tissue & (top2[1] - top2[0] > 2e-3)
    assert clear.mean() > 0.2
    assert (p.argmax(0)[clear] == mask[:256][clear]).all()
    assert (tmp_path / "o.png").stat().st_size > 1000
    assert not list(tmp_path.rglob("*.work")) and not list(tmp_path.rglob("*.partial"))
    # What made the mask travels with it (and with the probabilities): software, model by content, settings.
    from wsi_espnet.fileid import file_sha256
    from wsi_espnet.mask_tiff import read_mask_info

    made = read_mask_info(out).provenance
    assert made == {"software": f"wsi-espnet {wsi_espnet.__version__}", "model": "breast_biopsy",
                    "model-sha256": file_sha256(small_model), "device": "cpu", "slide": demo_svs.name,
                    "slide-size": "2048x1536", "slide-mpp": "0.5", "mpp": "1.0", "tile": "256", "overlap": "32",
                    "tissue-threshold": "0.05", "backend": "torch"}
    assert probs.attrs["provenance"] == made


class _Interrupting:
    """A real engine that stops the run (as Ctrl-C would) after ``n`` batches, and counts them.  It
    has the engine's threads, so the "auto" schedule is the engine's own."""

    def __init__(self, engine, n=-1):
        import threading

        self.engine, self.n, self.calls = engine, n, 0
        self.config = engine.config
        self.device = engine.device
        self.model_id = "same-model"
        self.cpu_threads = engine.cpu_threads
        self.threads_per_call = engine.threads_per_call
        self._lock = threading.Lock()  # calls come from two threads under "streams"

    def predict_proba(self, batch):
        with self._lock:
            if self.calls == self.n:
                raise KeyboardInterrupt
            self.calls += 1
        return self.engine.predict_proba(batch)


@pytest.mark.parametrize("batch,schedule", [(2, "auto"), (3, "auto"), (3, "beside"), (3, "between"), (2, "streams")])
def test_interrupted_run_resumes_to_a_byte_identical_mask(tmp_path, demo_svs, small_model, batch, schedule,
                                                          monkeypatch):
    """Batches run across bands; the resumed run starts mid-batch, runs the tiles of the band before
    in the same batch as the first run did, and blends only its own."""
    import wsi_espnet.segment as seg

    engine = TorchEngine(wsi_espnet.load_model(small_model), device="cpu")
    engine.model_id = "same-model"
    opts = dict(tile=256, overlap=32, batch=batch, progress=False, schedule=schedule)
    leads = []
    real_feed_batches = seg.feed_batches
    monkeypatch.setattr(seg, "feed_batches", lambda *a: leads.append(real_feed_batches(*a)[1]) or real_feed_batches(*a))
    ref = tmp_path / "ref" / "mask.tif"  # same name: the name is part of the OME metadata
    counting = _Interrupting(engine)
    ref_result = segment_slide(demo_svs, ref, options=SegmentOptions(**opts, probs=tmp_path / "ref" / "p.zarr"),
                               engine=counting)

    out = tmp_path / "mask.tif"
    with pytest.raises(KeyboardInterrupt):
        segment_slide(demo_svs, out, options=SegmentOptions(**opts, probs=tmp_path / "p.zarr"),
                      engine=_Interrupting(engine, counting.calls * 4 // 5))
    assert not out.exists() and not (tmp_path / "p.zarr").exists()  # nothing at the final paths
    progress = json.loads((tmp_path / "mask.tif.work" / "progress.json").read_text())
    assert progress["flushed_y"] > 0
    # What a SIGKILL in the middle of a chunk write leaves: zarr's temporary file beside the chunk.
    (tmp_path / "mask.tif.work" / "probs.zarr" / f"zarr.{'cd' * 16}.partial").write_bytes(b"{")
    result = segment_slide(demo_svs, out, options=SegmentOptions(**opts, probs=tmp_path / "p.zarr"), engine=engine)
    assert not list((tmp_path / "p.zarr").rglob("*.partial"))  # not carried into the output
    assert result.resumed_from_row > 0
    assert leads[0] == leads[1] == 0 and leads[2] > 0  # the resumed run started mid-batch
    assert out.read_bytes() == ref.read_bytes()
    assert read_mask_info(out).provenance["device"] == "cpu"  # one device, named once
    # the probabilities too: rows before the interruption kept, the rest recomputed, none lost
    probs, ref_probs = (zarr.open_array(str(d / "p.zarr"), mode="r") for d in (tmp_path, tmp_path / "ref"))
    np.testing.assert_array_equal(probs[:], ref_probs[:])
    assert (probs[:].sum(0) > 0.5).mean() > 0.3
    assert not (tmp_path / "mask.tif.work").exists()
    # class areas, counted as rows are flushed (and carried over the interruption), are the mask's
    mask = tifffile.imread(out)
    px_mm2 = (result.mpp / 1000) ** 2
    expected = np.bincount(mask.ravel(), minlength=8) * px_mm2
    assert result.class_mm2 == ref_result.class_mm2
    np.testing.assert_allclose([result.class_mm2[n] for n in engine.config.class_names], expected, rtol=1e-12)
    assert len(np.flatnonzero(expected)) > 1


def _open_label_files() -> list[str]:
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return []
    out = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if "labels.u8" in target:
            out.append(target)
    return out


@pytest.mark.parametrize("damage", ["cut short", "deleted, and the restart interrupted too"])
def test_a_lost_label_file_starts_the_rows_again(tmp_path, demo_svs, small_model, damage):
    """A work folder whose label file lost bytes (a full disk, a copy cut short) or vanished is not
    trusted: the re-run starts from the first row and still gives the uninterrupted run's mask, also
    when that restart is itself stopped before its first band (it must not leave the old progress
    pointing into a fresh, empty file).  No attempt leaves the label file open behind it."""
    engine = TorchEngine(wsi_espnet.load_model(small_model), device="cpu")
    engine.model_id = "same-model"
    opts = dict(tile=256, overlap=32, batch=2, progress=False)
    ref = tmp_path / "ref" / "mask.tif"
    counting = _Interrupting(engine)
    segment_slide(demo_svs, ref, options=SegmentOptions(**opts), engine=counting)
    out = tmp_path / "mask.tif"
    with pytest.raises(KeyboardInterrupt) as kept:  # kept, as a task framework keeps a failure
        segment_slide(demo_svs, out, options=SegmentOptions(**opts), engine=_Interrupting(engine, counting.calls // 2))
    assert kept.traceback and not _open_label_files()
    work = tmp_path / "mask.tif.work"
    progress = work / "progress.json"
    assert json.loads(progress.read_text())["flushed_y"] > 0
    labels = work / "labels.u8"
    if damage == "cut short":
        os.truncate(labels, labels.stat().st_size // 2)
    else:
        labels.unlink()
        with pytest.raises(KeyboardInterrupt):  # the restart, stopped at its first model call
            segment_slide(demo_svs, out, options=SegmentOptions(**opts), engine=_Interrupting(engine, 0))
        # That restart had done nothing yet: its work folder, old progress and all, went with it.
        assert not work.exists()
    result = segment_slide(demo_svs, out, options=SegmentOptions(**opts), engine=engine)
    assert result.resumed_from_row == 0
    assert out.read_bytes() == ref.read_bytes()
    assert not _open_label_files()


def test_a_run_resumed_on_another_device_names_both(tmp_path, demo_svs, small_model):
    """Half a slide from one device and half from another is what the provenance must say (an engine
    that reports another device name stands in for the GPU this machine may not have)."""
    engine = TorchEngine(wsi_espnet.load_model(small_model), device="cpu")
    out = tmp_path / "mask.tif"
    opts = SegmentOptions(tile=256, overlap=32, batch=2, progress=False)
    first = _Interrupting(engine, 6)
    first.device = "cuda:0"
    with pytest.raises(KeyboardInterrupt):
        segment_slide(demo_svs, out, options=opts, engine=first)
    result = segment_slide(demo_svs, out, options=opts, engine=_Interrupting(engine))
    assert result.resumed_from_row > 0
    assert read_mask_info(out).provenance["device"] == "cuda:0, cpu"


def test_killed_process_resumes(tmp_path, demo_svs, small_model):
    out = tmp_path / "mask.tif"
    cmd = [sys.executable, "-m", "wsi_espnet.cli", "segment", str(demo_svs), "--out", str(out), "--model",
           str(small_model), "--tile", "256", "--overlap", "32", "--batch", "1", "--quiet", "--device", "cpu"]
    ref = tmp_path / "ref" / "mask.tif"
    assert subprocess.run([*cmd[:6], str(ref), *cmd[7:]], capture_output=True).returncode == 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = tmp_path / "mask.tif.work" / "progress.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if progress.is_file() and json.loads(progress.read_text()).get("flushed_y", 0) > 0:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert (tmp_path / "mask.tif.lock").is_file()  # the killed run's lock file stays, its lock does not
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert out.read_bytes() == ref.read_bytes()
    assert not (tmp_path / "mask.tif.lock").exists()


def test_sigterm_stops_cleanly_and_says_how_to_resume(tmp_path, demo_svs, small_model):
    """A batch system's time limit sends SIGTERM: the run stops as on Ctrl-C (exit 143, one line),
    its locks go, nothing is at the final paths, and the same command finishes the job."""
    out = tmp_path / "mask.tif"
    cmd = [sys.executable, "-m", "wsi_espnet.cli", "segment", str(demo_svs), "--out", str(out), "--model",
           str(small_model), "--geojson", str(tmp_path / "g.geojson"), "--tile", "256", "--overlap", "32",
           "--batch", "1", "--quiet", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = tmp_path / "mask.tif.work" / "progress.json"
    deadline = time.time() + 60
    while time.time() < deadline and not (progress.is_file() and json.loads(progress.read_text()).get("flushed_y")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1] == "terminated: re-run the same command to resume"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tif.work"]  # no lock, no output
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.geojson", "mask.tif"]


def test_a_second_run_on_an_output_being_made_stops_at_once(tmp_path, demo_svs, small_model):
    """Two runs on one output would share its work folder: the second stops with one line naming the
    first's pid, touching nothing; once the first is done, the same command runs."""
    from wsi_espnet.outputs import exclusive_output

    out = tmp_path / "mask.tif"
    cmd = [sys.executable, "-m", "wsi_espnet.cli", "segment", str(demo_svs), "--out", str(out), "--model",
           str(small_model), *FAST]
    with exclusive_output(out):  # this process is the first run
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 75  # EX_TEMPFAIL: not a mistake, try again later
        assert proc.stderr.strip().splitlines() == [
            f"error: {out} is being made by another run (pid {os.getpid()}); let it finish, or stop it first"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tif.lock"]
    assert not (tmp_path / "mask.tif.lock").exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tif"]


def test_runs_on_different_masks_sharing_another_output_do_not_both_run(tmp_path, demo_svs, small_model):
    """Two masks, one --geojson (a loop over slides with a fixed name): the second run stops at once
    instead of racing the first to rename onto it; one path named for two outputs is refused."""
    from wsi_espnet.outputs import exclusive_output

    shared = tmp_path / "all.geojson"
    cmd = [sys.executable, "-m", "wsi_espnet.cli", "segment", str(demo_svs), "--out", str(tmp_path / "b.tif"),
           "--geojson", str(shared), "--model", str(small_model), *FAST]
    with exclusive_output(shared):  # a run making a.tif with --geojson all.geojson
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 75
        assert proc.stderr.strip().splitlines() == [
            f"error: {shared} is being made by another run (pid {os.getpid()}); let it finish, or stop it first"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["all.geojson.lock"]  # b.tif's lock gone too
    same = subprocess.run([*cmd[:-len(FAST)], "--probs", str(shared), *FAST], capture_output=True, text=True)
    assert same.returncode == 2
    assert same.stderr.strip().splitlines() == [
        f"error: --probs {shared}: the probabilities are a Zarr store (a folder), name it .zarr"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.geojson", "b.tif"]


def test_output_lock_is_exclusive_and_survives_only_its_holder(tmp_path):
    from wsi_espnet.outputs import exclusive_output

    out = tmp_path / "m.tif"
    with exclusive_output(out):
        with pytest.raises(UserError, match="being made by another run"):
            with exclusive_output(out):  # a second open file description: flock refuses it too
                pass
    # A lock file left by a killed run (its lock died with it) is taken over, then removed.
    (tmp_path / "m.tif.lock").write_text("999999\n")
    with exclusive_output(out):
        assert (tmp_path / "m.tif.lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / "m.tif.lock").exists()
    # A link planted at the lock's path is refused, never followed (a run would truncate its target).
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    (tmp_path / "m.tif.lock").symlink_to(precious)
    with pytest.raises(UserError, match="is a link"):
        with exclusive_output(out):
            pass
    assert precious.read_text() == "keep"
    # An exception inside releases the lock and removes its file, and comes out unchanged.
    (tmp_path / "m.tif.lock").unlink()
    boom = ValueError("boom")
    with pytest.raises(ValueError) as caught:
        with exclusive_output(out):
            raise boom
    assert caught.value is boom and not (tmp_path / "m.tif.lock").exists()


def test_slide_without_tissue_gives_an_empty_valid_mask_and_says_why(tmp_path, empty_svs, demo_svs, small_model,
                                                                      capsys):
    out = tmp_path / "m.tif"
    assert main(["segment", str(empty_svs), "--out", str(out), "--model", str(small_model), *FAST]) == 0
    mask = tifffile.imread(out)
    assert mask.shape == (384, 512) and (mask == 0).all()
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert warned == [f"warning: {empty_svs.name}: no tile has tissue (fraction >= 0.05); the mask is all "
                      "Background (--tissue-threshold 0 segments every tile)"]
    # A grey scan (here the demo slide's tissue, desaturated) has tissue, but no stain colour to find it by.
    grey = tmp_path / "grey.tif"
    with open_slide(demo_svs) as slide:
        rgb = slide.read_at_mpp(0, 0, 1024, 768, 1.0)
    tifffile.imwrite(grey, np.repeat(rgb.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2), tile=(256, 256),
                     resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
    assert main(["segment", str(grey), "--out", str(tmp_path / "g.tif"), "--model", str(small_model), *FAST]) == 0
    assert "the slide has no colour, and tissue is found by its stain's colour" in capsys.readouterr().err


def test_mpp_given_for_a_slide_that_records_another_is_said(tmp_path, demo_svs, small_model, capsys):
    argv = ["segment", str(demo_svs), "--out", str(tmp_path / "m.tif"), "--model", str(small_model), *FAST]
    assert main([*argv, "--mpp", "0.25"]) == 0
    err = capsys.readouterr().err
    assert "warning: --mpp 0.25 replaces the 0.5 µm/px that demo.svs records" in err
    assert main([*argv, "--mpp", "0.52", "--overwrite"]) == 0  # within the scanner's own rounding: nothing to say
    assert "replaces" not in capsys.readouterr().err


def test_slide_smaller_than_one_tile(tmp_path, tiny_svs, small_model):
    out = tmp_path / "m.tif"
    assert main(["segment", str(tiny_svs), "--out", str(out), "--model", str(small_model), *FAST]) == 0
    assert tifffile.imread(out).shape == (75, 100)


def test_slide_without_mpp_needs_the_option(tmp_path, slides_dir, small_model, capsys):
    tcga = slides_dir / "real" / "TCGA-CR-7395-01A-01-TS1.svs"
    out = tmp_path / "m.tif"
    assert main(["segment", str(tcga), "--out", str(out), "--model", str(small_model), *FAST]) == 2
    assert "--mpp" in _one_line_error(capsys)
    assert not out.exists()
    boxes = slides_dir / "openslide-python-fixtures" / "boxes.tiff"  # 72 dpi: a software default, and says so
    assert main(["segment", str(boxes), "--out", str(out), "--model", str(small_model), *FAST]) == 2
    assert "72 dpi, is a software default" in _one_line_error(capsys)
    assert main(["segment", str(tcga), "--out", str(out), "--model", str(small_model), "--mpp", "0.25", *FAST]) == 0
    assert tifffile.imread(out).shape == (892, 1111)  # 4443x3567 at 0.25 µm/px, read at 1 µm/px


def test_a_scan_much_coarser_than_the_model_warns_in_one_line(tmp_path, tiny_svs, small_model, capsys):
    """A 4 µm/px scan (an overview image, say) for a 1 µm/px model is upsampled 4x: it runs, and says so."""
    out = tmp_path / "m.tif"
    assert main(["segment", str(tiny_svs), "--out", str(out), "--model", str(small_model), "--mpp", "4", *FAST]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    coarse = [line for line in err if "coarser" in line]  # (and one for --mpp replacing the file's 0.5)
    assert len(coarse) == 1 and coarse[0].startswith("warning:") and "4x coarser" in coarse[0]
    assert "upsampled to 800x600 px, the outputs are that large" in coarse[0]
    assert tifffile.imread(out).shape == (600, 800)  # 200x150 px at 4 µm/px, at 1 µm/px
    assert main(["segment", str(tiny_svs), "--out", str(out), "--model", str(small_model), "--overwrite", *FAST]) == 0
    assert "warning" not in capsys.readouterr().err  # at the model's own resolution: nothing to say


def _bad_inputs(tmp_path: Path, slides_dir: Path) -> dict[str, Path]:
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    real = (slides_dir / "real" / "CMU-1-Small-Region.svs").read_bytes()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(real[: len(real) // 3])
    return {"missing": tmp_path / "nope.svs", "directory": tmp_path, "text": text, "truncated": truncated,
            "unreadable": slides_dir / "openslide-python-fixtures" / "unreadable.svs"}


@pytest.mark.parametrize("case", ["missing", "directory", "text", "truncated", "unreadable"])
def test_bad_slides_fail_in_one_line_and_write_nothing(tmp_path, slides_dir, small_model, capsys, case):
    slide = _bad_inputs(tmp_path, slides_dir)[case]
    out = tmp_path / "out" / "m.tif"
    rc = main(["segment", str(slide), "--out", str(out), "--model", str(small_model), "--mpp", "0.5", *FAST])
    assert rc == 2
    line = _one_line_error(capsys)
    assert "Traceback" not in line
    assert not out.exists()
    # Nothing at all: the run stopped before its first band, so no work folder, and the output folder
    # it had made is gone again.
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, says", [
    (["--mpp", "abc"], "argument --mpp: invalid float value: 'abc'"),
    (["--tile"], "argument --tile: expected one argument"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_a_malformed_command_line_is_one_error_line_too(tmp_path, tiny_svs, capsys, argv, says):
    """argparse's own mistakes (a value of the wrong type, a missing value, an unknown option) read
    like every other: one line, exit 2, not the usage block burying it."""
    with pytest.raises(SystemExit) as stop:
        main(["segment", str(tiny_svs), "--out", str(tmp_path / "m.tif"), *argv], prog="wsi-segment")
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {says} (see wsi-segment --help)"]
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path, tiny_svs, small_model, capsys):
    out = tmp_path / "m.tif"
    out.write_bytes(b"precious")
    assert main(["segment", str(tiny_svs), "--out", str(out), "--model", str(small_model), *FAST]) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert out.read_bytes() == b"precious"
    assert main(["segment", str(tiny_svs), "--out", str(out), "--model", str(small_model), *FAST, "--overwrite"]) == 0
    assert tifffile.imread(out).shape == (75, 100)


def test_a_work_folder_left_half_deleted_by_a_killed_run_goes_with_the_next_run(tmp_path, tiny_svs, small_model,
                                                                                capsys):
    """A run killed while deleting its finished work folder leaves it renamed aside (hidden), not
    half deleted under its own name; the next run on that output, even one refused, takes it away."""
    out = tmp_path / "m.tif"
    args = ["segment", str(tiny_svs), "--out", str(out), "--model", str(small_model), *FAST]
    assert main(args) == 0
    aside = tmp_path / ".m.tif.work.deleting"
    (aside / "probs.zarr").mkdir(parents=True)
    (aside / "labels.u8").write_bytes(bytes(1000))
    assert main(args) == 2  # m.tif exists
    assert "--overwrite" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif"]


def test_the_probabilities_leave_the_work_folder_as_links_and_their_metadata_as_a_copy(tmp_path):
    """The probability store's chunks become the output's by hard links (no second copy on disk);
    ``zarr.json`` is copied, so that setting the output's attributes leaves the work copy as it was."""
    from wsi_espnet.outputs import link_or_copy_tree

    src = tmp_path / "work" / "probs.zarr"
    arr = zarr.create_array(str(src), shape=(2, 64, 64), chunks=(2, 32, 32), dtype="float16", fill_value=0)
    arr[:] = np.random.default_rng(0).random((2, 64, 64)).astype(np.float16)
    dst = tmp_path / "probs.zarr.partial"
    link_or_copy_tree(src, dst)
    chunks = [p for p in src.rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(chunks) == 4
    for chunk in chunks:
        assert os.path.samefile(chunk, dst / chunk.relative_to(src))
    assert not os.path.samefile(src / "zarr.json", dst / "zarr.json")
    zarr.open_array(str(dst), mode="r+").attrs["provenance"] = {"model": "x"}
    assert "provenance" not in zarr.open_array(str(src)).attrs
    np.testing.assert_array_equal(zarr.open_array(str(dst))[:], arr[:])


def test_probs_store_is_replaced_with_overwrite_but_no_other_folder(tmp_path, tiny_svs, small_model, capsys):
    """--probs writes a Zarr store (a folder): a re-run needs --overwrite to replace it, and even
    then a folder that is not a Zarr store is refused rather than deleted."""
    args = ["segment", str(tiny_svs), "--out", str(tmp_path / "m.tif"), "--model", str(small_model), *FAST,
            "--probs", str(tmp_path / "p.zarr")]
    assert main(args) == 0
    assert main(args) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert main([*args, "--overwrite"]) == 0
    assert zarr.open_array(str(tmp_path / "p.zarr"), mode="r").shape[1:] == (75, 100)
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "slide.svs").write_text("x")
    args[-1] = str(precious)
    assert main([*args, "--overwrite"]) == 2
    assert "not a Zarr store" in _one_line_error(capsys)
    assert (precious / "slide.svs").read_text() == "x"
    args[-1] = str(tmp_path / "p.npy")  # a store is a folder: a file's name would mislead
    assert main(args) == 2
    assert "name it .zarr" in _one_line_error(capsys)
    assert not (tmp_path / "p.npy").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as on Linux")
def test_a_full_disk_is_one_line_and_the_rerun_finishes(tmp_path, demo_svs, small_model):
    """A file-size limit (as a full disk or a quota would) stops the run with one line naming the
    file, exit 1, nothing at the final path; the same command without the limit then finishes."""
    import resource

    out = tmp_path / "mask.tif"
    cmd = [sys.executable, "-m", "wsi_espnet.cli", "segment", str(demo_svs), "--out", str(out), "--model",
           str(small_model), "--tile", "256", "--overlap", "32", "--quiet", "--device", "cpu"]

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    run = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limited)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: File too large") and "labels.u8" in lines[0], run.stderr
    assert not out.exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert tifffile.imread(out).any()


def test_an_output_folder_lost_during_the_run_keeps_the_finished_tiles(tmp_path, demo_svs, small_model):
    """The GeoJSON's folder was there when the run checked it and is gone when the outputs are
    written (a share unmounted, a folder removed): not a mistake in the command (exit 1, as for a
    full disk), and the tiles stay, so the re-run only writes the outputs."""
    from wsi_espnet.errors import OutputLostError

    engine = TorchEngine(wsi_espnet.load_model(small_model), device="cpu")
    geo_dir = tmp_path / "shared"
    geo_dir.mkdir()

    class LosingTheFolder(_Interrupting):
        def predict_proba(self, batch):
            shutil.rmtree(geo_dir, ignore_errors=True)  # with the run's lock file in it
            return super().predict_proba(batch)

    out = tmp_path / "mask.tif"
    opts = SegmentOptions(tile=256, overlap=32, batch=2, progress=False, geojson=geo_dir / "g.geojson")
    with pytest.raises(OutputLostError, match="does not exist.*changed during the run") as lost:
        segment_slide(demo_svs, out, options=opts, engine=LosingTheFolder(engine))
    assert lost.value.exit_code == 1
    assert not out.exists() and json.loads((tmp_path / "mask.tif.work" / "progress.json").read_text())["done"]
    geo_dir.mkdir()
    again = _Interrupting(engine)
    segment_slide(demo_svs, out, options=opts, engine=again)
    assert again.calls == 0 and (geo_dir / "g.geojson").is_file()  # no tile run twice
    ref = tmp_path / "ref" / "mask.tif"
    segment_slide(demo_svs, ref, options=replace(opts, geojson=None), engine=_Interrupting(engine))
    assert out.read_bytes() == ref.read_bytes()


def test_unwritable_output_is_refused(tmp_path, tiny_svs, small_model, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["segment", str(tiny_svs), "--out", str(blocker / "m.tif"), "--model", str(small_model), *FAST]) == 2
    _one_line_error(capsys)


def test_model_whose_classes_do_not_match_its_config(tmp_path, tiny_svs, small_model, capsys):
    payload = torch.load(small_model, weights_only=True)
    payload["config"]["classes"] = payload["config"]["classes"][:5]
    torch.save(payload, tmp_path / "bad.pt")
    assert main(["segment", str(tiny_svs), "--out", str(tmp_path / "m.tif"), "--model", str(tmp_path / "bad.pt"), *FAST]) == 2
    assert "5 classes" in _one_line_error(capsys)
    assert not (tmp_path / "m.tif").exists()


def test_bad_options(tmp_path, tiny_svs, small_model, capsys):
    for extra in (["--tile", "100"], ["--overlap", "600"], ["--tile", "256", "--overlap", "160"], ["--mpp", "-1"],
                  ["--batch", "0"], ["--threads", "0"]):
        rc = main(["segment", str(tiny_svs), "--out", str(tmp_path / "m.tif"), "--model", str(small_model),
                   "--quiet", *extra])
        assert rc == 2, extra
        _one_line_error(capsys)
    assert main(["segment", str(tiny_svs), "--out", str(tmp_path / "m.png"), "--model", str(small_model)]) == 2
    _one_line_error(capsys)
    # Names QuPath or an image viewer would not take for what they are, and a negative speck size.
    for extra in (["--geojson", str(tmp_path / "g.txt")], ["--overlay", str(tmp_path / "o.jpg")],
                  ["--geojson", str(tmp_path / "g.geojson"), "--geojson-min-area", "-1"],
                  ["--geojson", str(tmp_path / "g.geojson"), "--geojson-min-area", "nan"]):
        rc = main(["segment", str(tiny_svs), "--out", str(tmp_path / "m.tif"), "--model", str(small_model),
                   "--quiet", *extra])
        assert rc == 2, extra
        _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_geojson_min_area_and_gz_from_the_command_line(tmp_path, demo_svs, small_model):
    """A gzip GeoJSON without the model's specks: fewer parts, none under the size, no overlaps."""
    import gzip

    from shapely.geometry import shape

    base = ["segment", str(demo_svs), "--model", str(small_model), *FAST]
    assert main([*base, "--out", str(tmp_path / "a.tif"), "--geojson", str(tmp_path / "a.geojson")]) == 0
    assert main([*base, "--out", str(tmp_path / "b.tif"), "--geojson", str(tmp_path / "b.geojson.gz"),
                 "--geojson-min-area", "20"]) == 0
    exact = json.loads((tmp_path / "a.geojson").read_text())["features"]
    clean = json.loads(gzip.decompress((tmp_path / "b.geojson.gz").read_bytes()))["features"]
    parts = {f["properties"]["name"]: shapely.get_parts(shape(f["geometry"])) for f in clean}
    exact_parts = sum(len(shapely.get_parts(shape(f["geometry"]))) for f in exact)
    assert sum(len(p) for p in parts.values()) < exact_parts
    for name, ps in parts.items():
        assert (shapely.area(ps) * 0.25 >= 20).all(), name  # level-0 px of 0.5 µm
    geoms = [shape(f["geometry"]) for f in clean]
    for i in range(len(geoms)):
        for j in range(i + 1, len(geoms)):
            assert geoms[i].intersection(geoms[j]).area < 1e-6


def test_an_output_naming_the_input_slide_is_refused_even_with_overwrite(tmp_path, demo_ome, small_model, capsys):
    """--out slide.ome.tif --overwrite would replace the slide with its own mask."""
    slide = tmp_path / "victim.ome.tif"
    slide.write_bytes(demo_ome.read_bytes())
    for argv in (["segment", str(slide), "--out", str(slide), "--model", str(small_model), "--overwrite", *FAST],
                 ["tile", str(slide), "--out", str(slide), "--overwrite"]):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == f"error: {slide} is the input slide; name the output differently"
    link = tmp_path / "another-name.tif"  # a hard link: another path to the same file
    os.link(slide, link)
    assert main(["segment", str(slide), "--out", str(link), "--model", str(small_model), "--overwrite", *FAST]) == 2
    assert "is the input slide" in capsys.readouterr().err
    assert slide.read_bytes() == demo_ome.read_bytes()


def test_a_mistake_leaves_no_folder_and_no_work_behind(tmp_path, tiny_svs, small_model, capsys):
    """Checked before anything is made (--tile 0 is not "the default"), or taken away again."""
    for extra in (["--tissue-threshold", "2"], ["--tile", "0"], ["--workers", "0"],
                  ["--model", str(tmp_path / "nope.pt")]):
        argv = ["segment", str(tiny_svs), "--out", str(tmp_path / "new" / "deeper" / "m.tif"), "--quiet", *extra]
        assert main(argv if "--model" in extra else [*argv, "--model", str(small_model)]) == 2, extra
        _one_line_error(capsys)
        assert sorted(p.name for p in tmp_path.iterdir()) == [], extra


def test_a_model_without_background_class_gets_one_for_the_glass(tmp_path, demo_svs, empty_svs):
    """A BCSS-style model (no Background: its code 0 was "outside the annotation") must not label
    the glass as its first tissue class: the outputs prepend Background and shift its ids by one."""
    from wsi_espnet.config import config_from_dict

    cfg = config_from_dict({"name": "bcss-like", "classes": [{"name": n, "color": [40 * i, 0, 0]} for i, n in
                                                             enumerate(["tumor", "stroma", "lymph", "necrosis", "other"])]})
    torch.manual_seed(0)
    model = wsi_espnet.save_checkpoint(tmp_path / "nb.pt", wsi_espnet.ESPNet(5, 2, 3), cfg)
    opts = SegmentOptions(tile=256, overlap=32, progress=False, probs=tmp_path / "p.zarr", geojson=tmp_path / "g.geojson")
    with pytest.warns(InputWarning, match="no tile has tissue"):
        empty = segment_slide(empty_svs, tmp_path / "e.tif", model,
                              SegmentOptions(tile=256, overlap=32, progress=False, geojson=tmp_path / "e.geojson"))
    assert not tifffile.imread(tmp_path / "e.tif").any() and empty.tiles == 0
    assert json.loads((tmp_path / "e.geojson").read_text())["features"] == []  # no whole-slide "tumor"
    assert set(empty.class_mm2) == {"Background", "tumor", "stroma", "lymph", "necrosis", "other"}
    assert empty.class_mm2["tumor"] == 0 and empty.class_mm2["Background"] > 0

    result = segment_slide(demo_svs, tmp_path / "m.tif", model, opts)
    mask = tifffile.imread(tmp_path / "m.tif")
    assert read_mask_info(tmp_path / "m.tif").class_names == ["Background", "tumor", "stroma", "lymph", "necrosis", "other"]
    probs = np.asarray(zarr.open_array(str(tmp_path / "p.zarr"), mode="r")[:]).astype(np.float32)
    tissue = probs.sum(0) > 0.5  # the probabilities keep the model's own 5 classes
    top2 = np.sort(probs, axis=0)[-2:]
    clear = tissue & (top2[1] - top2[0] > 2e-3)
    assert clear.mean() > 0.2 and (mask[clear] == probs.argmax(0)[clear] + 1).all()
    assert (mask[~tissue] == 0).all()
    names = {f["properties"]["name"] for f in json.loads((tmp_path / "g.geojson").read_text())["features"]}
    assert "Background" not in names and names <= {"tumor", "stroma", "lymph", "necrosis", "other"}
    px = (result.mpp / 1000) ** 2
    assert result.class_mm2["Background"] == pytest.approx((mask == 0).sum() * px)


def test_threads_sets_the_models_cpu_threads(tmp_path, tiny_svs, small_model):
    before = torch.get_num_threads()
    try:
        assert main(["segment", str(tiny_svs), "--out", str(tmp_path / "m.tif"), "--model", str(small_model),
                     *FAST, "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert tifffile.imread(tmp_path / "m.tif").shape == (75, 100)
    finally:
        torch.set_num_threads(before)


def test_schedules_give_the_same_bytes_and_between_never_reads_beside_the_model(tmp_path, demo_svs, small_model,
                                                                                monkeypatch):
    """"beside" reads and blends while the model runs (a GPU, or cores left free), "between" only
    between its batches (a CPU model on every core): the same operations in the same order."""
    import threading

    engine = TorchEngine(wsi_espnet.load_model(small_model), device="cpu")
    reading, reads, lock, seen = [0], [0], threading.Lock(), []
    real_read = scheduling.read_tile

    def counted_read(*args):
        with lock:
            reading[0] += 1
            reads[0] += 1
        try:
            return real_read(*args)
        finally:
            with lock:
                reading[0] -= 1

    class Watching:  # the real engine, noting how many reads run while it works
        config, device, model_id = engine.config, engine.device, "m"

        def predict_proba(self, batch):
            seen.append(reading[0])
            out = engine.predict_proba(batch)
            seen.append(reading[0])
            return out

    monkeypatch.setattr(scheduling, "read_tile", counted_read)
    for schedule in ("beside", "between"):
        seen.clear()
        reads[0] = 0
        opts = SegmentOptions(tile=256, overlap=32, batch=2, progress=False, schedule=schedule,
                              probs=tmp_path / schedule / "p.zarr")
        result = segment_slide(demo_svs, tmp_path / schedule / "mask.tif", options=opts, engine=Watching())
        assert reads[0] == result.tiles  # every tile read through the counted reader
        if schedule == "between":
            assert len(seen) > 10 and max(seen) == 0
    assert (tmp_path / "beside" / "mask.tif").read_bytes() == (tmp_path / "between" / "mask.tif").read_bytes()
    np.testing.assert_array_equal(*(zarr.open_array(str(tmp_path / s / "p.zarr"), mode="r")[:]
                                    for s in ("beside", "between")))
    with pytest.raises(UserError, match="schedule"):
        segment_slide(demo_svs, tmp_path / "x.tif", options=SegmentOptions(schedule="sideways"), engine=engine)
    assert not (tmp_path / "x.tif").exists()


def test_auto_schedule_reads_beside_the_model_only_where_cores_are_free(small_model):
    from wsi_espnet.engine import available_cores
    from wsi_espnet.schedule import choose_schedule, cores_free_beside, default_batch

    engine = TorchEngine(wsi_espnet.load_model(small_model), device="cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(available_cores())
        assert engine.cpu_threads == available_cores() and not cores_free_beside(engine)
        assert choose_schedule(engine) == ("streams" if available_cores() >= 2 else "between")
        if available_cores() > 1:
            torch.set_num_threads(1)
            assert cores_free_beside(engine) and choose_schedule(engine) == "beside"
    finally:
        torch.set_num_threads(before)
    assert choose_schedule(engine, "between") == "between"  # what is asked for, whatever the machine

    class Unknown:  # an engine that does not say how many threads it takes, nor can split them
        device = "cpu"

    assert not cores_free_beside(Unknown()) and choose_schedule(Unknown()) == "between"
    Unknown.cpu_threads = 8
    assert choose_schedule(Unknown()) == "between"  # has threads, but cannot give each call half
    Unknown.device = "cuda:0"
    assert cores_free_beside(Unknown()) and choose_schedule(Unknown()) == "beside"
    assert default_batch("cpu") == 2 and default_batch("cuda:0") == default_batch("cuda") == 4


class _OnTwoThreads:
    """The real engine as a 2-thread CPU model ("auto" makes that two streams of one thread)."""

    cpu_threads = 2

    def __init__(self, engine):
        self.engine, self.config, self.device, self.model_id = engine, engine.config, engine.device, "m"
        self.threads_per_call = engine.threads_per_call

    def predict_proba(self, batch):
        return self.engine.predict_proba(batch)


def test_streams_run_two_model_calls_at_once_and_give_the_bytes_of_one_call_at_a_time(tmp_path, demo_svs,
                                                                                      small_model):
    """"streams" runs two model calls side by side on half the threads each, blending on the main
    thread meanwhile: the same bytes as running those calls one after another on as many threads."""
    import threading

    engine = TorchEngine(wsi_espnet.load_model(small_model), device="cpu")
    state = {"now": 0, "most": 0, "threads": set()}
    lock = threading.Lock()

    class Counting(_OnTwoThreads):  # noting how many calls run at once and on how many threads
        def predict_proba(self, batch):
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
                state["threads"].add(torch.get_num_threads())
            try:
                return super().predict_proba(batch)
            finally:
                with lock:
                    state["now"] -= 1

    before = torch.get_num_threads()
    try:
        for schedule, threads in (("streams", 2), ("between", 1)):
            torch.set_num_threads(threads)
            state.update(most=0, threads=set())
            opts = SegmentOptions(tile=256, overlap=32, batch=2, progress=False, schedule=schedule,
                                  probs=tmp_path / schedule / "p.zarr")
            segment_slide(demo_svs, tmp_path / schedule / "mask.tif", options=opts, engine=Counting(engine))
            assert torch.get_num_threads() == threads  # the run gave the setting back
            assert state["threads"] == {1}  # each call on one thread: half of 2, or the 1 given
            assert state["most"] == (2 if schedule == "streams" else 1)
    finally:
        torch.set_num_threads(before)
    assert (tmp_path / "streams" / "mask.tif").read_bytes() == (tmp_path / "between" / "mask.tif").read_bytes()
    np.testing.assert_array_equal(*(zarr.open_array(str(tmp_path / s / "p.zarr"), mode="r")[:]
                                    for s in ("streams", "between")))

    class Fixed:  # an engine that cannot split its threads cannot run streams
        config, device, model_id = engine.config, engine.device, "m"
        predict_proba = engine.predict_proba

    with pytest.raises(UserError, match="streams"):
        segment_slide(demo_svs, tmp_path / "x.tif", engine=Fixed(),
                      options=SegmentOptions(tile=256, overlap=32, progress=False, schedule="streams"))
    assert not (tmp_path / "x.tif").exists() and not (tmp_path / "x.tif.work").exists()


@pytest.mark.parametrize("where", ["read", "model"])
def test_a_failure_on_a_model_stream_ends_the_run_with_its_error_and_the_rerun_finishes(tmp_path, demo_svs,
                                                                                      small_model, monkeypatch,
                                                                                      where):
    """Under "streams" the tiles are taken and the model run on the streams' threads: a read or a
    model call that fails there is the run's error (not a hang, not a half-written output), and the
    same call afterwards gives the bytes of a run that never failed."""
    import threading

    engine = TorchEngine(wsi_espnet.load_model(small_model), device="cpu")
    lock, count = threading.Lock(), {"read": 0, "model": 0}
    broken = {"on": True}

    class Streamed(_OnTwoThreads):  # failing its 4th call while broken
        def predict_proba(self, batch):
            with lock:
                count["model"] += 1
                if broken["on"] and where == "model" and count["model"] == 4:
                    raise RuntimeError("the model broke")
            return super().predict_proba(batch)

    real_read = scheduling.read_tile

    def read(*args):
        with lock:
            count["read"] += 1
            if broken["on"] and where == "read" and count["read"] == 9:
                raise UserError("tile 9 is unreadable")
        return real_read(*args)

    monkeypatch.setattr(scheduling, "read_tile", read)
    opts = SegmentOptions(tile=256, overlap=32, batch=1, progress=False, schedule="streams")
    before = torch.get_num_threads()
    try:
        broken["on"] = False
        segment_slide(demo_svs, tmp_path / "ref" / "mask.tif", options=opts, engine=Streamed(engine))
        broken["on"], count["read"], count["model"] = True, 0, 0
        out = tmp_path / "mask.tif"
        with pytest.raises((RuntimeError, UserError), match="broke|unreadable"):
            segment_slide(demo_svs, out, options=opts, engine=Streamed(engine))
        assert not out.exists()
        assert torch.get_num_threads() == before  # the threads given back on the way out too
        broken["on"] = False
        segment_slide(demo_svs, out, options=opts, engine=Streamed(engine))
    finally:
        torch.set_num_threads(before)
    assert out.read_bytes() == (tmp_path / "ref" / "mask.tif").read_bytes()


# ---------------------------------------------------------------------------------------------
# With the shipped tissue model, against the demo slide's known truth


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory, demo_svs):
    out = tmp_path_factory.mktemp("shipped") / "mask.tif"
    gj = out.with_suffix(".geojson")
    assert main(["segment", str(demo_svs), "--out", str(out), "--geojson", str(gj), "--quiet", "--device", "cpu"]) == 0
    return out, gj


def test_shipped_model_finds_the_demo_truth(shipped_run, demo_spec):
    mask = tifffile.imread(shipped_run[0])
    truth = demo_spec.labels(0, 0, mask.shape[1], mask.shape[0], 1.0)
    assert (mask == truth).mean() > 0.9


def test_geojson_is_valid_matches_the_mask_and_lands_on_the_right_pixels(shipped_run, demo_spec):
    import shapely
    from shapely.geometry import shape

    mask_path, gj_path = shipped_run
    mask = tifffile.imread(mask_path)
    names = wsi_espnet.load_config("breast_biopsy").class_names
    features = json.loads(gj_path.read_text())["features"]
    scale = 2.0  # level-0 px (0.5 µm) per mask px (1 µm)
    geoms = {}
    for f in features:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert set(props["classification"]) == {"name", "color"}
        g = shape(f["geometry"])
        assert g.is_valid and shapely.set_precision(g, 0.01).is_valid
        geoms[props["classification"]["name"]] = g
    counts = np.bincount(mask.ravel(), minlength=len(names))
    for cid, name in enumerate(names):
        if name == "Background" or counts[cid] == 0:
            continue
        assert abs(geoms[name].area / scale**2 - counts[cid]) <= 0.01 * counts[cid], name
    # Pixel centres of the mask, taken to level-0 coordinates, fall inside their own class's polygon.
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, mask.shape[0], 300), rng.integers(0, mask.shape[1], 300)
    pts = shapely.points((xs + 0.5) * scale, (ys + 0.5) * scale)
    for p, y, x in zip(pts, ys, xs):
        name = names[mask[y, x]]
        if name != "Background":
            assert geoms[name].contains(p)
    # ... and the polygons sit on the slide's true structures: the class of the demo truth at
    # level-0 points inside each polygon matches it far more often than chance.
    hits = total = 0
    for name, g in geoms.items():
        for p in shapely.points(rng.uniform(0, 2048, 4000), rng.uniform(0, 1536, 4000)):
            if g.contains(p):
                total += 1
                hits += names[int(demo_spec.labels(int(p.x), int(p.y), 1, 1, 0.5)[0, 0])] == name
    assert total > 1000 and hits / total > 0.85


def test_tiled_blended_map_agrees_with_whole_region_inference(tmp_path, demo_svs):
    """Fidelity: the shipped model's own settings (512 px tiles blended over a 72 px overlap) vs one
    pass over the whole 1024×768 region (measured 99.94 %); without overlap the seams show
    (99.84 %)."""
    from wsi_espnet.predict import predict_image
    from wsi_espnet.slide import open_slide

    engine = TorchEngine(wsi_espnet.load_model(), device="cpu")
    with open_slide(demo_svs) as slide:
        whole = predict_image(engine, slide.read_at_mpp(0, 0, 1024, 768, 1.0), None)
    agreement = {}
    assert (engine.config.slide.tile, engine.config.slide.overlap) == (512, 72)
    for overlap in (0, None):  # None: the model's default
        out = tmp_path / f"o{overlap}.tif"
        segment_slide(demo_svs, out, options=SegmentOptions(overlap=overlap, tissue_threshold=0, progress=False),
                      engine=engine)
        agreement[overlap] = (tifffile.imread(out) == whole).mean()
    assert agreement[None] >= 0.999
    assert agreement[0] < agreement[None]


def test_feed_batches_cut_across_bands_from_the_start_of_the_slide():
    from wsi_espnet.schedule import feed_batches
    from wsi_espnet.stitch import Band
    from wsi_espnet.tiling import Tile

    def band(row: int, n: int) -> Band:
        tiles = [Tile(index=0, row=row, col=c, x=100 * c, y=100 * row, width=128, height=128, x0=0.0, y0=0.0,
                      w0=0.0, h0=0.0, tissue=1.0) for c in range(n)]
        return Band((row,), tiles, 100 * row, 100 * row + 100)

    bands = [band(0, 3), band(1, 0), band(2, 1), band(3, 4)]  # 8 tiles, a glass-only band among them
    batches, lead = feed_batches(bands, 3)
    assert [[(t.row, t.col) for t in b] for b in batches] == [[(0, 0), (0, 1), (0, 2)], [(2, 0), (3, 0), (3, 1)],
                                                             [(3, 2), (3, 3)]]
    assert lead == 0
    again, lead = feed_batches(bands, 3, first_band=3)  # resuming at band 3: its batch starts with band 2's tile
    assert again == batches[1:] and lead == 1
    assert feed_batches(bands, 3, first_band=2) == (batches[1:], 0)
    assert feed_batches(bands, 3, first_band=4) == ([], 0)  # nothing left


def test_non_square_pixels_are_said(tmp_path, small_model, capsys):
    aniso = tmp_path / "aniso.tif"
    rgb = np.full((512, 512, 3), 230, np.uint8)
    rgb[100:400, 100:400] = (180, 80, 160)
    tifffile.imwrite(aniso, rgb, tile=(256, 256), photometric="rgb", resolution=(20000, 10000),
                     resolutionunit="CENTIMETER")
    assert main(["segment", str(aniso), "--out", str(tmp_path / "m.tif"), "--model", str(small_model), *FAST]) == 0
    assert ("warning: aniso.tif records pixels of 0.5 x 1 µm, not square: they are read as squares of 0.75 µm"
            in capsys.readouterr().err)


def test_labels_where_one_tile_decides_come_from_the_logits_and_give_the_map_of_probabilities(tmp_path, demo_svs,
                                                                                                monkeypatch):
    """Without --probs the model gives each tile's central cell as labels (labels.predict_split: no
    softmax there, its argmax on the model's thread); with --probs every probability. Same mask."""
    calls = {"split": 0, "boxes": 0, "proba": 0}
    real_split, real_proba = TorchEngine.predict_split, TorchEngine.predict_proba

    def split(self, batch, plans):
        calls["split"] += 1
        calls["boxes"] += sum(p.box is not None for p in plans)
        return real_split(self, batch, plans)

    def proba(self, batch):
        calls["proba"] += 1
        return real_proba(self, batch)

    monkeypatch.setattr(TorchEngine, "predict_split", split)
    monkeypatch.setattr(TorchEngine, "predict_proba", proba)
    opts = SegmentOptions(tile=256, overlap=32, progress=False)
    segment_slide(demo_svs, tmp_path / "split.tif", options=opts)
    assert calls["split"] > 0 and calls["boxes"] > 0 and calls["proba"] == 0
    calls.update(split=0, proba=0)
    segment_slide(demo_svs, tmp_path / "probs.tif", options=replace(opts, probs=tmp_path / "p.zarr"))
    assert calls["split"] == 0 and calls["proba"] > 0
    split_mask, probs_mask = (tifffile.imread(tmp_path / f"{n}.tif") for n in ("split", "probs"))
    assert len(np.unique(probs_mask)) >= 3  # real tissue classes, not one flat answer
    assert (split_mask == probs_mask).mean() > 0.9999  # only an exact tie of probabilities may differ


def test_a_stride_that_is_not_a_multiple_of_8_is_warned_about_with_the_overlap_that_fixes_it(tmp_path, demo_svs,
                                                                                          small_model):
    from wsi_espnet.segment import stride_note

    with pytest.warns(InputWarning, match=r"256 - overlap 36 = 220 px is not a multiple of 8.*--overlap 40 avoids"):
        result = segment_slide(demo_svs, tmp_path / "m.tif", small_model,
                               SegmentOptions(tile=256, overlap=36, progress=False))
    assert any("multiple of 8" in w for w in result.warnings)  # also in wsi-batch's report
    assert "--overlap 128 avoids" in stride_note(256, 127)  # up to the next multiple, at most half the tile
    assert "--overlap 128 avoids" in stride_note(264, 131)  # else down
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        segment_slide(demo_svs, tmp_path / "ok.tif", small_model, SegmentOptions(tile=256, overlap=32, progress=False))


def test_tissue_is_found_on_a_thread_while_the_model_loads_and_gives_the_same_mask(tmp_path, demo_svs, small_model,
                                                                                   monkeypatch):
    """Loading the model here (no engine given), the tissue is detected on a thread beside the load;
    with a loaded engine, on the calling thread. The same labels either way."""
    import threading

    from wsi_espnet import segment

    where = []
    real = segment.detect_tissue

    def spy(slide, *args, **kwargs):
        where.append(threading.current_thread().name)
        return real(slide, *args, **kwargs)

    monkeypatch.setattr(segment, "detect_tissue", spy)
    opts = SegmentOptions(tile=256, overlap=32, device="cpu", progress=False)
    segment_slide(demo_svs, tmp_path / "a.tif", small_model, options=opts)
    engine = TorchEngine(wsi_espnet.load_model(small_model), device="cpu")
    segment_slide(demo_svs, tmp_path / "b.tif", options=opts, engine=engine)
    assert where[0].startswith("tissue") and where[1] == threading.current_thread().name
    # the pixels: the metadata name the model file in one run and not in the other
    assert np.array_equal(tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif"))
