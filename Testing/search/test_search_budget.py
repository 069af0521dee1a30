"""A real (tiny) search with a budget in F: never the same training twice, the final model at F,
the confirmation fold, and what the events say (through the same fold the CLI and Slicer use).

F = 4 epochs of 1 iteration, rungs 1/2/4 (eta 2), budget 3 F = 12 epochs, the prior trained to F
first (it validates at 1 and 2 epochs on the way). The probe is given (no timing here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("neps")

from AutoNNUNetLib.config import TrialConfig  # noqa: E402
from AutoNNUNetLib.events import read_events  # noqa: E402
from AutoNNUNetLib.search import EVENTS_NAME, SearchSettings, load_results, run_search  # noqa: E402
from AutoNNUNetLib.search.budget import Probe  # noqa: E402
from AutoNNUNetLib.states import TrialState  # noqa: E402

PROBE = Probe(seconds_per_iteration=0.5, seconds_per_validation=1.0, device="cpu")
DEFAULT = TrialConfig().to_dict()


def _settings(**overrides):
    values = dict(space="hpo", profile="quick", min_epochs=1, max_epochs=4, eta=2, iterations_per_epoch=1,
                  max_validation_cases=1, device="cpu", seed=0, budget=3.0, max_trials=6, confirm_fold=1,
                  confirm_seeds=2, prior_confidence="high")
    values.update(overrides)
    return SearchSettings(**values)


@pytest.fixture(scope="module")
def budget_search(hippo_workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("budget") / "root"
    seen = []
    results = run_search(hippo_workspace, root, _settings(), progress=seen.append, probe=PROBE)
    return root, results, seen


def _trained_epochs(root: Path) -> int:
    events, _ = read_events(root / EVENTS_NAME)
    return sum(1 for e in events if e.kind == "epoch" and not str(e.data.get("trial", "")).startswith(("confirm", "final")))


def test_prior_trained_once_validated_on_the_way(budget_search):
    root, results, _ = budget_search
    prior = results.trials[0]
    assert prior.config == DEFAULT and prior.epochs == 4 and prior.epochs_trained == 4
    assert [v["epochs"] for v in prior.validations] == [1, 2, 4]  # the rungs passed on the way
    # every other sample of the default reused that run: nothing trained, the same Dice
    again = [t for t in results.trials[1:] if t.config == DEFAULT and t.state == TrialState.SUCCEEDED]
    for trial in again:
        assert trial.reused_from == prior.trial_id and trial.epochs_trained == 0
        expected = next(v for v in prior.validations if v["epochs"] == trial.epochs)
        assert trial.mean_dice == expected["mean_dice"]
    # the epochs counted are the epochs trained (events), and fit the budget
    assert results.budget["epochs_used"] == _trained_epochs(root)
    assert results.budget["cost_f"] <= 3.0 + 1e-9


def test_a_resample_of_a_trained_configuration_trains_nothing(budget_search, hippo_workspace):
    """The trial runner given the default at lower rungs again (as PriorBand would sample it)."""
    from AutoNNUNetLib.search.run import make_space
    from AutoNNUNetLib.search.space import neps_config_from_trial, resolve_values
    from AutoNNUNetLib.search.trial import TrialRunner

    root, results, _ = budget_search
    settings = _settings()
    runner = TrialRunner(workspace_root=str(hippo_workspace.root), dataset_name=hippo_workspace.require_dataset(),
                         root=str(root), settings=settings, worker_id="test:0:0", session_start=0.0,
                         rung_epochs=[1, 2, 4], epoch_cap=10)
    before = load_results(root).budget["epochs_used"]
    space = make_space(settings, hippo_workspace)
    prior = results.trials[0]
    for epochs in (1, 2, 4):
        values = resolve_values(space, neps_config_from_trial("hpo", TrialConfig(), epochs, min_epochs=1, max_epochs=4))
        out = runner(root / "extra" / f"config_9{epochs}_rung_0", None, f"9{epochs}_rung_0", **values)
        expected = next(v for v in prior.validations if v["epochs"] == epochs)
        assert out["cost"] == 0.0 and out["info_dict"]["reused_from"] == prior.trial_id
        assert out["objective_to_minimize"] == pytest.approx(1.0 - expected["mean_dice"])
    assert load_results(root).budget["epochs_used"] == before


def test_final_model_reaches_f_with_the_prefix_exact_schedule(budget_search):
    import torch

    from AutoNNUNetLib.nnunet_trainer import SCHEDULES

    root, results, _ = budget_search
    final = results.final
    assert final["epochs"] == 4 and final["mean_dice"] is not None
    assert final["default_dice"] == results.trials[0].mean_dice  # the default at F, beside it
    model = Path(final["model_dir"])
    record = json.loads((model / "autonnunet.json").read_text())
    assert record["epochs"] == record["max_epochs"] == 4
    config = TrialConfig.from_dict(final["config"])
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 4
    # the last epoch ran at the schedule's lr for epoch 3 of a 4-epoch schedule (not of a shorter one)
    expected = SCHEDULES[config.lr_scheduler](None, config.initial_lr, 4).lr_at(3)
    assert checkpoint["optimizer_state"]["param_groups"][0]["lr"] == pytest.approx(expected)
    if "resumed_from_epoch" in final:  # continued from its rung's checkpoint: only the missing epochs
        assert final["epochs_trained"] == 4 - final["resumed_from_epoch"] > 0
    # the incumbent folder holds the final model
    assert Path(results.incumbent_model_dir).parent == root / "incumbent"
    assert results.budget["cost_f"] <= 3.0 + 1e-9


def test_confirmation_on_an_unused_fold(budget_search):
    root, results, _ = budget_search
    confirmation = results.confirmation
    assert confirmation["fold"] == 1 and confirmation["seeds"] == 2
    for name in ("incumbent", "default"):
        entry = confirmation[name]
        assert len(entry["dice"]) == 2 and entry["mean"] == pytest.approx(sum(entry["dice"]) / 2)
        assert entry["spread"] >= 0.0
    assert (root / "confirm" / "incumbent_seed1").is_dir()


def test_events_fold_into_succeeded_trials_with_their_dice(budget_search):
    from AutoNNUNetLib.progress import SearchProgress

    root, results, seen = budget_search
    events, _ = read_events(root / EVENTS_NAME)
    estimate = next(e for e in events if e.kind == "stage" and e.data.get("name") == "estimate")
    assert estimate.data["budget_f"] == 3.0 and "1 F = " in estimate.data["message"]
    progress = SearchProgress().update_all(events)
    succeeded = {t.trial_id: t for t in results.trials if t.state == TrialState.SUCCEEDED}
    points = {p.trial: p for p in progress.points()}
    for trial_id, trial in succeeded.items():
        assert points[trial_id].state == TrialState.SUCCEEDED
        assert points[trial_id].dice == pytest.approx(trial.mean_dice)
    assert "failed" not in progress.status_text().lower() or progress.trials_failed == 0
    assert progress.best_dice is not None


def test_a_resumed_budget_search_stays_within_it(budget_search, hippo_workspace):
    root, results, _ = budget_search
    before = _trained_epochs(root)
    again = run_search(hippo_workspace, root, _settings(max_trials=20), probe=PROBE)
    assert again.budget["cost_f"] <= 3.0 + 1e-9
    assert again.budget["epochs_used"] + again.budget["final_epochs"] <= 12
    assert _trained_epochs(root) - before <= 12 - results.budget["epochs_used"] - results.budget["final_epochs"]
