"""Faults and server errors (issue 12, items 7-11) against a real server process on 127.0.0.1.

A full disk (a small tmpfs holds the data directory; skipped where mounting is not allowed),
concurrent uploads that would over-commit it, racing ``complete`` calls, absurd sizes, token ids
that match several tokens, job parameters that cannot run, the words of a failed job's error,
an OpenAPI schema checked against the answers (schemathesis), and 50 clients polling at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
import pytest
import requests

from AutoNNUNetLib.remote.client import RemoteClient, RemoteError, make_archive
from AutoNNUNetLib.remote.cli import describe
from AutoNNUNetLib.remote.server.store import Store

from test_server import ServerProcess, auth, make_subset, sha256, upload_bytes
from test_server_security import job_processes, serve_six_cases, wait_for

PY = sys.executable
MB = 1 << 20


@pytest.fixture(scope="module")
def srv(tmp_path_factory, hippocampus_dir):
    yield from serve_six_cases(tmp_path_factory.mktemp("faults"), hippocampus_dir)


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 MB tmpfs for a data directory (a disk that really fills up)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs privileges this machine does not give")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# -- item 7: disk space ------------------------------------------------------------------------------


def test_concurrent_uploads_cannot_overcommit_the_disk(small_disk):
    server = ServerProcess(small_disk / "data", "--min-free-gb", "0")
    server.data_dir.mkdir()
    token = server.token("alice")
    server.start()
    try:
        size = 9 * MB  # needs 27 MB (archive, extracted copy, dataset): two fit on 64 MB, four do not

        def create(index: int) -> int:
            return requests.post(f"{server.api}/uploads", headers=auth(token), timeout=30,
                                 json={"size": size, "sha256": f"{index:064x}"}).status_code

        with ThreadPoolExecutor(4) as pool:
            codes = sorted(pool.map(create, range(4)))
        assert codes == [201, 201, 507, 507]
    finally:
        server.stop()


def test_a_full_disk_answers_507_and_the_client_gives_up_at_once(small_disk, tmp_path):
    server = ServerProcess(small_disk / "data", "--min-free-gb", "0")
    server.data_dir.mkdir()
    token = server.token("alice")
    server.start()
    try:
        archive = tmp_path / "data.tar"
        archive.write_bytes(os.urandom(12 * MB))
        created = requests.post(f"{server.api}/uploads", headers=auth(token),
                                json={"size": 12 * MB, "sha256": sha256(archive.read_bytes())})
        assert created.status_code == 201
        # Someone else fills the disk after the upload was accepted.
        filler = small_disk / "filler"
        with open(filler, "wb") as handle:
            try:
                while True:
                    handle.write(bytes(MB))
                    handle.flush()
            except OSError:
                pass
        client = RemoteClient(server.url, token, retries=5, backoff=1.0, chunk_size=4 * MB)
        started = time.monotonic()
        with pytest.raises(RemoteError, match="out of disk space") as error:
            client.upload_file(archive, wait=False)  # resumes the upload created above
        assert error.value.status == 507 and "disk is full" in str(error.value)
        assert time.monotonic() - started < 5.0  # no retries: a full disk does not free itself
        assert requests.get(f"{server.api}/health").status_code == 200
    finally:
        server.stop()


# -- item 8: races and absurd values ------------------------------------------------------------------


def test_concurrent_completes_answer_alike(srv):
    for _ in range(4):
        data = os.urandom(2 * MB)
        record = requests.post(f"{srv.api}/uploads", headers=auth(srv.alice),
                               json={"size": len(data), "sha256": sha256(data)}).json()
        requests.put(f"{srv.api}/uploads/{record['id']}/chunks", params={"offset": 0}, data=data,
                     headers=auth(srv.alice)).raise_for_status()
        barrier = threading.Barrier(3)

        def complete() -> tuple[int, str]:
            barrier.wait()
            answer = requests.post(f"{srv.api}/uploads/{record['id']}/complete", headers=auth(srv.alice))
            return answer.status_code, answer.json()["detail"] if answer.status_code != 202 else ""

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: complete(), range(3)))
        # One of them checks the file and starts validation; the others see it validating, or
        # (random bytes validate fast) already invalid. Never a 500.
        assert answers[0][0] == 202 or any(code == 202 for code, _ in answers), answers
        assert all(code == 202 or (code == 409 and "is invalid" in detail) for code, detail in answers), answers


@pytest.mark.parametrize("size", [10 ** 400, 2 ** 63, -1, 0])
def test_absurd_declared_sizes_are_422(srv, size):
    response = requests.post(f"{srv.api}/uploads", headers={**auth(srv.alice), "Content-Type": "application/json"},
                             data='{"size": %d, "sha256": "%s"}' % (size, "a" * 64))
    assert response.status_code == 422 and "size" in response.json()["detail"], response.text


def test_token_revoke_needs_an_id_that_names_one_token(tmp_path):
    store = Store(tmp_path / "autonnunet.db")
    for index in range(40):
        store.create_token(f"user{index}")
    ids = [t["id"] for t in store.list_tokens()]
    shared = next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) >= 2)
    result = subprocess.run([PY, "-m", "AutoNNUNetLib", "token", "revoke", "--id", shared,
                             "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "matches" in result.stderr and "Traceback" not in result.stderr
    assert not any(t["revoked"] for t in store.list_tokens())
    result = subprocess.run([PY, "-m", "AutoNNUNetLib", "token", "revoke", "--id", ids[5],
                             "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0 and "revoked 1 token" in result.stdout
    assert [t["id"] for t in store.list_tokens() if t["revoked"]] == [ids[5]]


# -- item 9: parameters that cannot run are refused at submit ------------------------------------------


@pytest.mark.parametrize("kind,body,field", [
    ("train", {"epochs": 5, "seed": 2 ** 32}, "seed"),
    ("train", {"epochs": 10 ** 30}, "epochs"),
    ("train", {"epochs": True}, "epochs"),
    ("search", {"max_trials": True}, "max_trials"),
    ("search", {"seed": 2 ** 32}, "seed"),
    ("search", {"runtime_weight": float("inf")}, "runtime_weight"),
    ("search", {"space": "everything"}, "space"),
    ("search", {"workers": 0}, "workers"),
])
def test_parameters_that_cannot_run_are_refused_at_submit(srv, kind, body, field):
    before = len(requests.get(f"{srv.api}/jobs", headers=auth(srv.alice)).json())
    # Raw JSON: Python writes inf as ``Infinity``, which the server's JSON parser reads as inf.
    response = requests.post(f"{srv.api}/jobs/{kind}", headers={**auth(srv.alice), "Content-Type": "application/json"},
                             data=json.dumps({"upload_id": srv.dataset["id"], **body}))
    assert response.status_code == 422 and field in response.json()["detail"], response.text
    assert len(requests.get(f"{srv.api}/jobs", headers=auth(srv.alice)).json()) == before


# -- item 10: what a failed job's error says -------------------------------------------------------------


def test_a_killed_step_is_named_by_its_signal(srv):
    job = requests.post(f"{srv.api}/jobs/train", headers=auth(srv.alice),
                        json={"upload_id": srv.dataset["id"], "epochs": 200, "iterations_per_epoch": 2}).json()
    srv.jobs.append(job["id"])

    def epoch_seen() -> bool:
        events = requests.get(f"{srv.api}/jobs/{job['id']}/events", headers=auth(srv.alice)).json()["events"]
        return any(e["kind"] == "epoch" for e in events)

    wait_for(epoch_seen, 240, "the training's first epoch", interval=0.5)
    supervisor = Store(srv.data_dir / "autonnunet.db").get_job(job["id"]).pid
    for pid in job_processes(job["id"]):
        if pid != supervisor:
            os.kill(pid, signal.SIGKILL)  # the step's process, as the kernel's OOM killer would
    final = wait_for(lambda: (s := requests.get(f"{srv.api}/jobs/{job['id']}", headers=auth(srv.alice)).json())
                     ["state"] in ("failed", "succeeded", "cancelled") and s, 60, "the job to end")
    assert final["state"] == "failed" and "SIGKILL" in final["error"], final["error"]
    assert "exit code -9" not in final["error"]


def test_a_failed_step_carries_its_last_error_line(srv, hippocampus_dir, tmp_path):
    folder = make_subset(hippocampus_dir, tmp_path / "Task04_Hippocampus", 7)  # its own upload: planned anew
    record = upload_bytes(srv.api, srv.alice, make_archive(folder, tmp_path / "seven.tar").read_bytes())
    assert record["state"] == "ready"
    # Break the upload's dataset so that planning it fails with a message.
    workspace = srv.data_dir / "uploads" / record["id"] / "workspace"
    for path in workspace.glob("nnUNet_raw/Dataset*/dataset.json"):
        path.write_text("{ not json")
    job = requests.post(f"{srv.api}/jobs/train", headers=auth(srv.alice),
                        json={"upload_id": record["id"], "epochs": 5}).json()
    srv.jobs.append(job["id"])
    final = wait_for(lambda: (s := requests.get(f"{srv.api}/jobs/{job['id']}", headers=auth(srv.alice)).json())
                     ["state"] in ("failed", "succeeded") and s, 120, "the job to fail")
    assert final["state"] == "failed"
    log = requests.get(f"{srv.api}/jobs/{job['id']}/log", headers=auth(srv.alice), params={"limit": 1 << 22}).json()
    error_lines = [line.strip() for line in log["text"].splitlines()
                   if ": error: " in line or line.split(":")[0].endswith("Error")]
    assert error_lines, log["text"][-2000:]
    assert final["error"].startswith("step 'plan' failed") and error_lines[-1] in final["error"]


def test_status_after_a_reattach_does_not_read_stage_server(srv):
    job = requests.post(f"{srv.api}/jobs/train", headers=auth(srv.alice),
                        json={"upload_id": srv.dataset["id"], "epochs": 200, "iterations_per_epoch": 2}).json()
    srv.jobs.append(job["id"])

    def progress_stage():
        status = requests.get(f"{srv.api}/jobs/{job['id']}", headers=auth(srv.alice)).json()
        return (status.get("progress") or {}).get("epoch") is not None and status

    before = wait_for(progress_stage, 240, "the training's progress", interval=0.5)
    srv.kill9()
    srv.start()
    log = wait_for(lambda: "re-attached" in (text := requests.get(
        f"{srv.api}/jobs/{job['id']}/log", headers=auth(srv.alice), params={"limit": 1 << 22}).json()["text"]) and text,
        30, "the re-attach")
    assert log
    after = requests.get(f"{srv.api}/jobs/{job['id']}", headers=auth(srv.alice)).json()
    assert after["state"] == "running" and after["progress"]["stage"] == before["progress"]["stage"] != "server"
    assert "stage server" not in describe(after)
    requests.post(f"{srv.api}/jobs/{job['id']}/cancel", headers=auth(srv.alice)).raise_for_status()
    wait_for(lambda: not job_processes(job["id"]), 20, "the job's processes to end")


# -- item 11: the OpenAPI schema is true --------------------------------------------------------------


def test_every_answer_matches_the_openapi_schema(srv):
    """Schemathesis, bounded (about a minute on loopback): schema-shaped and broken requests to
    every operation, each answer checked against the schema (status code documented, body and
    content type as declared) and never a 5xx (507 is a documented answer)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance, response_schema_conformance, status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    upload = requests.post(f"{srv.api}/uploads", headers=auth(srv.alice),
                           json={"size": MB, "sha256": uuid.uuid4().hex * 2}).json()["id"]
    jobs = requests.get(f"{srv.api}/jobs", headers=auth(srv.alice)).json()
    real = {"upload_id": upload, **({"job_id": jobs[-1]["id"]} if jobs else {})}
    failures: list[str] = []
    calls = [0]
    operations = 0
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        bound = {k: v for k, v in real.items() if "{" + k + "}" in operation.path}
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            for parameters in ([None, bound] if bound else [None]):
                @given(case=operation.as_strategy(generation_mode=mode, path_parameters=parameters))
                @settings(max_examples=10, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                def call(case) -> None:
                    headers = dict(case.headers or {})
                    headers.setdefault("Authorization", f"Bearer {srv.alice}")
                    response = case.call(headers=headers, timeout=30)
                    calls[0] += 1
                    if response.status_code == 507:
                        return  # a declared size the disk cannot hold: documented, not a fault
                    try:
                        case.validate_response(response, checks=checks)
                    except (Exception, BaseExceptionGroup) as error:  # schemathesis raises its failures
                        failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                        f"{str(error)[:400]}")

                try:
                    call()
                except Unsatisfiable:
                    pass
    assert operations >= 16 and calls[0] >= 10 * operations
    assert failures == [], "\n".join(failures[:8])


# -- load: 50 clients polling ---------------------------------------------------------------------------


def test_fifty_clients_polling_at_once(srv):
    job = requests.post(f"{srv.api}/jobs/train", headers=auth(srv.alice),
                        json={"upload_id": srv.dataset["id"], "epochs": 5}).json()
    srv.jobs.append(job["id"])
    requests.post(f"{srv.api}/jobs/{job['id']}/cancel", headers=auth(srv.alice)).raise_for_status()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def poll_like_slicer(_index: int) -> None:
        session = requests.Session()
        session.headers.update(auth(srv.alice))
        offset = 0
        for _ in range(10):
            for path, params in ((f"/jobs/{job['id']}", None), (f"/jobs/{job['id']}/events", {"offset": offset}),
                                 (f"/jobs/{job['id']}/log", {"offset": 0, "limit": 4096})):
                started = time.perf_counter()
                response = session.get(srv.api + path, params=params, timeout=60)
                with lock:
                    latencies.append(time.perf_counter() - started)
                    if response.status_code != 200:
                        errors.append(f"{path}: {response.status_code}")

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(poll_like_slicer, range(50)))
    latencies.sort()
    assert errors == [] and len(latencies) == 50 * 30
    p95 = latencies[int(0.95 * len(latencies))]
    assert p95 < 5.0, f"95th percentile latency {p95:.2f} s with 50 clients"
