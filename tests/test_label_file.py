"""LabelFile: the raw, sparse uint8 label map behind a segmentation run's work folder and the mask
writer's pyramid levels."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from wsi_espnet.label_file import LabelFile


def test_reads_and_writes_agree_with_numpy_over_random_regions(tmp_path):
    H, W = 300, 517
    rng = np.random.default_rng(0)
    ref = np.zeros((H, W), np.uint8)
    lf = LabelFile.create(tmp_path / "l.u8", (H, W))
    for _ in range(200):
        y0, x0 = rng.integers(0, H), rng.integers(0, W)
        y1, x1 = rng.integers(y0, H + 1), rng.integers(x0, W + 1)
        if rng.random() < 0.2:
            x0, x1 = 0, W  # whole rows: the single-read/write path
        block = rng.integers(0, 256, (y1 - y0, x1 - x0), dtype=np.uint8)
        lf[y0:y1, x0:x1] = block
        ref[y0:y1, x0:x1] = block
        a, b = sorted(rng.integers(0, H, 2))
        c, d = sorted(rng.integers(0, W, 2))
        np.testing.assert_array_equal(lf[a:b, c:d], ref[a:b, c:d])
    np.testing.assert_array_equal(lf[:], ref)
    np.testing.assert_array_equal(lf[-10:, -7:], ref[-10:, -7:])  # negative bounds, as numpy
    lf[5:9, 3:4] = 7  # a scalar broadcasts
    ref[5:9, 3:4] = 7
    lf[:, 2:6] = ref[:, 2:6][:, ::-1]  # a non-contiguous block
    ref[:, 2:6] = ref[:, 2:6][:, ::-1].copy()
    lf.close()
    again = LabelFile.open(tmp_path / "l.u8", (H, W))
    np.testing.assert_array_equal(again[:], ref)
    assert again[3:3, 0:5].shape == (0, 5)


def test_unwritten_regions_are_background_and_take_no_disk(tmp_path):
    """A 400 MB map with one small block written occupies a few blocks of disk: the rest are holes."""
    lf = LabelFile.create(tmp_path / "big.u8", (20000, 20000))
    lf[10000:10100, 5000:5100] = 3
    st = os.stat(tmp_path / "big.u8")
    assert st.st_size == 20000 * 20000
    assert st.st_blocks * 512 < 2 * 1024 * 1024
    assert not lf[0:100, 0:20000].any()
    assert (lf[10000:10100, 5000:5100] == 3).all()


def test_mistakes_are_refused(tmp_path):
    path = tmp_path / "l.u8"
    LabelFile.create(path, (10, 20)).close()
    with pytest.raises(ValueError, match="bytes"):
        LabelFile.open(path, (10, 21))  # other settings' file
    ro = LabelFile.open(path, (10, 20))
    with pytest.raises(ValueError, match="read-only"):
        ro[0:1, 0:1] = 1
    with pytest.raises(IndexError):
        ro[0:10:2, :]
    with pytest.raises(IndexError):
        ro[3]
    ro.close()
    with pytest.raises(ValueError, match="closed"):
        ro[0:1, 0:1]
    with pytest.raises(ValueError):
        LabelFile.create(tmp_path / "empty.u8", (0, 5))


def _in_threads(work, n: int) -> None:
    """``work(0)`` .. ``work(n - 1)`` at once, one thread each; a failure in any is raised here."""
    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(work, range(n)))


def test_threads_write_disjoint_rows(tmp_path):
    H, W = 400, 333
    truth = np.random.default_rng(1).integers(0, 9, (H, W), dtype=np.uint8)
    lf = LabelFile.create(tmp_path / "l.u8", (H, W))

    def work(k: int) -> None:
        for y in range(k, H, 4):
            lf[y : y + 1, 11:W] = truth[y : y + 1, 11:]
            lf[y : y + 1, 0:11] = truth[y : y + 1, :11]

    _in_threads(work, 4)
    np.testing.assert_array_equal(lf[:], truth)


def test_threads_write_disjoint_columns_of_the_same_rows(tmp_path):
    """Blocks narrower than a stripe (a pyramid built on threads with small blocks): each write
    reads, patches and rewrites whole stripe rows, so without the file's lock one thread's patch
    would undo another's."""
    H, W = 64, 1500
    truth = np.random.default_rng(2).integers(1, 9, (H, W), dtype=np.uint8)
    lf = LabelFile.create(tmp_path / "l.u8", (H, W))
    columns = [(x, min(x + 50, W)) for x in range(0, W, 50)]

    def work(k: int) -> None:
        for _ in range(20):
            for x0, x1 in columns[k::6]:
                lf[:, x0:x1] = truth[:, x0:x1]

    _in_threads(work, 6)
    np.testing.assert_array_equal(lf[:], truth)


def test_a_block_is_one_system_call_per_stripe_it_touches(tmp_path, monkeypatch):
    """Reads and writes of a block cost a call per 512-column stripe, not per row (28,000 preads
    for the mask pyramid of a 4096² map, laid out row by row)."""
    import wsi_espnet.label_file as lf_mod

    calls = {"read": 0, "write": 0}
    real_preadv, real_pwrite = os.preadv, os.pwrite

    def preadv(*a):
        calls["read"] += 1
        return real_preadv(*a)

    def pwrite(*a):
        calls["write"] += 1
        return real_pwrite(*a)

    lf = LabelFile.create(tmp_path / "l.u8", (2000, 4096))
    block = np.random.default_rng(2).integers(0, 9, (1000, 1024), dtype=np.uint8)
    monkeypatch.setattr(lf_mod.os, "preadv", preadv)
    monkeypatch.setattr(lf_mod.os, "pwrite", pwrite)
    lf[500:1500, 1024:2048] = block  # two whole stripes
    assert calls == {"read": 0, "write": 2}
    np.testing.assert_array_equal(lf[500:1500, 1024:2048], block)
    assert calls["read"] == 2
    lf[0:1000, 1000:2024] = block  # three stripes, two of them in part: read, patch, write
    assert calls == {"read": 4, "write": 5}
    np.testing.assert_array_equal(lf[0:1000, 1000:2024], block)


def test_without_preadv_the_same_bytes_come_back(tmp_path, monkeypatch):
    """macOS's Python has no os.preadv: reads fall back to os.pread."""
    truth = np.random.default_rng(7).integers(0, 9, (300, 700), dtype=np.uint8)
    lf = LabelFile.create(tmp_path / "l.u8", truth.shape)
    lf[:, :] = truth
    monkeypatch.delattr(os, "preadv")
    np.testing.assert_array_equal(lf[:], truth)
    np.testing.assert_array_equal(lf[17:250, 100:650], truth[17:250, 100:650])


def test_a_file_cut_short_while_in_use_is_an_error_naming_it(tmp_path):
    import errno

    lf = LabelFile.create(tmp_path / "l.u8", (100, 600))
    lf[:, :] = 1
    os.truncate(tmp_path / "l.u8", 100 * 600 // 2)
    with pytest.raises(OSError) as err:
        lf[90:100, 0:600]
    assert err.value.errno == errno.EIO and err.value.filename == str(tmp_path / "l.u8")
