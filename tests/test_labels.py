"""A tile's output split for the blending: probabilities where its window overlaps another tile's,
labels (the argmax of the logits) where it alone decides, nothing where its window is 0; the same
from PyTorch, ONNX Runtime and any other engine."""

import numpy as np
import pytest
import torch

from wsi_espnet.checkpoint import DEFAULT_MODEL, load_model
from wsi_espnet.engine import TorchEngine, device_argmax
from wsi_espnet.labels import TilePlan, class_argmax, outside, predict_split
from wsi_espnet.stitch import border_ramp

T, O = 128, 24
SPAN = (8, T - 8, 8, T - 8)  # an inner tile's: its window is 0 over the outer third of the overlap
BOX = (16, T - 16, 16, T - 16)
FULL = (0, T, 0, T)


def window(top=True, bottom=True, left=True, right=True):
    return np.outer(border_ramp(T, O, top, bottom), border_ramp(T, O, left, right))


@pytest.mark.parametrize("box, span", [(None, FULL), (BOX, FULL), (BOX, SPAN), (None, SPAN), ((0, 50, 10, T), FULL),
                                       ((8, T, 8, 40), (8, T, 8, T)), (FULL, FULL)])
def test_outside_covers_every_pixel_of_the_span_but_the_box_once(box, span):
    seen = np.zeros((T, T), np.int32)
    for ys, xs in outside(box, span):
        seen[ys, xs] += 1
    inside = np.zeros((T, T), bool)
    inside[span[0] : span[1], span[2] : span[3]] = True
    if box is not None:
        inside[box[0] : box[1], box[2] : box[3]] = False
    assert (seen[inside] == 1).all() and (seen[~inside] == 0).all()


class _ProbaOnly:
    """An engine with nothing but predict_proba (as tests' and users' wrappers often are)."""

    def __init__(self, engine):
        self.engine, self.config = engine, engine.config

    def predict_proba(self, batch):
        return self.engine.predict_proba(batch)


@pytest.fixture(scope="module")
def torch_engine():
    return TorchEngine(load_model(DEFAULT_MODEL), device="cpu")


@pytest.fixture(scope="module")
def onnx_engine(torch_engine, tmp_path_factory):
    from wsi_espnet.export import export_onnx
    from wsi_espnet.onnx_engine import OnnxEngine

    path = tmp_path_factory.mktemp("labels") / "tissue.onnx"
    export_onnx(load_model(DEFAULT_MODEL), path)
    return OnnxEngine(path, device="cpu")


@pytest.mark.parametrize("which", ["torch", "onnxruntime", "proba only"])
@pytest.mark.parametrize("weighted", [False, True])
def test_split_gives_the_probabilities_outside_and_the_argmax_inside(which, weighted, torch_engine, onnx_engine,
                                                                    demo_svs):
    from wsi_espnet.slide import open_slide

    engine = {"torch": torch_engine, "onnxruntime": onnx_engine, "proba only": _ProbaOnly(torch_engine)}[which]
    with open_slide(demo_svs) as slide:  # tissue, not noise: classes that the model tells apart
        w, h = slide.dimensions
        batch = np.stack([slide.read_at_mpp(x, y, T, T, 1.0) for x, y in ((w // 2, h // 2), (w // 3, h // 2))] +
                         [np.random.default_rng(0).integers(0, 256, (T, T, 3), dtype=np.uint8)])
    plans = [TilePlan(SPAN, BOX, window()), TilePlan(FULL, None, window(False, False, False, False)),
             TilePlan((0, T, 8, T), (0, 60, 30, T), window(top=False, bottom=False, right=False))]
    if not weighted:
        plans = [TilePlan(p.span, p.box) for p in plans]
    reference = engine.predict_proba(batch)
    probs, labels = predict_split(engine, batch, plans)
    assert probs.shape == reference.shape and probs.dtype == np.float32
    assert labels[1] is None
    for i, plan in enumerate(plans):
        expected = reference[i] * plan.window if weighted else reference[i]
        for ys, xs in outside(plan.box, plan.span):
            np.testing.assert_allclose(probs[i][:, ys, xs], expected[:, ys, xs], rtol=1e-5, atol=1e-7)
        if plan.box is not None:
            y0, y1, x0, x1 = plan.box
            assert labels[i].dtype == np.uint8 and labels[i].shape == (y1 - y0, x1 - x0)
            inside = reference[i][:, y0:y1, x0:x1]
            differ = labels[i] != class_argmax(inside)
            assert differ.mean() < 1e-3
            # where they differ, the probabilities tie (to float32's step): the logits broke the tie
            picked = np.take_along_axis(inside, labels[i][None].astype(np.intp), 0)[0]
            np.testing.assert_allclose(picked[differ], inside.max(0)[differ], rtol=1e-6)
    if which == "torch":
        logits = torch_engine.logits(batch).contiguous().numpy()
        y0, y1, x0, x1 = BOX
        np.testing.assert_array_equal(labels[0], class_argmax(logits[0][:, y0:y1, x0:x1]))


def test_split_of_a_batch_needs_a_plan_per_tile(torch_engine):
    with pytest.raises(ValueError, match="2 plans for 3 tiles"):
        predict_split(torch_engine, np.zeros((3, 64, 64, 3), np.uint8), [TilePlan(FULL, None)] * 2)


def test_device_argmax_is_class_argmax():
    """The argmax a CUDA engine takes on the GPU, run here on CPU tensors: ties to the lower class,
    NaN never wins, all-NaN is background."""
    rng = np.random.default_rng(3)
    s = rng.integers(0, 3, (6, 30, 40)).astype(np.float32)  # ties everywhere
    s[2, 5] = np.nan
    s[:, 6] = np.nan
    s[4, 7], s[0, 7] = 9.0, np.nan
    got = device_argmax(torch.from_numpy(s)).numpy()
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, class_argmax(s))
    assert (got[6] == 0).all() and (got[7] == 4).all()


def test_the_accelerator_branch_gives_the_cpu_branchs_answer(demo_svs):
    """On a GPU the box labels are taken on the device (device_argmax), brought back after the
    batch, and the window is kept on the device. That branch, run here on CPU tensors ('cpu:0'
    standing for the device), answers as the CPU branch does."""
    engine = TorchEngine(load_model(DEFAULT_MODEL), device="cpu")
    batch = np.random.default_rng(1).integers(0, 256, (2, T, T, 3), dtype=np.uint8)
    plans = [TilePlan(SPAN, BOX, window()), TilePlan(FULL, (0, 60, 30, T), window(False, False, False, False))]
    want_probs, want_labels = engine.predict_split(batch, plans)
    logits = engine.logits(batch)
    engine.device = "cpu:0"
    engine.logits = lambda b: logits
    got_probs, got_labels = engine.predict_split(batch, plans)
    np.testing.assert_array_equal(got_probs[0][:, 8:16, 8 : T - 8], want_probs[0][:, 8:16, 8 : T - 8])
    np.testing.assert_array_equal(got_probs[1][:, 60:], want_probs[1][:, 60:])
    for got, want in zip(got_labels, want_labels):
        assert isinstance(got, np.ndarray) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
    kept = {k: v[1] for k, v in engine._kept.items()}  # the windows on the device, kept for the next batch
    assert len(kept) == 2
    engine.predict_split(batch, plans)
    assert all(engine._kept[k][1] is tensor for k, tensor in kept.items())
    other = TilePlan(SPAN, BOX, plans[0].window.copy())  # another window: brought over anew
    engine.predict_split(batch, [other, plans[1]])
    assert engine._kept[id(other.window)][1] is not kept[id(plans[0].window)]
