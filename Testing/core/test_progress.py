"""The one progress fold (AutoNNUNetLib.progress) that the CLI, the server and the Slicer module show.

A real tiny search folded by the same code (no hand-written events) is in
Testing/slicer/test_slicer_progress.py: the Slicer module starts it exactly as the panel does.
"""

from __future__ import annotations

import pytest

from AutoNNUNetLib.events import EventWriter, ProgressEvent
from AutoNNUNetLib.progress import (
    ProgressReader,
    SearchProgress,
    TrialPoint,
    format_duration,
    format_event,
    pareto_points,
    trial_state,
)
from AutoNNUNetLib.states import TrialState


def test_format_duration():
    assert [format_duration(s) for s in (45, 723, 11100, None, -1, float("nan"), "x")] == [
        "45s", "12m 03s", "3h 05m", "", "", "", ""]


def test_trial_state_reads_every_spelling():
    assert trial_state("succeeded") is TrialState.SUCCEEDED
    assert trial_state("success") is TrialState.SUCCEEDED  # what older searches wrote
    assert trial_state(None) is TrialState.SUCCEEDED and trial_state("SUCCEEDED") is TrialState.SUCCEEDED
    assert trial_state("crashed") is TrialState.CRASHED and trial_state("running") is TrialState.EVALUATING
    assert trial_state("submitted") is TrialState.PENDING and trial_state("corrupted") is TrialState.CRASHED
    assert trial_state("exploded") is TrialState.FAILED  # never silently a success


def test_fold_formats_counts_and_finishes():
    events = [
        ProgressEvent("stage", {"name": "search", "message": "starting"}),
        ProgressEvent("trial_started", {"trial": "1_0", "rung": 0, "epochs": 12}),
        ProgressEvent("epoch", {"trial": "1_0", "fold": 0, "epoch": 6, "max_epochs": 12, "loss": 0.51234, "seconds": 3.2}),
        ProgressEvent("trial_finished", {"trial": "1_0", "rung": 0, "epochs": 12, "dice": 0.7, "train_seconds": 600,
                                         "dice_per_class": {"A": 0.8, "B": 0.6}, "state": "succeeded"}),
        ProgressEvent("trial_started", {"trial": "2_0", "rung": 0, "epochs": 12}),
        ProgressEvent("trial_finished", {"trial": "2_0", "epochs": 12, "state": "failed", "error": "CUDA out of memory"}),
        ProgressEvent("trial_started", {"trial": "1_1", "rung": 1, "epochs": 37}),
        ProgressEvent("trial_finished", {"trial": "1_1", "rung": 1, "epochs": 37, "dice": 0.82, "train_seconds": 1900}),
        ProgressEvent("progress", {"fraction": 0.25, "eta_seconds": 3725, "message": "budget 25% used"}),
    ]
    state = SearchProgress()
    lines = []
    for event in events:
        state.update(event)
        lines.append(format_event(event))
    assert lines[0] == "[search] starting"
    assert lines[1] == "Trial 1_0 started (rung 0, 12 epochs)"
    assert lines[2] == "Trial 1_0 fold 0 epoch 6/12 loss 0.5123 (3s)"
    assert lines[3] == "Trial 1_0 finished: Dice 0.7000 after 12 epochs, training 10m 00s (A 0.8000, B 0.6000)"
    assert lines[5] == "Trial 2_0 failed: CUDA out of memory"
    assert lines[8] == "budget 25% used - 25% - ETA 1h 02m"
    assert (state.best_dice, state.best_trial, state.best_text()) == (0.82, "1_1", "0.8200 (trial 1_1)")
    assert state.percent() == 25 and state.loss == pytest.approx(0.51234)
    assert state.status_text() == "Trial 1_1 (rung 1, 37 epochs), ETA 1h 02m"
    assert [(p.trial, p.epochs, p.dice) for p in state.finished_points()] == [("1_0", 12, 0.7), ("1_1", 37, 0.82)]
    assert (state.trials_started, state.trials_finished, state.trials_failed) == (3, 2, 1)
    assert state.trials["2_0@12"].state is TrialState.FAILED and state.trials["2_0@12"].error == "CUDA out of memory"
    summary = state.to_dict()
    assert summary["best_dice"] == 0.82 and summary["trials_finished"] == 2 and summary["eta_seconds"] == 3725
    state.update(ProgressEvent("finished", {"state": "succeeded", "message": "budget spent"}))
    assert state.status_text() == "Finished (succeeded): budget spent"
    assert state.percent() == 100


def test_legacy_success_state_is_a_succeeded_trial_with_its_dice():
    state = SearchProgress().update_all([
        ProgressEvent("trial_started", {"trial": "1_rung_0", "rung": 0, "epochs": 1}),
        ProgressEvent("trial_finished", {"trial": "1_rung_0", "rung": 0, "epochs": 1, "dice": 0.4,
                                         "train_seconds": 5.0, "state": "success"}),
    ])
    assert format_event(ProgressEvent("trial_finished", {"trial": "1_rung_0", "dice": 0.4, "state": "success"})) \
        == "Trial 1_rung_0 finished: Dice 0.4000"
    assert state.trials["1_rung_0@1"].state is TrialState.SUCCEEDED and state.best_dice == 0.4
    assert [p.trial for p in state.finished_points()] == ["1_rung_0"]


def test_restarted_trial_is_one_point_and_a_late_reader_still_scores_it():
    state = SearchProgress()
    for _ in range(2):  # NePS re-runs an interrupted trial under the same id
        state.update(ProgressEvent("trial_started", {"trial": "2_rung_0", "rung": 0, "epochs": 3}))
    assert state.trials_started == 1
    # A recovery marks a trial failed without knowing its epochs: the running point is the one.
    state.update(ProgressEvent("trial_finished", {"trial": "2_rung_0", "state": "failed", "error": "worker died"}))
    assert list(state.trials) == ["2_rung_0@3"] and state.trials_failed == 1
    # Attached after the trial started: a finish alone still makes a point.
    state.update(ProgressEvent("trial_finished", {"trial": "3_rung_0", "epochs": 3, "dice": 0.5, "train_seconds": 9}))
    assert state.trials["3_rung_0@3"].scored and state.best_trial == "3_rung_0"


def test_pareto_points_are_the_front_sorted_by_time():
    def point(name, seconds, dice, state=TrialState.SUCCEEDED):
        return TrialPoint(trial=name, epochs=1, state=state, dice=dice, train_seconds=seconds)

    points = [point("a", 100.0, 0.80), point("b", 50.0, 0.70), point("c", 200.0, 0.85), point("d", 120.0, 0.75),
              point("e", 50.0, 0.60), point("f", 300.0, 0.85), point("g", 10.0, 0.99, TrialState.FAILED)]
    assert [p.trial for p in pareto_points(points)] == ["b", "a", "c"]
    assert pareto_points([]) == []


def test_reader_follows_a_file_and_waits_for_a_partial_line(tmp_path):
    path = tmp_path / "events.jsonl"
    write = EventWriter(path)
    reader = ProgressReader(path)
    assert reader.poll() == []  # no file yet
    write(ProgressEvent("trial_started", {"trial": "1_rung_0", "rung": 0, "epochs": 1}))
    write(ProgressEvent("epoch", {"trial": "1_rung_0", "epoch": 1, "max_epochs": 9, "loss": 0.5}))
    assert len(reader.poll()) == 2
    p = reader.progress
    assert (p.trial, p.rung, p.epoch, p.max_epochs) == ("1_rung_0", 0, 1, 9)
    write(ProgressEvent("best", {"trial": "1_rung_0", "dice": 0.7}))
    with open(path, "a") as handle:
        handle.write('{"kind": "epoch", "data": {"ep')
    assert [e.kind for e in reader.poll()] == ["best"]
    assert p.best_dice == pytest.approx(0.7) and reader.offset < path.stat().st_size
