"""Overlap blending: exact where tiles agree (to the 16-bit step of the packed overlap strip), a true
weighted average where they do not, bounded pending state, and nothing emitted where no tile was run."""

import numpy as np
import pytest

from wsi_espnet.stitch import BlendStitcher, border_ramp, feed_bands, trim_of
from wsi_espnet.tiling import tile_grid


def _run(grid, probs_of, num_classes, between_bands=None):
    h, w = grid.image_size[1], grid.image_size[0]
    out = np.full((h, w), 255, np.uint8)
    blended = np.zeros((num_classes, h, w), np.float32)
    writes = np.zeros((h, w), np.int32)

    def on_labels(y, x, lab):
        writes[y : y + lab.shape[0], x : x + lab.shape[1]] += 1
        out[y : y + lab.shape[0], x : x + lab.shape[1]] = lab

    def on_probs(y, x, p):
        blended[:, y : y + p.shape[1], x : x + p.shape[2]] = p

    st = BlendStitcher(grid, num_classes, on_labels, on_probs)
    peak = 0
    for band in feed_bands(grid):
        for t in band.tiles:
            st.add(t.row, t.col, probs_of(t))
            peak = max(peak, st.pending_bytes())
        if between_bands is not None:
            between_bands.append(st.pending_bytes())
    assert st.pending_cells == 0
    return out, blended, writes, peak


def test_consistent_tiles_reproduce_the_full_map_exactly():
    rng = np.random.default_rng(0)
    C, W, H, T = 5, 1000, 700, 256
    truth = rng.random((C, H, W)).astype(np.float32)
    grid = tile_grid((W, H), T, 48, 1.0, 1.0)
    out, blended, writes, _ = _run(grid, lambda t: truth[:, t.y : t.y + T, t.x : t.x + T], C)
    assert (writes == 1).all()  # every pixel emitted exactly once
    # The overlap strip between tile rows waits as 16-bit fixed point: at most 1/131070 off.
    np.testing.assert_allclose(blended, truth, rtol=1e-6, atol=0.5 / 65535 + 1e-7)
    top2 = np.sort(truth, axis=0)[-2:]
    clear = top2[1] - top2[0] > 2.0 / 65535  # not a tie at the packing step
    assert clear.mean() > 0.999
    assert (out[clear] == truth.argmax(0)[clear]).all()
    # Within a tile row (and everywhere when the strip is not packed) nothing is rounded.
    row0 = slice(0, grid.ys[1])
    assert (out[row0] == truth.argmax(0)[row0]).all()
    np.testing.assert_allclose(blended[:, row0], truth[:, row0], rtol=1e-5)


def test_disagreeing_tiles_are_averaged_with_the_window():
    C, W, H, T, O = 2, 400, 256, 256, 112
    grid = tile_grid((W, H), T, O, 1.0, 1.0)  # two tiles side by side, x = 0 and 144
    assert [t.x for t in grid.tiles] == [0, 144]

    def probs(t):  # the left tile says class 0, the right tile says class 1
        p = np.zeros((C, T, T), np.float32)
        p[0 if t.x == 0 else 1] = 1.0
        return p

    out, blended, _, _ = _run(grid, probs, C)
    trim = trim_of(O)
    fade = O - 2 * trim
    # In the overlap [144, 256): the left tile alone over its first third, the right tile alone over
    # its last, and between them a cross-fade whose weights sum to 1.
    left = border_ramp(T, O, start=False, end=True)
    right = border_ramp(T, O, start=True, end=False)
    x = np.arange(144, 256)
    wl, wr = left[x], right[x - 144]
    np.testing.assert_allclose(blended[1, 100, 144:256], wr / (wl + wr), rtol=1e-5)
    np.testing.assert_allclose(blended[1, 100, 144 + trim : 144 + trim + fade], wr[trim : trim + fade], rtol=1e-5)
    assert (blended[1, :, 144 : 144 + trim] == 0).all() and (blended[1, :, 256 - trim : 256] == 1).all()
    assert (out[:, :144] == 0).all() and (out[:, 256:] == 1).all()
    # the seam sits in the middle of the overlap: each side wins where it sees farther from its border
    assert (out[:, 144:200] == 0).all() and (out[:, 200:256] == 1).all()


def test_ramp_trims_the_outer_third_and_fades_over_the_middle_third():
    T, O = 512, 72
    ramp = border_ramp(T, O)
    assert trim_of(O) == 24
    assert (ramp[:24] == 0).all() and (ramp[-24:] == 0).all()  # a neighbour sees these pixels from farther in
    assert (ramp[24:48] > 0).all() and (ramp[48 : T - 48] == 1).all() and (np.diff(ramp[24:48]) > 0).all()
    # two neighbours overlapping by O: weights sum to 1 across the overlap, pixel by pixel
    np.testing.assert_allclose(ramp[-O:] + ramp[:O], 1.0, atol=1e-6)
    # no neighbour on a side: weight 1 up to that edge
    assert (border_ramp(T, O, start=False)[:48] == 1).all() and (border_ramp(T, O, end=False)[-48:] == 1).all()
    # small overlaps fade over all of it; none is flat
    assert (border_ramp(64, 2) > 0).all() and (border_ramp(64, 0) == 1).all()


@pytest.mark.parametrize("seed", range(8))
def test_every_pixel_a_kept_tile_covers_has_a_positive_weight(seed):
    """A tile's window is 0 over its trim only toward a kept neighbour; with holes anywhere in the
    grid (glass) and flush last rows and columns, some tile always weighs each covered pixel."""
    rng = np.random.default_rng(200 + seed)
    T = 64
    W, H = int(rng.integers(40, 400)), int(rng.integers(40, 400))
    O = int(rng.choice([3, 8, 24, 30, 32]))
    grid = tile_grid((W, H), T, O, 1.0, 1.0)
    grid.tiles = [t for t in grid.tiles if rng.random() > 0.35]
    st = BlendStitcher(grid, 2, lambda *a: None)
    total = np.zeros((max(H, T) + T, max(W, T) + T))
    covered = np.zeros_like(total, bool)
    for t in grid.tiles:
        w = st.window(t.row, t.col)
        total[t.y : t.y + T, t.x : t.x + T] += w
        covered[t.y : t.y + T, t.x : t.x + T] = True
        y0, y1, x0, x1 = st.span(t.row, t.col)
        assert (w[y0:y1, x0:x1] > 0).all() and w.sum() == w[y0:y1, x0:x1].sum()  # the span is where it is positive
    assert (total[covered] > 0).all()


def test_skipped_tiles_leave_the_fill_value():
    C, W, H, T = 3, 900, 900, 256
    rng = np.random.default_rng(1)
    truth = rng.random((C, H, W)).astype(np.float32)
    grid = tile_grid((W, H), T, 32, 1.0, 1.0)
    grid.tiles = [t for t in grid.tiles if (t.row + t.col) % 2 == 0]  # a checkerboard of "tissue"
    out, _, writes, _ = _run(grid, lambda t: truth[:, t.y : t.y + T, t.x : t.x + T], C)
    covered = np.zeros((H, W), bool)
    for t in grid.tiles:
        covered[t.y : t.y + T, t.x : t.x + T] = True
    assert (writes[covered] == 1).all() and (writes[~covered] == 0).all()
    assert (out[covered] == truth.argmax(0)[covered]).all()


def test_image_smaller_than_a_tile_is_cropped():
    C, T = 2, 256
    grid = tile_grid((100, 60), T, 32, 1.0, 1.0)
    out, _, writes, _ = _run(grid, lambda t: np.stack([np.zeros((T, T)), np.ones((T, T))]).astype(np.float32), C)
    assert out.shape == (60, 100) and (out == 1).all() and (writes == 1).all()


@pytest.mark.parametrize("width", [6000, 12000])
def test_pending_state_is_a_thin_strip_not_the_image(width):
    C, H, T, O = 4, 1200, 256, 32
    grid = tile_grid((width, H), T, O, 1.0, 1.0)
    tile_probs = np.full((C, T, T), 0.25, np.float32)
    _, _, _, peak = _run(grid, lambda t: tile_probs, C)
    # the overlap strip below one tile row, 2 bytes per class and pixel (packed), plus float32 cells
    # around the current tile — less than the strip would take as float32, far below a full map
    strip = C * 2 * (O + 1) * width + C * 4 * T * T
    assert peak <= strip < C * 4 * O * width
    assert peak < 0.1 * C * 4 * width * H


def test_label_band_streams_rows_to_the_label_file_in_order(tmp_path):
    """Labels land at their place in the label file whatever the band boundaries, including rows
    emitted below a band's bottom (no tile below them) that wait for the next flush."""
    from wsi_espnet.label_file import LabelFile
    from wsi_espnet.segment import LabelBand

    H, W = 700, 300
    rng = np.random.default_rng(3)
    truth = rng.integers(1, 9, (H, W), dtype=np.uint8)
    labels = LabelFile.create(tmp_path / "l.u8", (H, W))
    band = LabelBand(labels, flushed_y=0, height=340)
    # (band bottom, blocks as (y0, y1, x0, x1)) — later blocks may start above the flushed height
    plan = [(100, [(0, 100, 0, 300), (100, 160, 0, 120)]),
            (230, [(90, 230, 120, 300), (100, 230, 0, 120), (230, 330, 0, 300)]),
            (500, [(330, 500, 0, 300), (500, 560, 200, 300)]),
            (700, [(500, 700, 0, 300)])]
    for bottom, blocks in plan:
        for y0, y1, x0, x1 in blocks:
            band.write(y0, x0, truth[y0:y1, x0:x1])
        assert band.flush(bottom) == bottom
        np.testing.assert_array_equal(labels[:bottom], truth[:bottom])
    with pytest.raises(AssertionError, match="overflow"):
        LabelBand(labels, flushed_y=0, height=50).write(10, 0, truth[10:70])


def test_label_band_writes_only_where_labels_landed(tmp_path, recorded):
    """A band whose tissue covers a few columns writes just those columns, and a band without tissue
    writes nothing; the file still equals the labels everywhere, the class counts are exact, and
    the rows never written stay holes (no disk space)."""
    from wsi_espnet.label_file import LabelFile
    from wsi_espnet.segment import LabelBand

    H, W = 600, 1000
    rng = np.random.default_rng(4)
    truth = np.zeros((H, W), np.uint8)
    truth[0:200, 500:610] = rng.integers(1, 5, (200, 110))  # band 1
    truth[400:600, 990:1000] = 3  # band 3: the last columns; band 2 (200-400): nothing
    labels = LabelFile.create(tmp_path / "l.u8", (H, W))
    rec = recorded(labels)
    band = LabelBand(rec, flushed_y=0, height=200)
    for y0 in (0, 200, 400):
        rows = truth[y0 : y0 + 200]
        cols = np.flatnonzero(rows.any(0))
        if cols.size:
            band.write(y0, int(cols[0]), rows[:, cols[0] : cols[-1] + 1])
        band.flush(y0 + 200)
    np.testing.assert_array_equal(labels[:], truth)
    written = [(ys.start, xs.start, xs.stop) for ys, xs in rec.writes]
    assert written == [(0, 500, 610), (400, 990, 1000)]  # band 2: nothing
    np.testing.assert_array_equal(band.counts[:5], np.bincount(truth.ravel(), minlength=5))


def test_rows_carried_to_the_next_band_keep_their_columns(tmp_path, recorded):
    """Labels emitted below a band's bottom (no tissue tile below them) wait for the next flush,
    which then writes, counts and clears only their columns, not the whole width."""
    from wsi_espnet.label_file import LabelFile
    from wsi_espnet.segment import LabelBand

    H, W = 300, 1000
    truth = np.zeros((H, W), np.uint8)
    truth[0:150, 500:600] = np.random.default_rng(6).integers(1, 5, (150, 100))
    labels = LabelFile.create(tmp_path / "l.u8", (H, W))
    rec = recorded(labels)
    band = LabelBand(rec, flushed_y=0, height=200)
    band.write(0, 500, truth[0:150, 500:600])  # rows 100-149 lie below the first band
    for bottom in (100, 200, 300):
        band.flush(bottom)
    np.testing.assert_array_equal(labels[:], truth)
    assert [(ys.start, xs.start, xs.stop) for ys, xs in rec.writes] == [(0, 500, 600), (100, 500, 600)]
    np.testing.assert_array_equal(band.counts[:5], np.bincount(truth.ravel(), minlength=5))
    assert not band.buf.any()  # every row handed on was cleared behind it


@pytest.mark.parametrize("seed", range(12))
def test_packed_strip_is_never_overwritten_on_odd_grids(seed):
    """Random sizes, overlaps and tissue: every covered pixel's blend is the truth to the packing
    step, so no packed strip cell was overwritten before the row below consumed it."""
    rng = np.random.default_rng(100 + seed)
    C, T = 3, 64
    W, H = int(rng.integers(60, 420)), int(rng.integers(60, 420))
    O = int(rng.choice([0, 8, 16, 24, 40]))
    truth = rng.random((C, H, W)).astype(np.float32)
    grid = tile_grid((W, H), T, O, 1.0, 1.0)
    if seed % 3:
        grid.tiles = [t for t in grid.tiles if rng.random() > 0.3]
    pad = np.zeros((C, max(H, T), max(W, T)), np.float32)
    pad[:, :H, :W] = truth
    held = []
    _, blended, writes, _ = _run(grid, lambda t: pad[:, t.y : t.y + T, t.x : t.x + T], C, held)
    # Between tile rows everything waiting is packed, also beside tiles that were not run: nothing
    # is held beyond the one 16-bit strip buffer.
    strip = C * 2 * max(O, 1) * (grid.xs[-1] + T)
    assert all(b in (0, strip) for b in held[:-1])
    covered = np.zeros((H, W), bool)
    for t in grid.tiles:
        covered[t.y : t.y + T, t.x : t.x + T] = True
    assert (writes[covered] == 1).all() and (writes[~covered] == 0).all()
    np.testing.assert_allclose(blended[:, covered], truth[:, covered], rtol=1e-6, atol=0.5 / 65535 + 1e-7)


def test_class_argmax_is_argmax_with_ties_to_the_lower_class():
    from wsi_espnet.labels import class_argmax

    rng = np.random.default_rng(5)
    p = rng.random((6, 40, 50)).astype(np.float32)
    p[2, :5] = p[4, :5] = 2.0  # ties: class 2 wins
    p[0, 5:8] = p[5, 5:8] = 3.0  # the first and the last class tie: class 0 wins
    p[5, 8:10] = p[3, 8:10] = p[1, 8:10] = 3.0  # a three-way tie: class 1
    assert class_argmax(p).dtype == np.uint8
    np.testing.assert_array_equal(class_argmax(p), p.argmax(0))
    assert (class_argmax(p)[5:8] == 0).all() and (class_argmax(p)[8:10] == 1).all()
    view = p[:, 3:37, 7:45]  # a cell of a tile: a strided view
    np.testing.assert_array_equal(class_argmax(view), view.argmax(0))
    q = p.copy()
    q[3, 20, :] = np.nan  # NaN never wins: the pixel's finite classes decide
    q[:, 21, :] = np.nan  # no number at all: background
    q[5, 22, :] = 9.0
    q[0, 22, :] = np.nan
    got = class_argmax(q)
    np.testing.assert_array_equal(got[20], np.nan_to_num(q[:, 20], nan=-1).argmax(0))
    assert (got[21] == 0).all() and (got[22] == 5).all()
    # 21 classes (VOC) with values on a coarse grid: ties everywhere, between any pair of classes
    many = rng.integers(0, 4, (21, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(class_argmax(many), many.argmax(0))


def test_labels_computed_on_a_labeler_pool_are_the_same_and_arrive_at_deliver():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(9)
    C, W, H, T = 4, 700, 500, 128
    truth = rng.random((C, H, W)).astype(np.float32)
    grid = tile_grid((W, H), T, 24, 1.0, 1.0)
    noise = {(t.row, t.col): rng.random((C, T, T)).astype(np.float32) * 0.3 for t in grid.tiles}

    def run(labeler):
        out = np.full((H, W), 255, np.uint8)

        def on_labels(y, x, lab):
            out[y : y + lab.shape[0], x : x + lab.shape[1]] = lab

        st = BlendStitcher(grid, C, on_labels, labeler=labeler)
        for band in feed_bands(grid):
            before = out.copy()
            for t in band.tiles:
                st.add(t.row, t.col, truth[:, t.y : t.y + T, t.x : t.x + T] + noise[t.row, t.col])
            if labeler is not None:
                assert (out == before).all()  # nothing handed over before deliver
                st.deliver()
        return out

    with ThreadPoolExecutor(2) as pool:
        pooled = run(pool)
    inline = run(None)
    assert (inline != 255).all()
    np.testing.assert_array_equal(pooled, inline)


def test_tiles_fed_out_of_order_fail_loudly_instead_of_blending_wrongly():
    C, T, O = 2, 64, 16
    grid = tile_grid((200, 250), T, O, 1.0, 1.0)
    assert len(grid.ys) >= 4
    st = BlendStitcher(grid, C, lambda y, x, lab: None)
    p = np.full((C, T, T), 0.5, np.float32)
    for t in [t for t in grid.tiles if t.row == 0]:
        st.add(t.row, t.col, p)
    with pytest.raises(AssertionError, match="out of order"):
        for t in [t for t in grid.tiles if t.row == 2]:  # row 1 skipped: its strip is still waiting
            st.add(t.row, t.col, p)


def test_label_box_is_the_tiles_own_cells_and_its_labels_give_the_same_map():
    """Fed as the pipeline feeds it (labels.predict_split): probabilities pre-multiplied by the
    tile's window in its span outside its box, nothing but garbage elsewhere, and the box's labels
    beside them. The map is the one of plain probabilities, on a grid with a flush last row and
    column and holes."""
    from wsi_espnet.labels import box_labels, outside

    rng = np.random.default_rng(11)
    C, W, H, T, O = 4, 700, 530, 128, 24
    truth = rng.random((C, H, W)).astype(np.float32)
    grid = tile_grid((W, H), T, O, 1.0, 1.0)
    grid.tiles = [t for t in grid.tiles if (t.row, t.col) not in {(1, 1), (2, 3)}]  # tissue holes
    noise = {(t.row, t.col): rng.random((C, T, T)).astype(np.float32) * 0.5 for t in grid.tiles}

    def probs_of(t):
        return truth[:, t.y : t.y + T, t.x : t.x + T] + noise[t.row, t.col]

    plain = np.full((H, W), 255, np.uint8)
    split = np.full((H, W), 255, np.uint8)

    def writer(out):
        def on_labels(y, x, lab):
            out[y : y + lab.shape[0], x : x + lab.shape[1]] = lab
        return on_labels

    a = BlendStitcher(grid, C, writer(plain))
    b = BlendStitcher(grid, C, writer(split))
    plans = {}
    for band in feed_bands(grid):
        for t in band.tiles:
            p = probs_of(t)
            a.add(t.row, t.col, p)
            plan = plans[t.row, t.col] = b.plan(t.row, t.col)
            fed = np.full_like(p, np.nan)  # what lies outside the span or inside the box must never be read
            for ys, xs in outside(plan.box, plan.span):
                fed[:, ys, xs] = p[:, ys, xs] * plan.window[ys, xs]
            b.add(t.row, t.col, fed, None if plan.box is None else box_labels(p, plan.box), weighted=True)
    assert a.pending_cells == b.pending_cells == 0
    np.testing.assert_array_equal(split, plain)
    assert (plain != 255).any() and (plain == 255).any()
    # A tile inside the grid: its box is where no neighbour's window reaches, from the end of the
    # fade with each neighbour: 96² of 128² (trim 8, fade 8).
    trim = trim_of(O)
    inner = (O - trim, T - O + trim)
    assert plans[1, 4].box == inner + inner and plans[1, 4].span == (trim, T - trim, trim, T - trim)
    assert plans[1, 0].box == inner + (0, T - O + trim)  # the first column: nothing to its left
    # Beside a hole ((1, 1) and (2, 3) were not run) a tile's window reaches up to its edge.
    assert plans[1, 2].span == (trim, T - trim, 0, T - trim) and plans[2, 2].span == (trim, T - trim, trim, T)
    # The last column sits flush with the edge, overlapping its neighbour by more than O: a smaller box.
    last = max(c for _, c in plans)
    y0, y1, x0, x1 = plans[2, last].box
    assert (y0, y1) == inner and x1 == T and x1 - x0 < T - 2 * (O - trim)


def test_box_labels_and_probabilities_as_an_output_do_not_mix():
    grid = tile_grid((300, 300), 128, 24, 1.0, 1.0)
    st = BlendStitcher(grid, 2, lambda *a: None, on_probs=lambda *a: None)
    t = grid.tiles[0]
    with pytest.raises(ValueError, match="writes probabilities"):
        st.add(t.row, t.col, np.zeros((2, 128, 128), np.float32), np.zeros((80, 80), np.uint8))
    with pytest.raises(ValueError, match="writes probabilities"):
        st.add(t.row, t.col, np.zeros((2, 128, 128), np.float32), weighted=True)


@pytest.mark.parametrize("seed", range(6))
def test_streamed_blend_is_the_dense_weighted_average_of_the_tiles(seed):
    """Tiles that disagree, on random grids with holes and flush edges: the streamed blend equals a
    dense sum over the whole image of each tile's probabilities times its window (0 over the trim
    toward each kept neighbour, sin² over the fade, 1 beyond), divided by the sum of the windows,
    to the 16-bit step of the packed strip; the labels are its argmax wherever that is not a near tie."""
    rng = np.random.default_rng(300 + seed)
    C, T = 3, 64
    W, H = int(rng.integers(100, 360)), int(rng.integers(100, 360))
    O = int(rng.choice([12, 24, 30]))
    grid = tile_grid((W, H), T, O, 1.0, 1.0)
    grid.tiles = [t for t in grid.tiles if rng.random() > 0.25]
    tile_probs = {}
    for t in grid.tiles:
        p = rng.random((C, T, T)).astype(np.float32)
        tile_probs[t.row, t.col] = p / p.sum(0)
    out, blended, writes, _ = _run(grid, lambda t: tile_probs[t.row, t.col], C)
    kept = set(tile_probs)
    acc = np.zeros((C, H + T, W + T))
    wsum = np.zeros((H + T, W + T))
    for t in grid.tiles:
        r, c = t.row, t.col
        w = np.outer(border_ramp(T, O, (r - 1, c) in kept, (r + 1, c) in kept),
                     border_ramp(T, O, (r, c - 1) in kept, (r, c + 1) in kept)).astype(np.float64)
        acc[:, t.y : t.y + T, t.x : t.x + T] += tile_probs[r, c] * w
        wsum[t.y : t.y + T, t.x : t.x + T] += w
    acc, wsum = acc[:, :H, :W], wsum[:H, :W]
    covered = writes == 1
    assert (writes <= 1).all() and (wsum[covered] > 0).all() and (wsum[~covered] == 0).all()
    want = acc[:, covered] / wsum[covered]
    np.testing.assert_allclose(blended[:, covered], want, atol=1 / 65535 + 1e-6)
    top2 = np.sort(want, axis=0)[-2:]
    clear = top2[1] - top2[0] > 4 / 65535
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(out[covered][clear], want.argmax(0)[clear])
