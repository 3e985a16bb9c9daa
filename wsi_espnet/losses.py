"""The training loss of the ESPNet paper: cross-entropy weighted per class, with an ignore index.

ESPNet takes its class weighting from ENet (Paszke et al. 2016, sec. 5.2):

    w_c = 1 / ln(c + p_c),   c = 1.02,

where p_c is the share of class c among all labelled training pixels.  Unlike inverse frequency,
the weights stay bounded (between 1/ln(2.02) ~ 1.42 and 1/ln(1.02) ~ 50.5), so a rare class is
pushed up without one stray pixel dominating the loss.  In tissue, where stroma may cover half the
slide and necrosis a few percent, that is what keeps the small classes from being ignored.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

ENET_C = 1.02


def count_labels(labels: Iterable[np.ndarray], num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """Pixel count per class over label arrays (ignored pixels and out-of-range ids not counted)."""
    counts = np.zeros(num_classes, np.int64)
    for lab in labels:
        flat = np.asarray(lab).reshape(-1).astype(np.int64, copy=False)
        if ignore_index is not None:
            flat = flat[flat != ignore_index]
        flat = flat[(flat >= 0) & (flat < num_classes)]
        counts += np.bincount(flat, minlength=num_classes)
    return counts


def enet_class_weights(counts: np.ndarray, c: float = ENET_C) -> np.ndarray:
    """ENet/ESPNet weights ``1 / ln(c + p_c)`` from per-class pixel counts (float32).

    A class with no training pixels gets the largest weight, ``1 / ln(c)``; it never appears as a
    target, so the value only matters if the data later change.
    """
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("no labelled pixels to compute class weights from")
    p = counts / total
    return (1.0 / np.log(c + p)).astype(np.float32)


def weighted_cross_entropy(weights: np.ndarray | torch.Tensor | None, ignore_index: int = 255) -> nn.CrossEntropyLoss:
    """Cross-entropy over logits (N, C, H, W) and targets (N, H, W), per-class weighted, with the
    ignore index left out of both the sum and the normaliser."""
    w = None if weights is None else torch.as_tensor(np.asarray(weights, np.float32))
    return nn.CrossEntropyLoss(weight=w, ignore_index=ignore_index)
