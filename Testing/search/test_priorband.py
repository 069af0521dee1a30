"""Regularized PriorBand against NePS's PriorBand on simulated trial results (no training)."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest

pytest.importorskip("neps")

from neps.optimizers.algorithms import neps_priorband  # noqa: E402
from neps.state.trial import Trial  # noqa: E402

from AutoNNUNetLib.search.priorband import (  # noqa: E402
    RegularizedPriorBand,
    incumbent_scores,
    pareto_ranks,
    promotion_scores,
)
from AutoNNUNetLib.search.space import build_space, config_from_neps  # noqa: E402

SPACE = build_space("hpo_nas", min_epochs=1, max_epochs=9)  # eta 3: rungs 1, 3, 9 epochs


def _trial(trial_id, config, previous, loss, seconds_per_epoch):
    trial = Trial.new(trial_id=trial_id, location=f"/nonexistent/{trial_id}", config=config,
                      previous_trial=previous, previous_trial_location=None, time_sampled=time.time(),
                      worker_id="sim")
    trial.set_evaluating(time_started=time.time(), worker_id="sim")
    trial.report = trial.set_complete(
        report_as="success", time_end=time.time(), objective_to_minimize=float(loss), cost=1.0,
        learning_curve=None, err=None, tb=None, extra={"seconds_per_epoch": float(seconds_per_epoch)},
        evaluation_duration=1.0)
    return trial


def _synthetic(config, epochs):
    """A smooth made-up response: the default learning rate is best, longer training helps, and
    wider/deeper networks are slower per epoch."""
    loss = 0.15 + 0.08 * abs(math.log10(config.initial_lr) + 2) + 0.4 / epochs + 0.02 * config.dropout_rate
    seconds = config.base_num_features / 32.0 * (1.0 + config.model_scale) * (1.5 if config.encoder_type == "residual" else 1.0)
    return loss, seconds


def _simulate(optimizer, seed, steps, *, equal_runtime=False):
    """Ask -> evaluate synthetically -> tell, ``steps`` times; return the decisions taken."""
    random.seed(seed)
    np.random.seed(seed)
    trials = {}
    decisions = []
    for _ in range(steps):
        sampled = optimizer(trials, None)
        config, epochs = config_from_neps(SPACE, sampled.config)
        loss, seconds = _synthetic(config, epochs)
        if equal_runtime:
            seconds = 1.0
        trials[sampled.id] = _trial(sampled.id, sampled.config, sampled.previous_config_id, loss, seconds)
        decisions.append((sampled.id, sampled.previous_config_id, dict(sampled.config)))
    return decisions


def test_pareto_helpers():
    points = [(0.2, 5.0), (0.2, 3.0), (0.1, 9.0), (0.3, 1.0), (0.3, 4.0)]
    assert pareto_ranks(points) == [1, 0, 0, 0, 1]
    scores = promotion_scores(points)
    # rank first, then loss: (0.2, 3) and (0.1, 9) and (0.3, 1) are the front, ordered by loss
    order = sorted(range(len(points)), key=scores.__getitem__)
    assert order[:3] == [2, 1, 3]
    # weight 0 picks the most accurate front point; weight 1 the best normalised product
    assert int(np.argmin(incumbent_scores(points, 0.0))) == 2
    assert int(np.argmin(incumbent_scores(points, 1.0))) == 1


def test_weight_zero_is_plain_priorband():
    """Same seeds and results -> the same samples and promotions, step for step."""
    plain = _simulate(neps_priorband(SPACE, eta=3), seed=7, steps=45)
    regularized = _simulate(RegularizedPriorBand(SPACE, eta=3, runtime_weight=0.0), seed=7, steps=45)
    assert regularized == plain
    promotions = [d for d in plain if d[1] is not None]
    assert len(promotions) >= 5 and any(d[0].endswith("_rung_2") for d in promotions)


def test_positive_weight_with_equal_runtimes_is_plain_priorband():
    """With every trial equally fast the Pareto order is the loss order: no behaviour change."""
    plain = _simulate(neps_priorband(SPACE, eta=3), seed=3, steps=45)
    regularized = _simulate(RegularizedPriorBand(SPACE, eta=3, runtime_weight=1.0), seed=3, steps=45,
                            equal_runtime=True)
    assert regularized == plain


def test_positive_weight_changes_decisions_on_real_runtimes():
    changed = 0
    for seed in (5, 6, 7):
        plain = _simulate(RegularizedPriorBand(SPACE, eta=3, runtime_weight=0.0), seed=seed, steps=60)
        regularized = _simulate(RegularizedPriorBand(SPACE, eta=3, runtime_weight=1.0), seed=seed, steps=60)
        changed += regularized != plain
    assert changed >= 1


def _bottom_rung(optimizer, losses_and_times):
    """Fill the first bracket's bottom rung (9 configs at 1 epoch) with constructed results."""
    random.seed(0)
    np.random.seed(0)
    trials = {}
    for loss, seconds in losses_and_times:
        sampled = optimizer(trials, None)
        assert sampled.previous_config_id is None and sampled.id.endswith("_rung_0")
        trials[sampled.id] = _trial(sampled.id, sampled.config, None, loss, seconds)
    return trials


@pytest.mark.parametrize("weight", [0.5, 1.0, 3.0])
def test_faster_config_of_equal_dice_is_promoted(weight):
    # config 1 and config 2 reach the same Dice; config 1 (lower id, so PriorBand's tie-break) is
    # three times slower per epoch. Everything else is clearly worse.
    results = [(0.30, 30.0), (0.30, 10.0)] + [(0.50 + 0.01 * i, 20.0) for i in range(7)]
    plain = neps_priorband(SPACE, eta=3)
    promoted_plain = plain(_bottom_rung(plain, results), None)
    assert promoted_plain.previous_config_id == "1_rung_0"  # plain PriorBand ignores runtime

    regularized = RegularizedPriorBand(SPACE, eta=3, runtime_weight=weight)
    trials = _bottom_rung(regularized, results)
    promoted = regularized(trials, None)
    assert promoted.id == "2_rung_1" and promoted.previous_config_id == "2_rung_0"

    # The slower one is still promoted next: it is second in (Pareto rank, loss) order.
    trials[promoted.id] = _trial(promoted.id, promoted.config, promoted.previous_config_id, 0.25, 10.0)
    second = regularized(trials, None)
    assert second.previous_config_id == "1_rung_0"


def test_slower_config_promoted_only_when_more_accurate():
    # config 1 is slower but clearly better: Pareto-optimal, and first by loss within rank 0.
    results = [(0.20, 30.0), (0.30, 10.0)] + [(0.50 + 0.01 * i, 20.0) for i in range(7)]
    regularized = RegularizedPriorBand(SPACE, eta=3, runtime_weight=1.0)
    promoted = regularized(_bottom_rung(regularized, results), None)
    assert promoted.previous_config_id == "1_rung_0"


def test_incumbent_prefers_fast_pareto_point():
    results = [(0.30, 30.0), (0.31, 5.0)] + [(0.50 + 0.01 * i, 20.0) for i in range(7)]
    regularized = RegularizedPriorBand(SPACE, eta=3, runtime_weight=1.0)
    trials = _bottom_rung(regularized, results)
    assert regularized.incumbent(trials) == "2_rung_0"
    assert RegularizedPriorBand(SPACE, eta=3, runtime_weight=0.0).incumbent(trials) == "1_rung_0"


def test_failed_trials_are_never_promoted():
    results = [(0.30, 30.0), (0.30, 10.0)] + [(0.50 + 0.01 * i, 20.0) for i in range(7)]
    regularized = RegularizedPriorBand(SPACE, eta=3, runtime_weight=1.0)
    trials = _bottom_rung(regularized, results)
    failed = trials["2_rung_0"]
    failed.report.objective_to_minimize = None  # what NePS stores for a crashed trial
    promoted = regularized(trials, None)
    assert promoted.previous_config_id == "1_rung_0"


def test_invalid_settings():
    with pytest.raises(ValueError):
        RegularizedPriorBand(SPACE, runtime_weight=-1)
    with pytest.raises(ValueError):
        RegularizedPriorBand(SPACE, base="asha")
