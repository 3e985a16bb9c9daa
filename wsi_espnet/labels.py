"""Class labels from a model's scores, and a tile's output split into what the blending needs.

Why split: the stitcher averages class probabilities only where two tiles' blending windows
overlap, and reads nothing where a tile's window is 0 (the trim toward a kept neighbour, see
``stitch``).  Inside a tile's own box, where no other tile weighs in (416² of a 512² tile at overlap
72: 66 % of it), the label is that tile's own argmax, and the probabilities are never used.  There
the argmax of the logits is the label (the softmax keeps each pixel's order of classes), taken on
the model's thread while the logits are fresh in its caches.  So the softmax runs only where the
blending reads it (16 % of an inner tile), and the rest of the tile is never read again by another
thread.  Where probabilities are an output (``--probs``) every pixel needs them and the split is
not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 inside a tile


@dataclass(frozen=True)
class TilePlan:
    """What the stitcher reads of one tile's output (``BlendStitcher.plan``)."""

    span: Box  # where the tile's window is positive: outside it, nothing is read
    box: Box | None  # inside the span, where its labels are read instead of probabilities
    window: np.ndarray | None = None  # (H, W) blending weights, to multiply the probabilities by


def class_argmax(probs: np.ndarray) -> np.ndarray:
    """``probs.argmax(0)`` as uint8 (ties to the lower class id, as argmax), a class plane at a time.

    Why not ``argmax(0)``: over the leading axis of a (C, h, w) array numpy transposes into a copy
    first.  Instead: the maximum over the planes, then for each class a byte plane holding
    ``C - 1 - c`` where the class reaches that maximum, and the running maximum of those bytes (the
    lowest tied class has the largest code).  Byte arithmetic on whole planes, without a branch per
    pixel: writing each class where it wins (``copyto(..., where=)``) costs as much only where the
    winners come in large regions (a demo tile's 384² cell: 0.39-0.41 against 0.48-0.51 ms) and 9x
    more on a noisy map, where the branch mispredicts (random probabilities: 0.54 against 4.8 ms).

    NaN (a model that overflowed) never wins; a pixel with no number at all is class 0, background,
    rather than counted in any tissue class.  Works on logits as well as on probabilities."""
    n = probs.shape[0]
    if n > 256:
        raise ValueError(f"{n} classes do not fit uint8 labels")
    best = np.fmax.reduce(probs, axis=0)
    code = np.zeros(best.shape, np.uint8)  # C - 1 - (lowest class at the maximum); class C - 1: 0
    hit = np.empty(best.shape, bool)
    term = np.empty(best.shape, np.uint8)
    for c in range(n - 1):
        np.equal(probs[c], best, out=hit)
        np.multiply(hit.view(np.uint8), np.uint8(n - 1 - c), out=term)
        np.maximum(code, term, out=code)
    labels = np.subtract(np.uint8(n - 1), code, out=code)
    np.isnan(best, out=hit)
    if hit.any():
        labels[hit] = 0
    return labels


def outside(box: Box | None, span: Box) -> list[tuple[slice, slice]]:
    """The rectangles of ``span`` outside ``box`` (rows above and below it at the span's full width,
    then the columns left and right of it): the whole span when ``box`` is None."""
    sy0, sy1, sx0, sx1 = span
    if box is None:
        return [(slice(sy0, sy1), slice(sx0, sx1))]
    y0, y1, x0, x1 = box
    parts = [(slice(sy0, y0), slice(sx0, sx1)), (slice(y1, sy1), slice(sx0, sx1)),
             (slice(y0, y1), slice(sx0, x0)), (slice(y0, y1), slice(x1, sx1))]
    return [(ys, xs) for ys, xs in parts if ys.stop > ys.start and xs.stop > xs.start]


def box_labels(scores: np.ndarray, box: Box) -> np.ndarray:
    """The argmax labels of (C, H, W) ``scores`` (logits or probabilities) inside ``box``."""
    y0, y1, x0, x1 = box
    return class_argmax(scores[:, y0:y1, x0:x1])


def predict_split(engine: Any, batch: np.ndarray, plans: list[TilePlan]) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """A batch of tiles through ``engine`` as the stitcher reads it: (N, C, H, W) float32
    probabilities, each tile's valid inside its plan's span but outside its box (elsewhere,
    undefined), multiplied by its plan's window if it has one (the blending's weighting, done while
    they are fresh in the caches of the thread that computed them: the same float32 products as the
    stitcher's); and each box's labels (None for a tile without a box).

    Engines with a ``predict_split`` of their own (PyTorch, ONNX Runtime) compute the softmax only
    where it is read; for any other, every probability is computed and the labels are their argmax
    (the same labels but for exact ties of probabilities that the logits tell apart)."""
    if len(plans) != len(batch):
        raise ValueError(f"{len(plans)} plans for {len(batch)} tiles")
    split = getattr(engine, "predict_split", None)
    if split is not None:
        return split(batch, plans)
    probs = engine.predict_proba(batch)
    labels = [None if p.box is None else box_labels(probs[i], p.box) for i, p in enumerate(plans)]
    if any(p.window is not None for p in plans):
        probs = np.stack([q if p.window is None else q * p.window for q, p in zip(probs, plans)])  # the engine's array is its own
    return probs, labels
