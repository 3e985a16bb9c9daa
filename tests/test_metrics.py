"""Metrics against a confusion matrix worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from wsi_espnet.metrics import ConfusionMatrix, confusion_matrix, iou_per_class, mean_iou, metrics_dict, pixel_accuracy

# 3 classes, one ignored pixel (255).  Pairs (truth -> prediction):
#   0->0, 0->1, 1->1, 1->1, 2->2, 2->0, 255->2 (not counted)
TRUTH = np.array([[0, 0, 1, 1], [2, 2, 255, 1]], np.uint8)
PRED = np.array([[0, 1, 1, 1], [2, 0, 2, 2]], np.uint8)
# The last pixel pair 1->2 adds to row 1.
HAND = np.array([
    [1, 1, 0],  # truth 0: once right, once called 1
    [0, 2, 1],  # truth 1: twice right, once called 2
    [1, 0, 1],  # truth 2: once right, once called 0
])


def test_confusion_matrix_matches_hand_computed():
    np.testing.assert_array_equal(confusion_matrix(TRUTH, PRED, 3, ignore_index=255), HAND)


def test_iou_miou_accuracy_match_hand_computed():
    # IoU = TP / (TP + FP + FN): class 0: 1 / (1 + 1 + 1); class 1: 2 / (2 + 1 + 1); class 2: 1 / (1 + 1 + 1)
    iou = iou_per_class(HAND)
    np.testing.assert_allclose(iou, [1 / 3, 2 / 4, 1 / 3])
    assert mean_iou(HAND) == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert pixel_accuracy(HAND) == pytest.approx(4 / 7)


def test_ignore_index_is_honoured_whatever_the_prediction():
    for p in range(3):
        pred = PRED.copy()
        pred[1, 2] = p  # the ignored pixel's prediction must not matter
        np.testing.assert_array_equal(confusion_matrix(TRUTH, pred, 3, ignore_index=255), HAND)
    # Without the ignore index the same pixel would be an error.
    with pytest.raises(ValueError):
        confusion_matrix(TRUTH, PRED, 3, ignore_index=None)


def test_absent_class_is_left_out_of_the_mean_not_counted_as_zero():
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    cm = confusion_matrix(truth, pred, 4, ignore_index=255)  # classes 2, 3 appear nowhere
    iou = iou_per_class(cm)
    assert math.isnan(iou[2]) and math.isnan(iou[3])
    assert mean_iou(cm) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # A class only predicted (a false positive) is present: IoU 0 and in the mean.
    cm2 = confusion_matrix(truth, np.array([0, 3, 1, 1]), 4, ignore_index=255)
    assert iou_per_class(cm2)[3] == 0.0
    assert mean_iou(cm2) == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_ignore_index_that_is_a_class_id_gets_no_iou_but_predictions_of_it_still_miss():
    # Cityscapes-style: 3 outputs, index 2 is "ignore".
    truth = np.array([0, 1, 2, 2])
    pred = np.array([2, 1, 0, 1])
    m = ConfusionMatrix(3, ignore_index=2)
    m.update(truth, pred)
    assert m.matrix.sum() == 2  # the two truth-2 pixels are not scored
    iou = m.iou()
    assert math.isnan(iou[2])
    assert iou[0] == 0.0  # the class-0 pixel was predicted as 2: a miss for class 0
    assert m.mean_iou() == pytest.approx(0.5)


def test_accumulating_equals_one_big_matrix():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, (4, 32, 32))
    truth[truth == 4] = 255
    pred = rng.integers(0, 4, (4, 32, 32))
    m = ConfusionMatrix(4)
    for t, p in zip(truth, pred):
        m.update(t, p)
    np.testing.assert_array_equal(m.matrix, confusion_matrix(truth, pred, 4))


def test_out_of_range_ids_raise():
    with pytest.raises(ValueError, match="truth"):
        confusion_matrix(np.array([0, 7]), np.array([0, 0]), 3)
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(np.array([0, 1]), np.array([0, 9]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros(3), np.zeros(4), 3)


def test_json_and_table_outputs():
    d = metrics_dict(np.pad(HAND, ((0, 1), (0, 1))), ["a", "b", "c", "never"])
    text = json.dumps(d)  # NaN would not be valid JSON: absent classes are null
    back = json.loads(text)
    assert back["per_class"][3]["iou"] is None
    assert back["mean_iou"] == pytest.approx(mean_iou(HAND))
    assert back["confusion_matrix"][1] == [0, 2, 1, 0]
    m = ConfusionMatrix(3)
    m.update(TRUTH, PRED)
    table = m.table(["stroma", "tumour", "glass"])
    assert "tumour" in table and "0.5000" in table and "mIoU" in table
