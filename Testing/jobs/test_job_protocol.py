"""The one Job protocol as LocalJob implements it, and the request records (issue 8, issue 12 item 9).

Real supervisor processes running python one-liners; waits are for states with a deadline.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from AutoNNUNetLib.errors import AutoNNUNetError
from AutoNNUNetLib.jobs import (
    Job, JobSpec, JobUpdate, LocalJob, PredictParams, RequestError, SearchParams, Step, TrainParams,
    local_spec, params_from_dict,
)
from AutoNNUNetLib.states import JobState

PY = sys.executable


def py_step(name: str, code: str, **kwargs) -> Step:
    return Step(name=name, command=[PY, "-c", code], **kwargs)


def poll_until(job, predicate, timeout: float = 30.0) -> list[JobUpdate]:
    """Poll as a QTimer would; return every update until ``predicate(update)`` holds."""
    updates = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        update = job.poll()
        updates.append(update)
        if predicate(update):
            return updates
        time.sleep(0.05)
    raise AssertionError(f"not reached in {timeout} s; last state {updates[-1].state}")


def test_poll_gives_new_events_and_log_once_and_the_final_state(tmp_path):
    events = tmp_path / "job" / "events.jsonl"
    go = tmp_path / "go"
    code = (f"import os, time\nfrom AutoNNUNetLib.events import EventWriter\nw = EventWriter({str(events)!r})\n"
            "w.emit('trial_started', trial='1_rung_0', rung=0, epochs=1)\nprint('first line', flush=True)\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
            "w.emit('trial_finished', trial='1_rung_0', dice=0.5, state='succeeded')\nprint('second line')")
    job = LocalJob.start(JobSpec(job_dir=str(tmp_path / "job"), steps=[py_step("search", code)]))
    assert isinstance(job, Job) and job.job_id == "job"
    started = time.monotonic()
    updates = poll_until(job, lambda u: "first line" in u.log or False, timeout=30)
    assert all(time.monotonic() - started < 30 for _ in updates)
    assert updates[-1].state == JobState.RUNNING and not updates[-1].done
    go.touch()
    updates += poll_until(job, lambda u: u.done)
    final = updates[-1]
    assert final.state == JobState.SUCCEEDED and final.exit_code == 0 and final.message == ""
    # Each event and each log byte is delivered exactly once across the polls.
    kinds = [e.kind for u in updates for e in u.events]
    assert kinds.count("trial_started") == 1 and kinds.count("trial_finished") == 1 and kinds[-1] == "finished"
    log = "".join(u.log for u in updates)
    assert log == job.log_path.read_text()
    assert log.count("first line") == 1 and "second line" in log
    assert final.progress.best_dice == pytest.approx(0.5)
    # Later polls keep the state and bring nothing new.
    again = job.poll()
    assert again.state == JobState.SUCCEEDED and again.events == [] and again.log == ""


def test_open_reattaches_from_the_folder_alone_running_or_finished(tmp_path):
    go = tmp_path / "go"
    code = f"import os, time\nprint('working', flush=True)\nwhile not os.path.exists({str(go)!r}): time.sleep(0.02)"
    first = LocalJob.start(JobSpec(job_dir=str(tmp_path / "job"), steps=[py_step("work", code)]))
    poll_until(first, lambda u: "working" in u.log)
    # Slicer restarted: it only kept the folder. The pid comes from supervisor.json.
    pid_record = json.loads((tmp_path / "job" / "supervisor.json").read_text())
    assert pid_record["pid"] == first.pid
    again = LocalJob.open(tmp_path / "job")
    assert again.pid == first.pid
    replay = again.poll()
    assert replay.state == JobState.RUNNING and "working" in replay.log  # the log so far is replayed
    go.touch()
    assert again.wait(timeout=30).state == JobState.SUCCEEDED
    # After the end, the folder still tells how it ended.
    finished = LocalJob.open(tmp_path / "job")
    update = finished.poll()
    assert update.state == JobState.SUCCEEDED and "working" in update.log
    with pytest.raises(AutoNNUNetError, match="not a job folder"):
        LocalJob.open(tmp_path / "nothing")


def test_cancel_returns_at_once_and_the_supervisor_stops_gracefully(tmp_path):
    """cancel() asks through the job folder (the path that also works on Windows) and returns;
    the step gets a graceful stop first, so it can clean up (a search puts its trial back)."""
    cleaned = tmp_path / "cleaned"
    code = ("import signal, sys, time\n"
            f"def stop(*_):\n    open({str(cleaned)!r}, 'w').write('yes'); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(600)")
    job = LocalJob.start(JobSpec(job_dir=str(tmp_path / "job"), steps=[py_step("search", code)]))
    poll_until(job, lambda u: "ready" in u.log)
    started = time.monotonic()
    job.cancel(grace=10.0)
    assert time.monotonic() - started < 0.5
    final = poll_until(job, lambda u: u.done)[-1]
    assert final.state == JobState.CANCELLED and cleaned.read_text() == "yes"
    assert job.group_members() == []


def test_a_cancel_request_file_alone_stops_the_supervisor(tmp_path):
    """Windows has no SIGTERM for a hidden console: the request file must be enough."""
    code = "import time\nprint('ready', flush=True)\ntime.sleep(600)"
    job = LocalJob.start(JobSpec(job_dir=str(tmp_path / "job"), steps=[py_step("search", code)]))
    poll_until(job, lambda u: "ready" in u.log)
    (tmp_path / "job" / "cancel.request").write_text("{}")
    final = poll_until(job, lambda u: u.done)[-1]
    assert final.state == JobState.CANCELLED


def test_a_supervisor_killed_without_an_end_record_reads_failed(tmp_path):
    job = LocalJob.start(JobSpec(job_dir=str(tmp_path / "job"), steps=[py_step("work", "import time; time.sleep(600)")]))
    poll_until(job, lambda u: "step work" in (job.log_path.read_text()))
    job._process.kill()
    final = poll_until(job, lambda u: u.done)[-1]
    assert final.state == JobState.FAILED and "died unexpectedly" in final.message
    job.stop(grace=1.0)


# -- request records ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, values, field", [
    ("train", {"seed": 2 ** 32}, "seed"),
    ("train", {"seed": -1}, "seed"),
    ("train", {"epochs": 10 ** 30}, "epochs"),
    ("train", {"epochs": True}, "epochs"),
    ("train", {"epochs": 2.5}, "epochs"),
    ("train", {"iterations_per_epoch": False}, "iterations_per_epoch"),
    ("train", {"device": "gpu"}, "device"),
    ("train", {"folds": [True]}, "folds"),
    ("train", {"max_epochs": 3, "epochs": 5}, "max_epochs"),
    ("search", {"max_trials": True}, "max_trials"),
    ("search", {"seed": 2 ** 32}, "seed"),
    ("search", {"max_epochs": 10 ** 30}, "max_epochs"),
    ("search", {"runtime_weight": float("inf")}, "runtime_weight"),
    ("search", {"wall_time": float("nan")}, "wall_time"),
    ("search", {"space": "everything"}, "space"),
    ("predict", {"mirroring": 1}, "mirroring"),
    ("predict", {"device": "cuda:x"}, "device"),
    ("predict", {"folds": [9]}, "folds"),
])
def test_requests_that_cannot_run_are_refused_at_creation(kind, values, field):
    base = {"search": {"upload_id": "u"}, "train": {"upload_id": "u"},
            "predict": {"images_upload_id": "u", "model_job_id": "j"}}[kind]
    with pytest.raises(RequestError, match=field) as caught:
        params_from_dict(kind, {**base, **values})
    assert isinstance(caught.value, AutoNNUNetError) and isinstance(caught.value, ValueError)


def test_requests_round_trip_through_json():
    for params in (SearchParams(upload_id="u", profile="quick", max_trials=4, runtime_weight=0.5, folds=[0, 2]),
                   TrainParams(upload_id="u", epochs=5, max_epochs=9, folds=[1], seed=7, config={"optimizer": "Adam"}),
                   PredictParams(images_upload_id="i", model_upload_id="m", mirroring=True, folds=[0])):
        again = type(params).from_json(params.to_json())
        assert again == params
    with pytest.raises(RequestError, match="unknown TrainParams field"):
        TrainParams.from_dict({"epochs": 3, "epoch": 4})


def test_search_request_uses_the_search_records_defaults():
    from AutoNNUNetLib.search.settings import SearchSettings

    settings = SearchParams(upload_id="u").settings()
    assert settings == SearchSettings(upload_id="u")  # no second copy of the defaults
    assert SearchParams(upload_id="u", profile="quick").settings().max_epochs == SearchSettings(profile="quick").max_epochs


def test_local_recipes_build_the_verbs_command(tmp_path):
    spec = local_spec(TrainParams(epochs=3, seed=1, device="cpu", config={"optimizer": "Adam"}), tmp_path / "job",
                      workspace=tmp_path / "ws", output=tmp_path / "model")
    (step,) = spec.steps
    joined = " ".join(step.argv)
    assert step.argv[0] == "train" and "--epochs 3" in joined and "--seed 1" in joined and "--device cpu" in joined
    assert json.loads(Path(step.argv[step.argv.index("--config") + 1]).read_text()) == {"optimizer": "Adam"}
    assert step.argv[step.argv.index("--events") + 1] == str((tmp_path / "job" / "events.jsonl").resolve())
    predict = local_spec(PredictParams(), tmp_path / "p", model=tmp_path / "m.zip", images=tmp_path / "img.nii.gz",
                         output=tmp_path / "out.nii.gz")
    assert [s.name for s in predict.steps] == ["model", "predict"]
    with pytest.raises(RequestError, match="needs workspace"):
        local_spec(SearchParams(), tmp_path / "s", root=tmp_path / "root")


def test_workers_of_a_supervisor_killed_alone_are_ended(tmp_path):
    """Issue 12 item 3: a dead supervisor must not leave its workers running unseen."""
    import os
    import signal

    from AutoNNUNetLib.processes import pid_alive, process_group_members

    pids = tmp_path / "worker.pid"
    code = f"import os, time\nopen({str(pids)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)"
    job = LocalJob.start(JobSpec(job_dir=str(tmp_path / "job"), steps=[py_step("work", code)]))
    poll_until(job, lambda u: pids.exists() and pids.read_text() != "")
    worker = int(pids.read_text())
    os.kill(job.pid, signal.SIGKILL)  # the supervisor only; its worker keeps running
    final = poll_until(job, lambda u: u.done)[-1]
    assert final.state == JobState.FAILED
    deadline = time.monotonic() + 10
    while pid_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Ended; at most a zombie is left until init reaps the orphan (containers may never do so).
    assert not pid_alive(worker) and not any(pid_alive(p) for p in process_group_members(job.pid))


def test_supervisor_runs_without_a_console_window_on_windows(monkeypatch):
    """Issue 11 item 10: no console window (closing it killed the job), its own process group."""
    import subprocess

    from AutoNNUNetLib.jobs import local, supervisor

    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200, raising=False)
    monkeypatch.setattr(local, "IS_WINDOWS", True)
    monkeypatch.setattr(supervisor, "IS_WINDOWS", True)
    for flags in (local.supervisor_creation_flags(), supervisor.child_creation_flags()):
        assert flags == {"creationflags": 0x08000000 | 0x00000200}
    monkeypatch.setattr(local, "IS_WINDOWS", False)
    assert local.supervisor_creation_flags() == {"start_new_session": True}
