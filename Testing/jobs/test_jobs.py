"""The job abstraction (AutoNNUNetLib.jobs): supervisor, process groups, progress, re-attach.

These tests run small real commands (python one-liners), not nnU-Net, so they take seconds; the
server tests run the real search through the same machinery.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from AutoNNUNetLib.events import EventWriter, ProgressEvent
from AutoNNUNetLib.jobs import (
    JobSpec, LocalJob, PredictParams, ProgressTracker, SearchParams, Step, TrainParams, params_from_dict,
    read_exit,
)
from AutoNNUNetLib.processes import process_group_members

PY = sys.executable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def py_step(name: str, code: str, **kwargs) -> Step:
    return Step(name=name, command=[PY, "-c", code], **kwargs)


# -- parameters ---------------------------------------------------------------------------------


def test_search_params_map_to_the_search_verb():
    params = SearchParams(upload_id="u1", space="hpo_nas", profile="quick", max_epochs=9, total_epochs=30,
                          folds="all", seed=3)
    argv = params.to_argv("/ws", "/root")
    assert argv[:5] == ["search", "--workdir", "/ws", "--root", "/root"]
    joined = " ".join(argv)
    for flag in ("--space hpo_nas", "--profile quick", "--max-epochs 9", "--total-epochs 30", "--folds 0 1 2 3 4",
                 "--seed 3"):
        assert flag in joined
    # Unset values take the search record's defaults (the quick profile's here), not copies of them.
    assert "--min-epochs 1 " in joined and params.settings().min_epochs == 1


def test_params_reject_bad_values_and_unknown_keys():
    with pytest.raises(ValueError, match="min_epochs"):
        SearchParams(upload_id="u", min_epochs=10, max_epochs=3)
    with pytest.raises(ValueError, match="workers"):
        SearchParams(upload_id="u", workers=0)
    with pytest.raises(ValueError, match="fold numbers"):
        TrainParams(upload_id="u", folds=[7])
    with pytest.raises(ValueError, match="exactly one"):
        PredictParams(images_upload_id="u")
    with pytest.raises(ValueError, match="config: unknown TrialConfig fields: learning_rate"):
        TrainParams(upload_id="u", config={"learning_rate": 0.1})
    with pytest.raises(ValueError, match="config:"):
        TrainParams(upload_id="u", config={"optimizer": "Lion"})
    assert TrainParams(upload_id="u", config={"optimizer": "Adam"}).config == {"optimizer": "Adam"}
    with pytest.raises(ValueError, match="unknown SearchParams field"):
        params_from_dict("search", {"upload_id": "u", "max_epoch": 3})
    train = TrainParams(upload_id="u", epochs=5, folds=[0, 1], iterations_per_epoch=4)
    assert train.to_argv("/ws", "/out")[:3] == ["train", "--workdir", "/ws"]
    assert "--folds 0 1" in " ".join(train.to_argv("/ws", "/out"))


def test_searched_configurations_travel_to_the_search_and_get_preprocessed_first(tmp_path):
    from AutoNNUNetLib import cli
    from AutoNNUNetLib.jobs.recipes import local_spec
    from AutoNNUNetLib.jobs.params import SelectParams
    from AutoNNUNetLib.search.settings import SearchSettings

    params = SearchParams(upload_id="u", configuration="3d_fullres", configurations=["2d", "3d_fullres"])
    assert SearchParams.from_json(params.to_json()) == params
    argv = params.to_argv("/ws", "/root")
    assert SearchSettings.from_argv(argv[5:]).configurations == ["2d", "3d_fullres"]  # the verb parses them back
    with pytest.raises(ValueError, match="configurations: unknown nnU-Net configuration '4d'"):
        SearchParams(upload_id="u", configurations=["4d"])
    with pytest.raises(ValueError, match="prior's configuration '2d'"):
        SearchParams(upload_id="u", configuration="2d", configurations=["3d_fullres"])

    ws = (tmp_path / "ws").resolve()
    spec = local_spec(params, tmp_path / "job", workspace=ws, root=tmp_path / "root", plan=True)
    assert [s.name for s in spec.steps] == ["plan", "preprocess", "search"]
    plan, preprocess, _ = spec.steps
    assert preprocess.argv == ["fingerprint", "--workdir", str(ws), "--configurations", "2d", "--missing-only"]
    assert preprocess.lock == plan.lock and preprocess.done_marker is None  # asked again by each job, cheap if done
    parsed = cli.build_parser().parse_args(preprocess.argv)
    assert parsed.missing_only and parsed.configurations == ["2d"]
    # The default (3d_fullres only) needs nothing beyond the plan step.
    default = local_spec(SearchParams(upload_id="u"), tmp_path / "job2", workspace=ws, root=tmp_path / "r2", plan=True)
    assert [s.name for s in default.steps] == ["plan", "search"]
    select = local_spec(SelectParams(epochs=2), tmp_path / "job3", workspace=ws, root=tmp_path / "root",
                        output=tmp_path / "sel", plan=True)
    assert [s.name for s in select.steps] == ["plan", "preprocess", "finalize", "select"]
    assert select.steps[1].argv[4:6] == ["2d", "3d_lowres"]


# -- progress ------------------------------------------------------------------------------------


def test_progress_tracker_folds_events_and_counts_each_trial_once(tmp_path):
    path = tmp_path / "events.jsonl"
    write = EventWriter(path)
    tracker = ProgressTracker(path)
    write(ProgressEvent("stage", {"name": "search", "message": "starting"}))
    write(ProgressEvent("trial_started", {"trial": "1_rung_0", "rung": 0, "epochs": 1}))
    write(ProgressEvent("epoch", {"trial": "1_rung_0", "epoch": 1, "max_epochs": 9, "loss": 0.5}))
    write(ProgressEvent("trial_finished", {"trial": "1_rung_0", "dice": 0.4, "state": "succeeded"}))
    tracker.poll()
    p = tracker.progress
    assert (p.stage, p.trial, p.rung, p.epoch, p.max_epochs) == ("search", "1_rung_0", 0, 1, 9)
    assert p.best_dice == pytest.approx(0.4) and p.trials_finished == 1
    # A trial restarted after an interruption is not a new trial; a partial line waits.
    write(ProgressEvent("trial_started", {"trial": "2_rung_0", "rung": 0}))
    write(ProgressEvent("trial_started", {"trial": "2_rung_0", "rung": 0}))
    write(ProgressEvent("best", {"trial": "2_rung_0", "dice": 0.7}))
    write(ProgressEvent("progress", {"fraction": 0.5, "eta_seconds": 120.0}))
    with open(path, "a") as handle:
        handle.write('{"kind": "epoch", "data": {"ep')
    tracker.poll()
    assert p.trials_started == 2 and p.best_dice == pytest.approx(0.7) and p.best_trial == "2_rung_0"
    assert (p.fraction, p.eta_seconds) == (0.5, 120.0)
    assert tracker.offset < path.stat().st_size  # the partial line is left for later


# -- running jobs --------------------------------------------------------------------------------


def test_job_runs_steps_logs_events_and_records_its_end(tmp_path):
    events = tmp_path / "job" / "events.jsonl"
    emit = (f"from AutoNNUNetLib.events import EventWriter; w = EventWriter({str(events)!r}); "
            "w.emit('trial_started', trial='1_rung_0', rung=0); w.emit('epoch', trial='1_rung_0', epoch=1, "
            "max_epochs=3); w.emit('best', trial='1_rung_0', dice=0.8); print('trained')")
    spec = JobSpec(job_dir=str(tmp_path / "job"), steps=[
        py_step("hello", "print('hello from a step')"),
        py_step("train", emit),
        py_step("optional", "import sys; sys.exit(5)", optional=True),
        py_step("budget", "import sys; sys.exit(3)", ok_codes=[0, 3]),
    ])
    job = LocalJob.start(spec)
    ended = job.wait(timeout=60)
    assert ended is not None and ended.state == "succeeded" and ended.exit_code == 0
    log = job.log_path.read_text()
    assert "hello from a step" in log and "trained" in log and "optional step optional failed" in log
    progress = job.progress()
    assert progress.best_dice == pytest.approx(0.8) and progress.finished_state == "succeeded"
    stages = [json.loads(line)["data"].get("name") for line in events.read_text().splitlines()
              if json.loads(line)["kind"] == "stage"]
    assert stages == ["hello", "train", "optional", "budget"]
    # Paging the log returns it whole, in pieces.
    first, offset = job.read_log(0, 10)
    rest, end = job.read_log(offset, 1 << 20)
    assert (first + rest).decode() == log and end == len(log.encode())


def test_failing_step_fails_the_job_and_stops_later_steps(tmp_path):
    marker = tmp_path / "should-not-exist"
    spec = JobSpec(job_dir=str(tmp_path / "job"), steps=[
        py_step("broken", "import sys; print('boom'); sys.exit(7)"),
        py_step("after", f"open({str(marker)!r}, 'w').close()"),
    ])
    ended = LocalJob.start(spec).wait(timeout=60)
    assert ended is not None and ended.state == "failed" and ended.exit_code == 7
    assert "broken" in ended.message and not marker.exists()


def test_workers_get_their_own_environment(tmp_path):
    out = tmp_path / "envs"
    out.mkdir()
    code = (f"import os; open(os.path.join({str(out)!r}, os.environ['CUDA_VISIBLE_DEVICES'] or 'cpu'), 'w')"
            ".write(os.environ['AUTONNUNET_TEST'])")
    spec = JobSpec(job_dir=str(tmp_path / "job"), env={"AUTONNUNET_TEST": "spec"}, steps=[
        py_step("workers", code, workers=[{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]),
    ])
    assert LocalJob.start(spec).wait(timeout=60).state == "succeeded"
    assert sorted(p.name for p in out.iterdir()) == ["0", "1"]
    assert (out / "0").read_text() == "spec"


def test_cancel_kills_the_whole_process_tree(tmp_path):
    """A step whose workers start grandchildren: cancel leaves no process of the group behind."""
    pids = tmp_path / "pids"
    pids.mkdir()
    code = ("import os, subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open(os.path.join({str(pids)!r}, str(os.getpid())), 'w').write(str(child.pid)); time.sleep(600)")
    spec = JobSpec(job_dir=str(tmp_path / "job"), steps=[
        py_step("sleepers", code, workers=[{}, {}]),
    ])
    job = LocalJob.start(spec)
    _wait_for(lambda: len(list(pids.iterdir())) == 2)
    tree = [int(p.name) for p in pids.iterdir()] + [int(p.read_text()) for p in pids.iterdir()]
    assert set(tree) <= set(job.group_members())
    assert job.stop(grace=5.0) is True
    assert job.group_members() == [] and process_group_members(job.pid) == []
    assert not any(_alive(pid) for pid in tree)
    ended = job.poll()
    assert ended.done and ended.state == "cancelled"


def test_cancel_a_process_that_ignores_sigterm(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
    job = LocalJob.start(JobSpec(job_dir=str(tmp_path / "job"), steps=[py_step("stubborn", code)]))
    _wait_for(lambda: "ready" in job.log_path.read_text())
    started = time.monotonic()
    assert job.stop(grace=1.0) is True
    assert time.monotonic() - started < 15
    assert job.group_members() == []


def test_reattach_after_the_starter_is_gone_and_rerun_resumes(tmp_path):
    """What a restarted server does: find the running supervisor by pid, or re-run the folder."""
    done = tmp_path / "prepared"
    count = tmp_path / "prepare-count"
    prepare = f"open({str(count)!r}, 'a').write('x')"
    go = tmp_path / "go"
    wait_for_go = f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)\nprint('search done')"
    spec = JobSpec(job_dir=str(tmp_path / "job"), steps=[
        py_step("prepare", prepare, done_marker=str(done)),
        py_step("search", wait_for_go),
    ])
    first = LocalJob.start(spec)
    _wait_for(lambda: done.exists())
    # A new handle from the pid alone, as after a server restart.
    attached = LocalJob.attach(tmp_path / "job", first.pid)
    assert attached is not None and attached.running() and attached.poll().state == "running"
    assert LocalJob.attach(tmp_path / "elsewhere", first.pid) is None  # pid must belong to this job
    # The machine "reboots": the whole group dies without an end record.
    os.killpg(first.pid, signal.SIGKILL)
    first._process.wait()
    _wait_for(lambda: process_group_members(first.pid) == [])
    assert read_exit(tmp_path / "job") is None
    assert LocalJob.attach(tmp_path / "job", first.pid) is None
    # Re-running the same folder skips the finished preparation and completes the rest.
    go.touch()
    second = LocalJob.start(JobSpec.load(tmp_path / "job"), banner="attempt 2 (resuming)")
    ended = second.wait(timeout=60)
    assert ended is not None and ended.state == "succeeded"
    assert count.read_text() == "x"  # prepared once
    log = second.log_path.read_text()
    assert "attempt 2 (resuming)" in log and "already done, skipped" in log and "search done" in log


def test_single_command_spec_adds_the_events_file(tmp_path):
    spec = JobSpec.single(tmp_path / "job", ["train", "--workdir", "/w", "--epochs", "1"])
    assert spec.steps[0].argv[-2:] == ["--events", str((tmp_path / "job" / "events.jsonl").resolve())]
    spec.save()
    assert JobSpec.load(tmp_path / "job").steps[0].argv == spec.steps[0].argv


def test_submitit_local_executor_runs_remote_steps(tmp_path):
    """The Slurm path through submitit, with submitit's local executor (no cluster here)."""
    out = tmp_path / "ran"
    spec = JobSpec(job_dir=str(tmp_path / "job"), executor="submitit-local", steps=[
        py_step("train", f"open({str(out)!r}, 'w').write('ok'); print('worker output')", remote=True),
    ])
    ended = LocalJob.start(spec).wait(timeout=120)
    assert ended is not None and ended.state == "succeeded", (tmp_path / "job" / "log.txt").read_text()
    assert out.read_text() == "ok"
    log = (tmp_path / "job" / "log.txt").read_text()
    assert "submitted local jobs" in log and "worker output" in log


def test_cancel_does_not_block_and_poll_finishes_the_kill(tmp_path):
    """The UI-thread variant: returns at once; polling escalates to SIGKILL after the grace period."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
    job = LocalJob.start(JobSpec(job_dir=str(tmp_path / "job"), steps=[py_step("stubborn", code)]))
    _wait_for(lambda: "ready" in job.log_path.read_text())
    started = time.monotonic()
    job.cancel(grace=0.5)
    assert time.monotonic() - started < 0.5
    ended = _wait_for(lambda: (lambda update: update if update.done else None)(job.poll()), timeout=20)
    _wait_for(lambda: job.poll().done and job.group_members() == [], timeout=20)
    assert ended.state == "cancelled"
