"""A real tiny search, started and watched the way the Slicer module's panel does it.

AutoNNUNetSlicerLib.jobs starts the search as a local job (the child reads the module's one
search record from a request file), the module's JobBoard polls it, and the one progress fold
(AutoNNUNetLib.progress.SearchProgress, also used by the CLI and the server) turns its real
events into trial points, best Dice and status text; the chart logic turns those into the two
scatter series. No event is written by hand: a producer/consumer mismatch (the search once wrote
``"success"`` where every consumer looked for ``"succeeded"``) fails here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from AutoNNUNetLib.progress import ProgressReader, TrialPoint, format_event
from AutoNNUNetLib.states import JobState, TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "AutoNNUNet"))
from AutoNNUNetSlicerLib import chart, parameters  # noqa: E402
from AutoNNUNetSlicerLib import jobs as modulejobs  # noqa: E402

#: The panel's values for a tiny CPU search: quick profile, 3 trials of 1-2 tiny epochs.
PANEL = {"searchSpace": "HPO", "profile": "quick", "totalEpochs": 0, "wallTimeHours": 0.0, "maxTrials": 3,
         "minEpochs": 1, "maxEpochs": 2, "folds": "0", "iterationsPerEpoch": 1, "priorFirst": False,
         "runtimeWeight": 1.0, "device": "cpu"}


def test_chart_series_are_scatter_plots_and_the_front_is_sorted_by_time():
    assert {style.plot_type for style in chart.SERIES} == {"Scatter"}  # a line series ignores the X column
    assert chart.TRIALS_STYLE.line_style == "None"  # trials are not a sequence: no zig-zag line
    points = [TrialPoint("a", epochs=1, state=TrialState.SUCCEEDED, dice=0.8, train_seconds=600.0),
              TrialPoint("b", epochs=1, state=TrialState.SUCCEEDED, dice=0.7, train_seconds=60.0),
              TrialPoint("c", epochs=1, state=TrialState.SUCCEEDED, dice=0.6, train_seconds=120.0),
              TrialPoint("d", epochs=1, state=TrialState.FAILED, error="diverged"),
              TrialPoint("e", epochs=1, state=TrialState.EVALUATING)]
    data = chart.chart_data(points)
    assert data.trial_minutes == [10.0, 1.0, 2.0] and data.trial_dice == [0.8, 0.7, 0.6]
    assert data.front_trials == ["b", "a"] and data.front_minutes == [1.0, 10.0]
    assert chart.chart_data([points[3]]).empty


@pytest.fixture(scope="module")
def module_search(hippo_workspace, tmp_path_factory):
    """The search as the panel starts it, polled by the module's JobBoard until it ends."""
    pytest.importorskip("neps")
    work_dir = tmp_path_factory.mktemp("slicer_work")
    # The panel's working folder holds the exported dataset; the session's planned workspace is
    # reused read-only through its folders (the search writes only below its root).
    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        os.symlink(Path(hippo_workspace.root) / name, work_dir / name)
    settings = parameters.search_settings(PANEL)
    env = modulejobs.child_environment(extra={"nnUNet_n_proc_DA": "0", "nnUNet_compile": "false"})
    job, context = modulejobs.start_search(work_dir, settings, python=sys.executable, env=env)
    board = modulejobs.JobBoard()
    board.add("search", job, context)
    seen: list = []
    statuses: list[str] = []
    entry = board.get("search")
    import time

    deadline = time.monotonic() + 1500
    while not entry.done:
        for polled, update in board.poll():
            seen.extend(update.events)
            statuses.append(polled.progress.status_text())
        assert time.monotonic() < deadline, "the search did not end in time:\n" + entry.log[-3000:]
        time.sleep(0.5)
    return entry, seen, statuses


def test_real_search_events_fold_into_succeeded_trials_with_their_dice(module_search):
    from AutoNNUNetLib.search import results as search_results

    entry, seen, statuses = module_search
    assert entry.state == JobState.SUCCEEDED, entry.log[-3000:]
    progress = entry.progress
    stored = search_results.load_results(entry.context.search_root)
    assert len(stored.trials) == 3

    # Every trial shows as succeeded, with the Dice and time the search recorded for it.
    points = {p.trial: p for p in progress.points()}
    assert set(points) == {t.trial_id for t in stored.trials}
    for trial in stored.trials:
        point = points[trial.trial_id]
        assert point.state is TrialState.SUCCEEDED, (trial.trial_id, point)
        assert point.dice == pytest.approx(trial.mean_dice) and point.epochs == trial.epochs
        assert point.train_seconds == pytest.approx(trial.train_seconds)
    assert progress.trials_finished == 3 and progress.trials_failed == 0
    best = max(stored.trials, key=lambda t: t.mean_dice)
    assert progress.best_dice == pytest.approx(best.mean_dice)

    # The status text went through the trials and ends as finished; the log lines agree.
    assert any(s.startswith("Trial ") for s in statuses)
    assert progress.status_text().startswith("Finished (succeeded)") and progress.percent() == 100
    lines = [format_event(e) for e in seen]
    assert sum(1 for line in lines if line and " finished: Dice " in line) == 3
    assert not any(line and " failed:" in line for line in lines)

    # The events file folded again from scratch (what a re-attached module or the server sees) agrees.
    reader = ProgressReader(Path(entry.job.job_dir) / "events.jsonl")
    reader.poll()
    assert [p.to_dict() for p in reader.progress.points()] == [p.to_dict() for p in progress.points()]


def test_real_search_drives_the_chart(module_search):
    entry, _, _ = module_search
    scored = entry.progress.finished_points()
    data = chart.chart_data(entry.progress.points())
    assert len(data.trial_minutes) == len(scored) == 3
    assert data.trial_dice == [p.dice for p in scored]
    assert data.front_minutes == sorted(data.front_minutes) and data.front_trials
    best = max(scored, key=lambda p: p.dice)
    assert best.dice in data.front_dice  # the best Dice is never dominated
    fastest = min(scored, key=lambda p: (p.train_seconds, -p.dice))
    assert data.front_trials[0] == fastest.trial
