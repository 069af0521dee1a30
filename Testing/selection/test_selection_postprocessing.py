"""Postprocessing decisions on generated label maps, and equality with nnU-Net's own operation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from AutoNNUNetLib.selection.postprocessing import PostprocessingPlan, decide_postprocessing, keep_largest_component
from AutoNNUNetLib.selection.scores import dice_per_label, score_cases


def _ball(shape, center, radius):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2


def _two_structures(rng, shape=(40, 40, 40)):
    """Label 1 and label 2 as touching balls at a random place (like the two hippocampus parts)."""
    seg = np.zeros(shape, np.uint8)
    c = rng.integers(14, 18, size=3)
    seg[_ball(shape, c, 6)] = 1
    seg[_ball(shape, c + np.array([0, 0, 9]), 5)] = 2
    return seg


def test_spurious_far_blobs_choose_largest_component():
    rng = np.random.default_rng(0)
    references, predictions = {}, {}
    for i in range(6):
        truth = _two_structures(rng)
        pred = truth.copy()
        pred[1:4, 1:4, 1:4] = 1  # stray far-away blobs of both labels
        pred[35:38, 1:3, 35:38] = 2
        references[f"c{i}"], predictions[f"c{i}"] = truth, pred
    plan = decide_postprocessing(predictions, references, [1, 2])
    assert plan.steps[0].kind == "all_foreground" and plan.steps[0].kept
    assert plan.dice_after == pytest.approx(1.0) and plan.dice_before < 0.99
    assert all(np.array_equal(plan.apply(predictions[c]), references[c]) for c in references)


def test_two_true_components_are_not_removed():
    rng = np.random.default_rng(1)
    references, predictions = {}, {}
    for i in range(6):
        truth = _two_structures(rng)
        truth[2:6, 2:6, 2:6] = 1  # label 1 really has a second, smaller part far away
        pred = truth.copy()
        pred[20:22, 20:22, 30] = 0  # an imperfect but faithful prediction
        references[f"c{i}"], predictions[f"c{i}"] = truth, pred
    plan = decide_postprocessing(predictions, references, [1, 2])
    assert [s.kept for s in plan.steps] == [False, False, False]
    assert plan.kept == [] and plan.dice_after == plan.dice_before
    by_target = {s.target: s for s in plan.steps}
    assert by_target[1].after[1] < by_target[1].before[1]  # removing the true part would have hurt


def test_per_class_step_when_only_one_label_has_blobs():
    rng = np.random.default_rng(2)
    references, predictions = {}, {}
    for i in range(4):
        truth = _two_structures(rng)
        truth[2:6, 2:6, 2:6] = 1  # label 1 has two true parts: the all-foreground step must fail
        pred = truth.copy()
        pred[34:37, 34:37, 2:5] = 2  # stray blob of label 2 only
        references[f"c{i}"], predictions[f"c{i}"] = truth, pred
    plan = decide_postprocessing(predictions, references, [1, 2])
    assert [(s.target, s.kept) for s in plan.steps] == [((1, 2), False), (1, False), (2, True)]
    fns, kwargs = plan.nnunet_functions()
    assert kwargs == [{"labels_or_regions": 2}]


def test_largest_component_equals_nnunet_and_pickle_loads_in_nnunet(tmp_path):
    from nnunetv2.postprocessing.remove_connected_components import (
        apply_postprocessing, remove_all_but_largest_component_from_segmentation)

    rng = np.random.default_rng(3)
    for _ in range(5):
        seg = (rng.random((20, 21, 22)) < 0.3).astype(np.uint8) * rng.integers(1, 3, size=(20, 21, 22)).astype(np.uint8)
        for labels in (1, 2, [1, 2]):
            ours = keep_largest_component(seg, labels)
            theirs = remove_all_but_largest_component_from_segmentation(seg, labels)
            assert np.array_equal(ours, theirs)
    truth = _two_structures(rng)
    pred = truth.copy()
    pred[1:3, 1:3, 1:3] = 2
    plan = decide_postprocessing({"a": pred}, {"a": truth}, [1, 2])
    assert plan.kept
    path = plan.write(tmp_path)
    with open(path, "rb") as handle:
        fns, kwargs = pickle.load(handle)
    assert np.array_equal(apply_postprocessing(pred, fns, kwargs), plan.apply(pred))
    assert PostprocessingPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


def test_dice_is_nnunets():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[0, 0, :2] = 1
    pred = np.zeros_like(truth)
    pred[0, 0, 1:3] = 1
    assert dice_per_label(pred, truth, [1])[1] == pytest.approx(0.5)
    assert np.isnan(dice_per_label(pred, truth, [2])[2])  # absent from both: NaN, left out of the mean
    score = score_cases({"a": pred, "b": truth}, {"a": truth, "b": truth}, [1, 2])
    assert score.per_label[1] == pytest.approx(0.75) and np.isnan(score.per_label[2])
