"""The budget in units of F: its plan fits N x F, and the estimate before start scales with the probe."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from AutoNNUNetLib.search.budget import Probe, estimate_search, plan_budget, probe_cost
from AutoNNUNetLib.search.settings import SearchError, SearchSettings


@pytest.mark.parametrize("budget", [2.0, 3.0, 4.0, 7.5, 22.0])
@pytest.mark.parametrize("min_epochs, max_epochs, eta", [(10, 1000, 3), (3, 12, 2), (1, 9, 3), (2, 20, 2), (5, 300, 4)])
@pytest.mark.parametrize("prior_first", [True, False])
def test_plan_fits_n_times_f(budget, min_epochs, max_epochs, eta, prior_first):
    plan = plan_budget(budget, min_epochs, max_epochs, eta, prior_first=prior_first)
    assert plan.total_epochs == int(budget * max_epochs)
    # the trials and the final model's continuation to F fit the budget together
    assert plan.planned_epochs <= plan.search_epochs
    assert plan.search_epochs + plan.final_reserve == plan.total_epochs
    below = [e for e in plan.rungs.values() if e < max_epochs]
    assert plan.final_reserve == max_epochs - max(below)
    assert max(plan.rungs.values()) == max_epochs and min(plan.rungs.values()) >= min_epochs
    assert plan.trials_per_rung[min(plan.rungs)] >= 1
    if prior_first:
        assert plan.trials_per_rung[max(plan.rungs)] >= 1 and plan.prior_epochs == max_epochs
    # a larger budget never plans fewer trials
    bigger = plan_budget(budget * 2, min_epochs, max_epochs, eta, prior_first=prior_first)
    assert sum(bigger.trials_per_rung.values()) >= sum(plan.trials_per_rung.values())


def test_too_small_a_budget_is_refused_before_anything_runs():
    with pytest.raises(SearchError, match="budget: 1 F does not fit"):
        plan_budget(1.0, 10, 1000, 3, prior_first=True)


def _fake_trainer(delay: float):
    """A trainer that takes ``delay`` seconds per iteration and as long per validated case."""
    def train(workspace, config, output_dir, *, folds, epochs, iterations_per_epoch, progress=None, **_):
        for epoch in range(epochs):
            time.sleep(delay * iterations_per_epoch)
            if progress is not None:
                progress(SimpleNamespace(kind="epoch", data={"seconds": delay * iterations_per_epoch, "epoch": epoch + 1}))
        time.sleep(delay)
        fold = SimpleNamespace(validation_seconds=delay, epochs_trained=epochs)
        return SimpleNamespace(folds=[fold], train_seconds=delay * iterations_per_epoch * epochs, mean_dice=0.5)
    return train


def test_estimate_scales_linearly_with_a_slow_probe(tmp_path, capsys):
    workspace = SimpleNamespace(root=tmp_path, load_dataset_json=lambda: {"numTraining": 60})
    settings = SearchSettings(min_epochs=3, max_epochs=12, eta=2, iterations_per_epoch=25, max_validation_cases=4,
                              budget=4, device="cpu")
    estimates = []
    for delay in (0.002, 0.004, 0.008):
        probe = probe_cost(workspace, settings, trainer=_fake_trainer(delay))
        assert probe.seconds_per_iteration == pytest.approx(delay, rel=1e-6)
        estimates.append(estimate_search(workspace, settings, probe=probe))
    ratios = [e.estimated_seconds / estimates[0].estimated_seconds for e in estimates]
    assert ratios == pytest.approx([1.0, 2.0, 4.0], rel=1e-6)
    per_f = [e.seconds_per_f for e in estimates]
    assert per_f[1] == pytest.approx(2 * per_f[0]) and per_f[2] == pytest.approx(4 * per_f[0])
    # 1 F = 12 epochs x 25 iterations at the probe's pace, plus one validation of 4 cases
    assert per_f[0] == pytest.approx(12 * 25 * 0.002 + 4 * 0.002)
    text = estimates[0].text
    assert text.startswith("about ") and "on cpu; 1 F = " in text and "budget 4 F" in text
    data = estimates[0].event_data()
    assert data["name"] == "estimate" and data["estimated_seconds"] == estimates[0].estimated_seconds


def test_estimate_of_a_probe_given(tmp_path):
    settings = SearchSettings(min_epochs=10, max_epochs=1000, eta=3, iterations_per_epoch=250, budget=4)
    probe = Probe(seconds_per_iteration=0.01, seconds_per_validation=10.0, device="cuda:0")
    estimate = estimate_search(None, settings, probe=probe)
    assert estimate.seconds_per_f == pytest.approx(1000 * 250 * 0.01 + 10.0)
    assert "on cuda:0; 1 F = 41m 50s" in estimate.text
