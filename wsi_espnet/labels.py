"""Class labels from a model's scores, and a tile's output split into what the blending needs.

Why split: the stitcher averages class probabilities only where tiles overlap.  Inside a tile's
central cell, which no other tile covers (368² of a 512² tile at overlap 72: 52 % of it), the label
is that tile's own argmax, and the probabilities are never used.  There the argmax of the logits
is the label (the softmax keeps each pixel's order of classes), taken on the model's thread while
the logits are fresh in its caches: no softmax for half the tile, and half the tile's probabilities
never read again by another thread.  Where probabilities are an output (``--probs``) every pixel
needs them and the split is not used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 inside a tile


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


def outside(box: Box | None, height: int, width: int) -> list[tuple[slice, slice]]:
    """The rectangles of a ``height`` x ``width`` tile outside ``box`` (rows above and below it at
    full width, then the columns left and right of it): the whole tile when ``box`` is None."""
    if box is None:
        return [(slice(0, height), slice(0, width))]
    y0, y1, x0, x1 = box
    parts = [(slice(0, y0), slice(0, width)), (slice(y1, height), slice(0, width)),
             (slice(y0, y1), slice(0, x0)), (slice(y0, y1), slice(x1, width))]
    return [(ys, xs) for ys, xs in parts if ys.stop > ys.start and xs.stop > xs.start]


def box_labels(scores: np.ndarray, box: Box) -> np.ndarray:
    """The argmax labels of (C, H, W) ``scores`` (logits or probabilities) inside ``box``."""
    y0, y1, x0, x1 = box
    return class_argmax(scores[:, y0:y1, x0:x1])


def predict_split(engine: Any, batch: np.ndarray, boxes: list[Box | None],
                  window: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """A batch of tiles through ``engine`` as the stitcher uses it: (N, C, H, W) float32
    probabilities, each tile's valid outside its box (inside it, undefined), and each box's labels
    (None for a tile without a box, whose probabilities are all valid).  With ``window`` (H, W),
    the probabilities come multiplied by it: the blending's weighting, done while they are fresh
    in the caches of the thread that computed them (the same float32 products as the stitcher's).

    Engines with a ``predict_split`` of their own (PyTorch, ONNX Runtime) skip the softmax inside
    the boxes; for any other, every probability is computed and the labels are their argmax (the
    same labels but for exact ties of probabilities that the logits tell apart)."""
    if len(boxes) != len(batch):
        raise ValueError(f"{len(boxes)} boxes for {len(batch)} tiles")
    split = getattr(engine, "predict_split", None)
    if split is not None:
        return split(batch, boxes, window)
    probs = engine.predict_proba(batch)
    labels = [None if b is None else box_labels(probs[i], b) for i, b in enumerate(boxes)]
    if window is not None:
        probs = probs * window  # not in place: the engine's array is its own
    return probs, labels
