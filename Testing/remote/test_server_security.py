"""Security of the job server (issue 12, items 1-6), against a real server process on 127.0.0.1.

Each test attacks one hole a probe found: dataset.json paths that read server files, a cancel
racing the start of a job, a dead supervisor's worker that runs on, a model zip bomb, a
world-readable data directory, and unbounded queues/uploads per user. Processes are found by the
``AUTONNUNET_JOB_ID`` every job process carries, so a leaked one cannot hide.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
import zipfile
from pathlib import Path

import pytest
import requests

from AutoNNUNetLib.remote.client import make_archive
from AutoNNUNetLib.remote.server.store import Store

from test_server import ServerProcess, auth, make_subset, upload_bytes

MB = 1 << 20


def job_processes(job_id: str) -> list[int]:
    """Live processes (zombies excluded) that belong to this job, wherever they are."""
    marker = f"AUTONNUNET_JOB_ID={job_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and \
                    (entry / "stat").read_text().split(")")[-1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def kill_leftovers(job_ids: list[str]) -> None:
    for job_id in job_ids:
        for pid in job_processes(job_id):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def serve_six_cases(root: Path, hippocampus_dir: Path, *server_args: str):
    """A module's server: alice's and bob's tokens, a six-case dataset of alice's uploaded and
    ready, ``server.jobs`` to list submitted job ids; every job process is killed at the end."""
    server = ServerProcess(root / "data", *server_args)
    server.data_dir.mkdir(parents=True)
    server.alice = server.token("alice")
    server.bob = server.token("bob")
    server.start()
    folder = make_subset(hippocampus_dir, root / "Task04_Hippocampus", 6)
    record = upload_bytes(server.api, server.alice, make_archive(folder, root / "six.tar").read_bytes())
    assert record["state"] == "ready", record
    server.dataset = record
    server.root = root
    server.jobs: list[str] = []
    yield server
    kill_leftovers(server.jobs)
    server.kill_jobs()
    server.stop()


@pytest.fixture(scope="module")
def sec(tmp_path_factory, hippocampus_dir):
    yield from serve_six_cases(tmp_path_factory.mktemp("security"), hippocampus_dir,
                               "--max-queued-jobs", "3", "--max-open-uploads", "3")


def submit_train(sec, epochs: int = 200) -> dict:
    response = requests.post(f"{sec.api}/jobs/train", headers=auth(sec.alice),
                             json={"upload_id": sec.dataset["id"], "epochs": epochs, "iterations_per_epoch": 2})
    assert response.status_code == 201, response.text
    sec.jobs.append(response.json()["id"])
    return response.json()


def status(sec, job_id: str) -> dict:
    return requests.get(f"{sec.api}/jobs/{job_id}", headers=auth(sec.alice)).json()


# -- item 1: files of an upload stay inside it -----------------------------------------------------


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_dataset_json_cannot_name_files_outside_the_upload(sec, hippocampus_dir, tmp_path, how):
    folder = make_subset(hippocampus_dir, tmp_path / "Task04_Hippocampus", 6)
    meta = json.loads((folder / "dataset.json").read_text())
    # A case of the full dataset that is not in this upload (the subset holds the first six).
    outside = (hippocampus_dir / json.loads((hippocampus_dir / "dataset.json").read_text())
               ["training"][-1]["image"]).resolve()
    assert outside.is_file()
    # A path to a file of the server's: absolute, or climbing out of the extraction folder.
    entry = str(outside) if how == "absolute" else "../" * 40 + str(outside).lstrip("/")
    meta["training"][0]["image"] = entry
    (folder / "dataset.json").write_text(json.dumps(meta))
    record = upload_bytes(sec.api, sec.alice, make_archive(folder, tmp_path / "evil.tar").read_bytes())
    assert record["state"] == "invalid", record
    assert "outside" in record["error"]
    # The answer reveals nothing about the file it tried to reach.
    assert str(outside) not in record["error"] and outside.name not in record["error"]
    workspace = sec.data_dir / "uploads" / record["id"] / "workspace"
    assert not list(workspace.rglob("*.nii.gz"))  # no copy of the server's file was made


# -- item 2: a cancel racing the start of a job ------------------------------------------------------


def test_cancel_right_after_submit_leaves_no_process_and_frees_the_slot(sec):
    cancelled = []
    for attempt in range(6):
        job = submit_train(sec)
        if attempt % 2:
            time.sleep(0.02 * attempt)  # land the cancel at different moments of the start
        answer = requests.post(f"{sec.api}/jobs/{job['id']}/cancel", headers=auth(sec.alice))
        assert answer.status_code == 200 and answer.json()["state"] == "cancelled", answer.text
        cancelled.append(job["id"])
    # Nothing of any cancelled job runs on: not now, and not after the queue's next ticks.
    wait_for(lambda: not any(job_processes(j) for j in cancelled), 20, "the cancelled jobs' processes to end")
    store = Store(sec.data_dir / "autonnunet.db")
    for job_id in cancelled:
        record = store.get_job(job_id)
        assert record.state == "cancelled" and not job_processes(job_id)
    # The slot is free: the next job starts (and the queue ticked since: a leaked start of a
    # cancelled job would show by now).
    job = submit_train(sec)
    wait_for(lambda: status(sec, job["id"])["state"] == "running", 30, "the next job to start")
    assert not any(job_processes(j) for j in cancelled)
    requests.post(f"{sec.api}/jobs/{job['id']}/cancel", headers=auth(sec.alice))
    wait_for(lambda: not job_processes(job["id"]), 20, "the job's processes to end")


# -- item 3: a dead supervisor's worker ----------------------------------------------------------------


def test_a_dead_supervisors_worker_is_ended_with_its_job(sec):
    job = submit_train(sec)

    def epoch_seen() -> bool:
        events = requests.get(f"{sec.api}/jobs/{job['id']}/events", headers=auth(sec.alice)).json()["events"]
        return any(e["kind"] == "epoch" for e in events)

    wait_for(epoch_seen, 240, "the training's first epoch", interval=0.5)
    supervisor = Store(sec.data_dir / "autonnunet.db").get_job(job["id"]).pid
    workers = [pid for pid in job_processes(job["id"]) if pid != supervisor]
    assert workers, "the training runs in a worker process of the supervisor"
    os.kill(supervisor, signal.SIGKILL)
    final = wait_for(lambda: (s := status(sec, job["id"]))["state"] in ("failed", "cancelled") and s, 30,
                     "the job to end")
    assert final["state"] == "failed" and "supervisor" in final["error"]
    # Its worker does not keep the slot busy behind the queue's back.
    wait_for(lambda: not job_processes(job["id"]), 15, "the orphaned worker to be ended")


# -- item 4: decompression limit of model uploads ---------------------------------------------------


def test_a_model_zip_bomb_is_refused_before_anything_is_extracted(sec, tmp_path):
    bomb = tmp_path / "model.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model/autonnunet.json", "{}")
        with archive.open("model/fold_0/checkpoint_final.pth", "w") as member:
            block = bytes(MB)
            for _ in range(96):  # 96 MB of zeros: about 100 KB compressed
                member.write(block)
    assert bomb.stat().st_size < MB
    record = upload_bytes(sec.api, sec.alice, bomb.read_bytes(), kind="model", filename="model.zip")
    assert record["state"] == "invalid" and "expands to" in record["error"], record
    folder = sec.data_dir / "uploads" / record["id"]
    written = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert written < 2 * MB  # the archive itself, nothing extracted


# -- item 6: per-user limits, and a linear job list --------------------------------------------------


def test_open_uploads_per_user_are_limited(sec):
    made = []
    try:
        for index in range(3):
            answer = requests.post(f"{sec.api}/uploads", headers=auth(sec.alice),
                                   json={"size": 1000 + index, "sha256": f"{index:064x}"})
            assert answer.status_code == 201, answer.text
            made.append(answer.json()["id"])
        answer = requests.post(f"{sec.api}/uploads", headers=auth(sec.alice), json={"size": 999, "sha256": "f" * 64})
        assert answer.status_code == 429 and "unfinished uploads" in answer.json()["detail"]
        # Per user: bob is not held back by alice's uploads.
        answer = requests.post(f"{sec.api}/uploads", headers=auth(sec.bob), json={"size": 999, "sha256": "f" * 64})
        assert answer.status_code == 201
        requests.delete(f"{sec.api}/uploads/{answer.json()['id']}", headers=auth(sec.bob)).raise_for_status()
    finally:
        for upload_id in made:
            requests.delete(f"{sec.api}/uploads/{upload_id}", headers=auth(sec.alice)).raise_for_status()


def test_unfinished_jobs_per_user_are_limited(sec):
    jobs = [submit_train(sec)["id"] for _ in range(3)]
    try:
        answer = requests.post(f"{sec.api}/jobs/train", headers=auth(sec.alice),
                               json={"upload_id": sec.dataset["id"], "epochs": 5})
        assert answer.status_code == 429 and "unfinished jobs" in answer.json()["detail"]
    finally:
        for job_id in jobs:
            requests.post(f"{sec.api}/jobs/{job_id}/cancel", headers=auth(sec.alice)).raise_for_status()
    wait_for(lambda: not any(job_processes(j) for j in jobs), 20, "the jobs' processes to end")
    answer = requests.post(f"{sec.api}/jobs/train", headers=auth(sec.alice),
                           json={"upload_id": sec.dataset["id"], "epochs": 5})
    assert answer.status_code == 201  # room again once they ended
    sec.jobs.append(answer.json()["id"])
    requests.post(f"{sec.api}/jobs/{answer.json()['id']}/cancel", headers=auth(sec.alice)).raise_for_status()


def test_listing_2000_queued_jobs_is_fast_and_paged(tmp_path):
    server = ServerProcess(tmp_path / "data", "--max-queued-jobs", "5000")
    server.data_dir.mkdir(parents=True)
    token = server.token("alice")
    store = Store(server.data_dir / "autonnunet.db")
    # 2,000 queued jobs; the first needs two slots on this one-slot server, so none starts.
    with store.transaction() as db:
        for index in range(2000):
            db.execute("INSERT INTO jobs(id, user, kind, params, state, slots, created) VALUES (?, 'alice', 'train',"
                       " '{}', 'queued', ?, ?)", (f"j{index:016x}", 2 if index == 0 else 1, time.time()))
    server.start()
    try:
        started = time.monotonic()
        first = requests.get(f"{server.api}/jobs", headers=auth(token), timeout=30)
        elapsed = time.monotonic() - started
        assert first.status_code == 200 and len(first.json()) == 200  # a page, not everything
        assert elapsed < 3.0, f"a page of the job list took {elapsed:.1f} s"
        jobs, offset = [], 0
        started = time.monotonic()
        while True:
            page = requests.get(f"{server.api}/jobs", headers=auth(token), timeout=30,
                                params={"offset": offset, "limit": 1000}).json()
            jobs += page
            offset += len(page)
            if len(page) < 1000:
                break
        assert time.monotonic() - started < 10.0
        assert [j["id"] for j in jobs] == [f"j{i:016x}" for i in range(2000)]
        assert [j["queue_position"] for j in jobs] == list(range(2000))
    finally:
        server.stop()


# -- item 5: the data directory is private ------------------------------------------------------------


def test_the_data_directory_is_readable_by_its_owner_only(sec):
    assert stat.S_IMODE(sec.data_dir.stat().st_mode) == 0o700
    loose = []
    for path in [sec.data_dir, *sec.data_dir.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            loose.append(f"{path.relative_to(sec.data_dir)} {oct(mode)}")
    assert loose == []
    assert any(p.name == "log.txt" for p in sec.data_dir.rglob("*"))  # job files were checked too


def test_a_data_directory_left_readable_is_made_private(tmp_path):
    data = tmp_path / "old"
    (data / "jobs" / "j1").mkdir(parents=True)
    (data / "jobs" / "j1" / "log.txt").write_text("secret")
    for path in (data, data / "jobs", data / "jobs" / "j1"):
        path.chmod(0o755)
    (data / "jobs" / "j1" / "log.txt").chmod(0o644)
    server = ServerProcess(data).start()
    try:
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "jobs" / "j1" / "log.txt").stat().st_mode) == 0o600
        assert stat.S_IMODE((data / "autonnunet.db").stat().st_mode) == 0o600
    finally:
        server.stop()
