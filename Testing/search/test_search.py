"""The search on the real hippocampus cases, on CPU with tiny budgets.

Budgets are chosen for a 2-core CPU: one or two training iterations per epoch, validation on one
or two cases, fidelities of 1..4 epochs. The Dice values are therefore meaningless; what is tested
is the machinery: rungs, promotions that resume, budgets, interruption and recovery, parallel
workers, results, report and the incumbent's model folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("neps")

from AutoNNUNetLib.events import read_events  # noqa: E402
from AutoNNUNetLib.states import TrialState  # noqa: E402
from AutoNNUNetLib.search import (  # noqa: E402
    EVENTS_NAME,
    RESULTS_NAME,
    SearchSettings,
    load_results,
    run_search,
)

PY = sys.executable
ENV = {**os.environ, "nnUNet_compile": "false"}


def _settings(**overrides):
    values = dict(space="hpo", min_epochs=1, max_epochs=2, eta=2, iterations_per_epoch=1,
                  max_validation_cases=1, device="cpu", seed=0)
    values.update(overrides)
    return SearchSettings.from_profile("quick", **values)


def _events(root: Path, offset: int = 0):
    return read_events(root / EVENTS_NAME, offset)


def _started(root: Path) -> Counter:
    events, _ = _events(root)
    return Counter(e.data["trial"] for e in events if e.kind == "trial_started")


def _wait_for(root: Path, predicate, offset: int, process: subprocess.Popen, timeout: float = 300.0):
    """Poll the events file until ``predicate(events since offset)`` holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        events, _ = _events(root, offset)
        found = predicate(events)
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError(f"search process exited early ({process.returncode}):\n"
                                 f"{process.stderr.read() if process.stderr else ''}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for search events")


def _neps_states(root: Path) -> dict[str, str]:
    """NePS's own state of every trial (its words: pending, evaluating, success, ...)."""
    from AutoNNUNetLib.search.neps_adapter import read_trials

    return {trial_id: trial.neps_state for trial_id, trial in read_trials(root).items()}


# ----------------------------------------------------------------------------------------------
# one real PriorBand search, shared by the tests that only read its results


@pytest.fixture(scope="module")
def searched(hippo_workspace, tmp_path_factory):
    """Regularized PriorBand, eta 2 over 1..4 epochs: one full bracket = 4 + 2 + 1 trials."""
    root = tmp_path_factory.mktemp("search") / "root"
    settings = _settings(min_epochs=1, max_epochs=4, eta=2, iterations_per_epoch=1, max_validation_cases=1,
                         max_trials=7)
    seen = []
    results = run_search(hippo_workspace, root, settings, progress=seen.append)
    return root, results, seen


def test_search_runs_rungs_and_resumes_promotions(searched):
    root, results, _ = searched
    assert results.state == "finished"
    assert results.rungs == {0: 1, 1: 2, 2: 4}
    trials = {t.trial_id: t for t in results.trials}
    assert len(trials) == 7 and all(t.state == TrialState.SUCCEEDED for t in trials.values())
    assert sorted(Counter(t.rung for t in trials.values()).items()) == [(0, 4), (1, 2), (2, 1)]

    promoted = [t for t in trials.values() if t.rung > 0]
    assert promoted, "nothing was promoted"
    for trial in promoted:
        lower = trials[trial.resumed_from]
        assert lower.config_id == trial.config_id and lower.rung == trial.rung - 1
        # only the extra epochs were trained, on top of the lower rung's checkpoint
        assert trial.epochs_trained == trial.epochs - lower.epochs
        record = json.loads((Path(trial.model_dir) / "autonnunet.json").read_text())
        assert record["folds"][0]["epochs"] == trial.epochs
        assert record["folds"][0]["epochs_trained"] == trial.epochs - lower.epochs
        assert trial.train_seconds >= lower.train_seconds  # cumulative over the rungs
    # every trial trained exactly once; the budget counts the epochs really trained
    assert set(_started(root).values()) == {1}
    assert results.budget["epochs_used"] == sum(t.epochs_trained for t in trials.values()) == 4 + 2 + 2
    assert results.budget["trials"] == 7


def test_results_table_incumbents_and_front(searched):
    root, results, _ = searched
    text = (root / RESULTS_NAME).read_text()
    assert "SAMPLING__" not in text and "ENVIRONMENT__" not in text  # plain names only
    stored = load_results(root)
    assert stored.incumbent == results.incumbent
    fields = set(stored.trials[0].config)
    assert {"optimizer", "initial_lr", "loss", "aug_factor", "encoder_type"} <= fields
    for trial in stored.trials:
        assert set(trial.dice_per_class) == {"Anterior", "Posterior"} or len(trial.dice_per_class) == 2
        assert trial.seconds_per_epoch > 0 and trial.inference_seconds > 0
    top = max(t.epochs for t in stored.trials)
    best = stored.best
    assert best.epochs == top
    assert best.mean_dice == max(t.mean_dice for t in stored.trials if t.epochs == top)
    any_best = stored.trial(stored.incumbent_any_fidelity)
    assert any_best.mean_dice == max(t.mean_dice for t in stored.trials)
    assert stored.pareto_front and set(stored.pareto_front) <= {t.trial_id for t in stored.trials}
    # the front contains the most accurate and the fastest-trained trial
    assert any_best.trial_id in stored.pareto_front
    fastest = min(stored.trials, key=lambda t: t.train_seconds)
    assert fastest.trial_id in stored.pareto_front


def test_incumbent_folder_predicts(searched, hippocampus_dir, tmp_path):
    from AutoNNUNetLib.dataset import Volume
    from AutoNNUNetLib.inference import Predictor

    root, results, _ = searched
    model_dir = Path(results.incumbent_model_dir)
    assert model_dir.parent == root / "incumbent"
    marker = json.loads((root / "incumbent" / "incumbent.json").read_text())
    assert marker["trial_id"] == results.incumbent
    assert (model_dir / "plans.json").is_file() and (model_dir / "fold_0" / "checkpoint_final.pth").is_file()
    image = sorted((hippocampus_dir / "imagesTr").glob("hippocampus_*.nii.gz"))[0]
    output = Predictor(model_dir, device="cpu").predict_file([image], tmp_path / "seg.nii.gz")
    label = Volume.read(output)
    assert label.array.shape == Volume.read(image).array.shape
    assert set(np.unique(label.array)) <= {0, 1, 2}


def test_progress_events(searched):
    root, _, seen = searched
    events, _ = _events(root)
    kinds = Counter(e.kind for e in events)
    assert kinds["trial_started"] == 7 and kinds["trial_finished"] == 7
    assert kinds["epoch"] >= 8 and kinds["best"] >= 1 and kinds["finished"] == 1
    progress = [e.data for e in events if e.kind == "progress"]
    assert progress and progress[-1]["fraction"] == pytest.approx(1.0)
    assert any(p.get("eta_seconds") is not None for p in progress)
    epoch = next(e.data for e in events if e.kind == "epoch")
    assert {"trial", "fold", "epoch", "loss"} <= set(epoch)
    # the caller's callback saw the same stream
    assert Counter(e.kind for e in seen)["trial_finished"] == 7


def test_report(searched, tmp_path):
    from AutoNNUNetLib.search.report import write_report

    root, results, _ = searched
    page = write_report(root, tmp_path / "report")
    html = page.read_text()
    for trial in results.trials:
        assert trial.trial_id in html
    for name in ("incumbent.png", "pareto.png", "curves.png"):
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert name in html


def test_final_retraining_on_chosen_folds(searched):
    from AutoNNUNetLib.search import retrain_incumbent

    root, results, _ = searched
    final = retrain_incumbent(root, folds=[1], max_validation_cases=1).final
    assert final["trial_id"] == results.incumbent and final["folds"] == [1]
    model = Path(final["model_dir"])
    assert model.parent == root / "final" and (model / "fold_1" / "checkpoint_final.pth").is_file()
    record = json.loads((model / "autonnunet.json").read_text())
    assert record["epochs"] == record["max_epochs"] == 4  # full fidelity
    assert record["config"] == results.best.config
    assert load_results(root).final == final


def test_rerun_of_a_spent_search_trains_nothing(searched):
    from AutoNNUNetLib.cli import main

    root, results, _ = searched
    before = _started(root)
    assert main(["search", "--root", str(root), "--quiet"]) == 0
    assert _started(root) == before
    assert load_results(root).incumbent == results.incumbent


def test_changing_what_is_searched_is_refused(searched, hippo_workspace):
    from AutoNNUNetLib.search import SearchError

    root, _, _ = searched
    with pytest.raises(SearchError, match="eta"):
        run_search(hippo_workspace, root, _settings(min_epochs=1, max_epochs=4, eta=3, iterations_per_epoch=1,
                                                   max_validation_cases=1, max_trials=7))


# ----------------------------------------------------------------------------------------------
# interruption, crash recovery, resume


def _cli_search(workspace, root: Path) -> subprocess.Popen:
    command = [PY, "-m", "AutoNNUNetLib", "search", "--workdir", str(workspace.root), "--root", str(root),
               "--profile", "quick", "--space", "hpo", "--min-epochs", "1", "--max-epochs", "2", "--eta", "2",
               "--iterations-per-epoch", "4", "--max-validation-cases", "1", "--max-trials", "5",
               "--device", "cpu", "--seed", "0", "--quiet"]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _trial_started(trial=None, attempt=None):
    def predicate(events):
        for event in events:
            if event.kind == "trial_started" and (trial is None or event.data["trial"] == trial) \
                    and (attempt is None or event.data["attempt"] == attempt):
                return event.data["trial"]
        return None

    return predicate


def _second_trial_started(events):
    """The trial started right after the first one finished (a bottom-rung trial)."""
    finished = next((i for i, e in enumerate(events) if e.kind == "trial_finished"), None)
    if finished is None:
        return None
    return _trial_started()(events[finished:])


def test_interrupt_kill_and_resume(hippo_workspace, tmp_path):
    root = tmp_path / "root"

    # 1. SIGTERM mid-trial: the worker stops cleanly and the trial goes back to pending.
    process = _cli_search(hippo_workspace, root)
    # Signals go out as soon as the event is seen: a trial of this profile lasts about a second
    # on a fast machine, so any extra wait could let it finish first. A signal that lands before
    # training starts is still "mid-trial" (the trial is already evaluating in NePS).
    victim = _wait_for(root, _second_trial_started, 0, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 3  # "stopped"
    states = _neps_states(root)
    assert states[victim] == "pending" and "evaluating" not in states.values()
    assert load_results(root).state == "stopped"

    # 2. SIGKILL mid-trial (the retry of the same trial): NePS leaves it "evaluating".
    offset = (root / EVENTS_NAME).stat().st_size
    process = _cli_search(hippo_workspace, root)
    _wait_for(root, _trial_started(victim, attempt=1), offset, process)
    process.kill()
    process.wait(timeout=60)
    assert _neps_states(root)[victim] == "evaluating"

    # 3. Resume: the abandoned trial is reset and retried (attempt 2); kill that worker too.
    offset = (root / EVENTS_NAME).stat().st_size
    process = _cli_search(hippo_workspace, root)
    _wait_for(root, _trial_started(victim, attempt=2), offset, process)
    process.kill()
    process.wait(timeout=60)

    # 4. Resume in-process: the trial whose worker died twice is recorded failed, the rest runs.
    results = run_search(None, root)
    assert results.state == "finished"
    states = _neps_states(root)
    assert "evaluating" not in states.values() and "pending" not in states.values()
    trials = {t.trial_id: t for t in results.trials}
    assert len(trials) == 5
    assert trials[victim].state == "failed" and "died" in trials[victim].error
    successes = [t for t in trials.values() if t.state == TrialState.SUCCEEDED]
    assert len(successes) == 4

    # Nothing finished was trained twice; the interrupted/killed trial ran 3 times, then failed.
    started = _started(root)
    assert started[victim] == 3
    assert all(started[t.trial_id] == 1 for t in successes)
    for trial in successes:
        if trial.resumed_from:
            assert trial.epochs_trained == trial.epochs - trials[trial.resumed_from].epochs
    assert any(t.resumed_from for t in successes)
    # Budget: epochs of finished trials only; failed ones count as trials.
    assert results.budget["epochs_used"] == sum(t.epochs_trained for t in successes)
    assert results.budget["trials"] == 5


# ----------------------------------------------------------------------------------------------
# parallel workers


def test_two_workers_share_one_root(hippo_workspace, tmp_path):
    root = tmp_path / "root"
    settings = _settings(max_trials=4, workers=2, launcher="submitit", executor="local")
    results = run_search(hippo_workspace, root, settings)
    assert results.state == "finished"
    trials = results.trials
    assert len(trials) == 4 and all(t.state == TrialState.SUCCEEDED for t in trials)
    started = _started(root)
    assert sorted(started) == sorted(t.trial_id for t in trials)
    assert set(started.values()) == {1}  # no trial evaluated twice
    assert len({t.worker for t in trials}) == 2  # both workers took trials
    # the same configuration is never sampled twice at one rung
    keys = [(json.dumps(t.config, sort_keys=True), t.rung) for t in trials]
    assert len(set(keys)) == len(keys)
    assert (root / "submitit").is_dir()


# ----------------------------------------------------------------------------------------------
# failing trials


def test_failing_trials_are_recorded_and_the_search_goes_on(hippo_workspace, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to make every trial fail")
    root = tmp_path / "root"
    results = run_search(hippo_workspace, root, _settings(max_trials=3, device="cuda"))
    assert results.state == "finished"
    assert len(results.trials) == 3
    for trial in results.trials:
        assert trial.state in ("crashed", "failed")
        assert "CUDA" in trial.error
    assert results.incumbent is None and results.budget["epochs_used"] == 0


# ----------------------------------------------------------------------------------------------
# wall-clock budget


def test_wall_clock_limit_requeues_the_running_trial(hippo_workspace, tmp_path):
    root = tmp_path / "root"
    start = time.time()
    results = run_search(hippo_workspace, root, _settings(wall_time=20.0))
    assert time.time() - start < 20.0 + 90.0  # stopped at the limit, not after a budget of trials
    assert results.state == "finished"  # the wall-clock budget is a normal end
    states = _neps_states(root)
    assert "evaluating" not in states.values()
    assert "pending" in states.values()  # the trial cut by the limit waits for the next run
    events, _ = _events(root)
    assert any("wall-clock limit" in str(e.data.get("message", "")) for e in events)

    # Resume in the same process (as a job server would) with one more trial of budget: the cut
    # trial is trained first.
    cut = [trial_id for trial_id, state in states.items() if state == "pending"]
    done = len(states) - len(cut)
    results = run_search(hippo_workspace, root, _settings(wall_time=600.0, max_trials=done + 1))
    assert results.trial(cut[0]).state == TrialState.SUCCEEDED


# ----------------------------------------------------------------------------------------------
# one command from a source folder


def test_search_straight_from_a_source_folder(hippocampus_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "remote"))
    from test_server import make_subset  # the one helper that cuts an MSD task folder

    source = make_subset(hippocampus_dir, tmp_path / "Task04_Hippocampus", 6)
    work, root = tmp_path / "work", tmp_path / "root"
    command = [PY, "-m", "AutoNNUNetLib", "search", "--source", str(source), "--workdir", str(work),
               "--root", str(root), "--profile", "quick", "--space", "hpo", "--min-epochs", "1", "--max-epochs", "2",
               "--iterations-per-epoch", "1", "--max-validation-cases", "1", "--max-trials", "1",
               "--device", "cpu", "--seed", "0", "--quiet"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # The dataset was built from the folder and planned, then searched.
    raw = work / "nnUNet_raw" / "Dataset001_Hippocampus"
    assert len(list((raw / "labelsTr").glob("*.nii.gz"))) == 6
    assert (work / "nnUNet_preprocessed" / "Dataset001_Hippocampus" / "nnUNetPlans.json").is_file()
    results = load_results(root)
    assert len(results.trials) == 1 and results.trials[0].state == TrialState.SUCCEEDED
    # Rerunning the same command neither rebuilds the dataset nor trains again.
    stamp = (raw / "dataset.json").stat().st_mtime_ns
    again = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (raw / "dataset.json").stat().st_mtime_ns == stamp
    assert len(load_results(root).trials) == 1 and _started(root) == {results.trials[0].trial_id: 1}
    # --source without --workdir is a clear error.
    bad = subprocess.run([PY, "-m", "AutoNNUNetLib", "search", "--source", str(source), "--root", str(tmp_path / "r2")],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--source needs --workdir" in bad.stderr
