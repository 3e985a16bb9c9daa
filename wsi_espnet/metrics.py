"""Segmentation metrics from one confusion matrix: per-class IoU, mean IoU, pixel accuracy.

Everything is derived from an integer confusion matrix that is accumulated tile by tile, so a whole
slide (or a whole validation set) is scored without ever holding all its labels in memory, and the
numbers of several runs can be merged by adding matrices.

Conventions (the ones the ESPNet paper and the Cityscapes/VOC benchmarks use):

- rows are the truth, columns the prediction: ``cm[t, p]`` counts pixels of class ``t`` predicted
  as ``p``;
- pixels whose truth is ``ignore_index`` are not counted at all (whatever the prediction);
- IoU of class c = TP / (TP + FP + FN).  A class that is neither in the truth nor in the prediction
  has no IoU (NaN): it is left out of the mean instead of counting as 0 or as 1, so mIoU is the
  mean over the classes *present in the truth or the prediction*;
- when ``ignore_index`` is itself a class id (Cityscapes keeps a 20th "ignore" output), that class
  never has an IoU of its own; predicting it on a labelled pixel still counts as a miss for the
  true class.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .outputs import atomic_file


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = truth, columns = prediction.

    A single ``np.bincount`` over ``truth * C + pred``: linear in the number of pixels and exact.
    Truth values other than ``ignore_index`` outside ``[0, num_classes)`` and out-of-range
    predictions are bugs upstream (a wrong class map), so they raise instead of being dropped.
    """
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    t = truth.reshape(-1).astype(np.int64, copy=False)
    p = pred.reshape(-1).astype(np.int64, copy=False)
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    if t.size:
        if t.min() < 0 or t.max() >= num_classes:
            bad = np.unique(t[(t < 0) | (t >= num_classes)])[:5].tolist()
            raise ValueError(f"truth holds class id(s) {bad} outside 0..{num_classes - 1} (and not the ignore index)")
        if p.min() < 0 or p.max() >= num_classes:
            bad = np.unique(p[(p < 0) | (p >= num_classes)])[:5].tolist()
            raise ValueError(f"prediction holds class id(s) {bad} outside 0..{num_classes - 1}")
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def iou_per_class(cm: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """IoU of each class; NaN where the class is absent from truth and prediction (and for the
    ignore class when ``ignore_index`` is a class id)."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    if ignore_index is not None and 0 <= ignore_index < len(iou):
        iou[ignore_index] = np.nan
    return iou


def mean_iou(cm: np.ndarray, ignore_index: int | None = None) -> float:
    """Mean of the defined per-class IoUs; NaN when no pixel was scored at all."""
    iou = iou_per_class(cm, ignore_index)
    defined = iou[~np.isnan(iou)]
    return float(defined.mean()) if defined.size else float("nan")


def pixel_accuracy(cm: np.ndarray) -> float:
    """Share of scored pixels predicted right; NaN when none were scored."""
    cm = np.asarray(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


class ConfusionMatrix:
    """Accumulates a confusion matrix over many (truth, prediction) pairs.

    >>> m = ConfusionMatrix(3)
    >>> m.update(np.array([0, 1, 2]), np.array([0, 1, 1]))
    >>> round(m.mean_iou(), 3)
    0.667
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, truth: np.ndarray, pred: np.ndarray) -> None:
        self.matrix += confusion_matrix(truth, pred, self.num_classes, self.ignore_index)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

    def iou(self) -> np.ndarray:
        return iou_per_class(self.matrix, self.ignore_index)

    def mean_iou(self) -> float:
        return mean_iou(self.matrix, self.ignore_index)

    def pixel_accuracy(self) -> float:
        return pixel_accuracy(self.matrix)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        return metrics_dict(self.matrix, class_names, self.ignore_index)

    def table(self, class_names: Sequence[str] | None = None) -> str:
        return format_table(self.matrix, class_names, self.ignore_index)


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def metrics_dict(cm: np.ndarray, class_names: Sequence[str] | None = None, ignore_index: int | None = None) -> dict[str, Any]:
    """JSON-ready summary; undefined values are ``null`` (JSON has no NaN)."""
    cm = np.asarray(cm, np.int64)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(cm))]
    iou = iou_per_class(cm, ignore_index)
    return {
        "mean_iou": _nan_to_none(mean_iou(cm, ignore_index)),
        "pixel_accuracy": _nan_to_none(pixel_accuracy(cm)),
        "pixels": int(cm.sum()),
        "classes_scored": int((~np.isnan(iou)).sum()),
        "per_class": [
            {
                "id": i,
                "name": names[i],
                "iou": _nan_to_none(iou[i]),
                "truth_pixels": int(cm[i].sum()),
                "predicted_pixels": int(cm[:, i].sum()),
            }
            for i in range(len(cm))
        ],
        "class_names": names,
        "confusion_matrix": cm.tolist(),
    }


def format_table(cm: np.ndarray, class_names: Sequence[str] | None = None, ignore_index: int | None = None) -> str:
    """A plain-text table: one row per class (IoU, pixels in truth and prediction), then the means."""
    cm = np.asarray(cm, np.int64)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(cm))]
    iou = iou_per_class(cm, ignore_index)
    width = max([len("class")] + [len(n) for n in names]) + 2
    lines = [f"{'id':>3}  {'class':<{width}}{'IoU':>8}{'truth px':>14}{'predicted px':>14}"]
    for i, name in enumerate(names):
        value = "-" if math.isnan(iou[i]) else f"{iou[i]:.4f}"
        lines.append(f"{i:>3}  {name:<{width}}{value:>8}{int(cm[i].sum()):>14,}{int(cm[:, i].sum()):>14,}")
    miou, acc = mean_iou(cm, ignore_index), pixel_accuracy(cm)
    lines.append(f"mIoU over the {int((~np.isnan(iou)).sum())} classes present in the truth or the prediction: "
                 + ("-" if math.isnan(miou) else f"{miou:.4f}"))
    lines.append("pixel accuracy: " + ("-" if math.isnan(acc) else f"{acc:.4f}") + f" ({int(cm.sum()):,} pixels scored)")
    return "\n".join(lines)


def write_json(path: str, summary: dict[str, Any]) -> None:
    """Write a metrics summary atomically (temporary name, then rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
