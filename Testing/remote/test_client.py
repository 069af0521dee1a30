"""The remote round trip through RemoteClient and ``autonnunet remote``, with faults.

One real (tiny, CPU) PriorBand search on hippocampus cases runs on a real server process: the
client uploads the cases, submits the search, follows its progress, and then the server is
killed with SIGKILL together with the job's processes (as if the machine went down). A restarted
server finds the job, re-queues it and the search resumes its NePS root: the finished trials
are kept. The client then downloads the model and segments a volume locally with it.

Around it: an upload and a download through a proxy that cuts the connection mid-transfer (both
resume), a corrupted partial download (checked by SHA-256), a predict job on the server, the CLI
verbs, and the error messages for an unreachable server, a bad token, a missing job, an oversize
upload.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Optional

import pytest

from AutoNNUNetLib.jobs.job import Job
from AutoNNUNetLib.remote.client import RemoteClient, RemoteError, make_archive
from AutoNNUNetLib.remote.job import RemoteJob
from AutoNNUNetLib.processes import process_group_members
from AutoNNUNetLib.remote.server.store import Store

# The Slicer module's own job functions (AutoNNUNetSlicerLib) submit and collect a selection below.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "AutoNNUNet"))

from test_server import ServerProcess, check_data_dir, free_port, images_folder, make_subset

PY = sys.executable

#: The tiny search: PriorBand's quick profile (3 iterations per epoch, validation on a few cases),
#: fidelities 1 and 3 epochs, three evaluations in all.
SEARCH = {"space": "hpo", "profile": "quick", "max_epochs": 3, "max_trials": 3, "seed": 0}


class FlakyProxy:
    """A loopback TCP proxy that can cut a connection once after a number of bytes.

    ``cut_up_after`` counts client-to-server bytes (uploads), ``cut_down_after`` server-to-client
    bytes (downloads); each cut happens once. Request heads seen are kept to check for ``Range``.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.cut_up_after: Optional[int] = None
        self.cut_down_after: Optional[int] = None
        self.cuts = 0
        self.bytes_down = 0
        self.range_requests: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state = {"up": 0, "down": 0, "closed": False}
            threading.Thread(target=self._pump, args=(client, upstream, "up", state), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down", state), daemon=True).start()

    def _pump(self, source: socket.socket, dest: socket.socket, direction: str, state: dict) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if direction == "up" and b"\r\nRange: bytes=" in data:
                    head = data.split(b"\r\nRange: ", 1)[1].split(b"\r\n", 1)[0]
                    self.range_requests.append(head.decode())
                state[direction] += len(data)
                if direction == "down":
                    self.bytes_down += len(data)
                limit = self.cut_up_after if direction == "up" else self.cut_down_after
                if limit is not None and state[direction] > limit:
                    if direction == "up":
                        self.cut_up_after = None
                    else:
                        self.cut_down_after = None
                    self.cuts += 1
                    # Forward part of it, then drop both sides, like a lost link.
                    dest.sendall(data[: len(data) // 2])
                    # shutdown() (not just close()) so the other pump thread, blocked in recv()
                    # on the same socket, wakes up and both peers see the connection end now.
                    for sock in (source, dest):
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    return
                dest.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, dest):
                try:
                    sock.close()
                except OSError:
                    pass


@pytest.fixture(scope="module")
def remote(tmp_path_factory, hippocampus_dir):
    """A server (10 MB upload limit for the 413 test) and alice's client."""
    root = tmp_path_factory.mktemp("remote")
    server = ServerProcess(root / "data", "--max-upload-gb", str(10 / 1024))
    server.data_dir.mkdir(parents=True)
    server.alice_token = server.token("alice")
    server.start()
    server.root = root
    server.client = RemoteClient(server.url, server.alice_token, timeout=(5, 60), retries=4, backoff=0.2)
    yield server
    server.kill_jobs()
    server.stop()


@pytest.fixture(scope="module")
def search_job(remote, hippocampus_dir):
    """The round trip up to a finished search, with a kill -9 of the server in the middle."""
    client = remote.client
    folder = make_subset(hippocampus_dir, remote.root / "Task04_Hippocampus", 8)
    upload = client.upload_dataset(folder)
    assert upload["state"] == "ready" and upload["summary"]["cases"] == 8
    job = client.submit_search(upload["id"], idempotency_key="round-trip", **SEARCH)
    assert client.submit_search(upload["id"], idempotency_key="round-trip", **SEARCH)["id"] == job["id"]

    # Follow progress until the first trial is finished, then pull the plug.
    events, offset, statuses = [], 0, []
    deadline = time.monotonic() + 600
    while not any(e.kind == "trial_finished" for e in events):
        assert time.monotonic() < deadline, "no trial finished in time"
        new, offset, complete = client.events(job["id"], offset)
        events += new
        statuses.append(client.status(job["id"]))
        assert not complete, client.logs(job["id"])["text"][-3000:]
        time.sleep(0.2)  # short: the kill must land while the search still has trials to run
    before_kill = list(events)
    pgid = Store(remote.data_dir / "autonnunet.db").get_job(job["id"]).pid
    remote.kill9()
    os.killpg(pgid, signal.SIGKILL)  # the job dies too: nothing is left running
    deadline = time.monotonic() + 30
    while process_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_group_members(pgid) == []
    remote.start()

    final = client.wait(job["id"], poll=1.0, timeout=900, on_status=statuses.append)
    all_events, _, _ = client.events(job["id"], 0)
    return {"job": final, "upload": upload, "before_kill": before_kill, "events": all_events,
            "statuses": statuses, "pgid": pgid}


def test_round_trip_search_survives_a_server_kill(remote, search_job):
    job = search_job["job"]
    assert job["state"] == "succeeded", remote.client.logs(job["id"], 0, 1 << 20)["text"][-4000:]
    assert job["attempts"] == 2
    names = {a["name"] for a in job["artifacts"]}
    assert {"model.zip", "results.json", "trials.csv"} <= names
    # Nothing lost: trials finished before the kill were not trained again after it.
    finished_before = {e.data["trial"] for e in search_job["before_kill"] if e.kind == "trial_finished"}
    starts = [e.data["trial"] for e in search_job["events"] if e.kind == "trial_started"]
    assert finished_before and all(starts.count(trial) == 1 for trial in finished_before)
    results = json.loads(remote.client._request("GET", f"/jobs/{job['id']}/artifacts/results.json").content)
    recorded = {t["trial_id"] for t in results["trials"]}
    assert finished_before <= recorded
    # The client saw progress before and after the restart, and the log tells what happened.
    progress = [s["progress"] or {} for s in search_job["statuses"]]
    assert any(p.get("trial") is not None for p in progress)
    assert any(p.get("epoch") is not None for p in progress)
    assert job["progress"]["best_dice"] is not None and job["progress"]["trials_finished"] >= 2
    log = "".join(remote.client.follow_logs(job["id"], poll=0.1))
    assert "interrupted" in log and "attempt 2 (resuming)" in log
    assert process_group_members(search_job["pgid"]) == []


def test_download_the_model_and_predict_locally(remote, search_job, hippocampus_dir, tmp_path):
    import SimpleITK as sitk

    from AutoNNUNetLib.inference import Predictor
    from AutoNNUNetLib.files import sha256_file
    from AutoNNUNetLib.model import import_model

    job = search_job["job"]
    zip_path = remote.client.download(job["id"], "model.zip", tmp_path)
    expected = next(a["sha256"] for a in job["artifacts"] if a["name"] == "model.zip")
    assert sha256_file(zip_path) == expected
    model_dir = import_model(zip_path, tmp_path / "models")
    image = sorted((hippocampus_dir / "imagesTr").glob("hippocampus_*.nii.gz"))[-1]
    out = Predictor(model_dir, device="cpu").predict_file([image], tmp_path / "seg.nii.gz")
    label, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(image))
    assert label.GetSize() == source.GetSize() and label.GetSpacing() == pytest.approx(source.GetSpacing())
    assert set(sitk.GetArrayFromImage(label).ravel().tolist()) <= {0, 1, 2}


def test_download_resumes_with_range_after_a_dropped_connection(remote, search_job, tmp_path):
    job = search_job["job"]
    size = next(a["size"] for a in job["artifacts"] if a["name"] == "model.zip")
    proxy = FlakyProxy(remote.port)
    try:
        client = RemoteClient(proxy.url, remote.alice_token, timeout=(5, 30), retries=4, backoff=0.1)
        proxy.cut_down_after = size // 3
        path = client.download(job["id"], "model.zip", tmp_path / "a.zip")
        assert proxy.cuts == 1 and proxy.range_requests and proxy.range_requests[0].startswith("bytes=")
        assert proxy.bytes_down < 1.5 * size  # resumed, not downloaded again from the start
        reference = path.read_bytes()
        # A damaged partial download is caught by the SHA-256 check and fetched again whole.
        part = tmp_path / "b.zip.part"
        part.write_bytes(b"\0" * (size // 2))
        again = client.download(job["id"], "model.zip", tmp_path / "b.zip")
        assert again.read_bytes() == reference and not part.exists()
    finally:
        proxy.close()


def test_upload_resumes_after_the_connection_drops(remote, hippocampus_dir, tmp_path):
    folder = make_subset(hippocampus_dir, tmp_path / "Task04_Hippocampus", 6)  # other content: a new upload
    archive = make_archive(folder, tmp_path / "six.tar")
    proxy = FlakyProxy(remote.port)
    try:
        client = RemoteClient(proxy.url, remote.alice_token, timeout=(5, 30), retries=4, backoff=0.1,
                              chunk_size=64 << 10)
        proxy.cut_up_after = archive.stat().st_size // 2
        seen: list[int] = []
        record = client.upload_dataset(archive, progress=lambda done, total: seen.append(done))
        assert proxy.cuts == 1
        assert record["state"] == "ready" and record["received"] == archive.stat().st_size
        assert seen == sorted(seen) and seen[-1] == archive.stat().st_size  # resumed, never restarted
    finally:
        proxy.close()


def test_predict_job_on_the_server(remote, search_job, hippocampus_dir, tmp_path):
    client = remote.client
    images = client.upload_dataset(images_folder(hippocampus_dir, tmp_path / "images", 2), kind="images")
    assert images["summary"]["images"] == 2
    job = client.submit_predict(images["id"], model_job_id=search_job["job"]["id"])
    final = client.wait(job["id"], poll=1.0, timeout=300)
    assert final["state"] == "succeeded", client.logs(job["id"], 0, 1 << 20)["text"][-3000:]
    with zipfile.ZipFile(client.download(job["id"], "predictions.zip", tmp_path)) as archive:
        assert sorted(n for n in archive.namelist() if n.endswith(".nii.gz")) == [
            p.name.replace("_0000", "") for p in sorted((tmp_path / "images").iterdir())]


def test_select_job_on_the_server(remote, search_job, hippocampus_dir, tmp_path):
    """One cheap selection of the finished search (the incumbent alone, fold 0, 1 epoch x 2
    iterations), submitted and collected the way the Slicer module does it."""
    import numpy as np

    from AutoNNUNetLib.imaging import Volume
    from AutoNNUNetLib.jobs.params import SelectParams
    from AutoNNUNetLib.selection.predictor import Selection
    from AutoNNUNetSlicerLib import collect
    from AutoNNUNetSlicerLib import jobs as modulejobs

    client = remote.client
    search_id = search_job["job"]["id"]
    request = SelectParams(epochs=1, iterations_per_epoch=2, folds=[0], top=0, configurations=[])
    job, context = modulejobs.start_remote_selection(tmp_path, search_id, request, remote.url, remote.alice_token)
    board = modulejobs.JobBoard()
    board.add("select", job, context)
    deadline = time.monotonic() + 60
    while not job.job_id:
        assert time.monotonic() < deadline and not board.get("select").done, board.get("select").message
        board.poll()
        time.sleep(0.05)
    record = client.status(job.job_id)
    assert record["kind"] == "select" and record["params"]["search_job_id"] == search_id
    assert record["params"]["folds"] == [0] and record["params"]["epochs"] == 1
    response = client._request("DELETE", f"/jobs/{search_id}", ok=(204, 409))
    assert response.status_code == 409 and job.job_id in response.json()["detail"]  # the select job reads it
    entry = board.wait("select", timeout=600, interval=0.5)
    log = client.logs(job.job_id, 0, 1 << 20)["text"]
    assert entry.state == "succeeded", log[-3000:]
    assert "candidates: incumbent (3d_fullres)" in log and "trained 1 fold(s) this run" in log
    final = client.status(job.job_id)
    assert {"selection.zip", "selection.json", "report.zip"} <= {a["name"] for a in final["artifacts"]}
    record = json.loads(client._request("GET", f"/jobs/{job.job_id}/artifacts/selection.json").content)
    assert record["folds"] == [0] and [m["name"] for m in record["members"]] == ["incumbent"]
    with zipfile.ZipFile(client.download(job.job_id, "report.zip", tmp_path)) as archive:
        assert "Model selection" in archive.read("index.html").decode()
    # What the module does with the download: collected with requests only, then segmented with.
    assert job.output == context.download_dir / "selection.zip"
    described = collect.collect_remote_model(job.output, context.download_dir / "selection")
    assert described.selection and described.member_names == ["incumbent"] and described.folds == [0]
    image = sorted((hippocampus_dir / "imagesTr").glob("hippocampus_*.nii.gz"))[-1]
    labels = Selection(described.path, device="cpu").predict([Volume.read(image)])
    assert labels.array.shape == Volume.read(image).array.shape and set(np.unique(labels.array)) <= {0, 1, 2}
    # The runner's predict job takes the select job as its model: the whole selection (not one of
    # its member folders), the same label map as the download gives here.
    images = client.upload_dataset(images_folder(hippocampus_dir, tmp_path / "images", 1), kind="images")
    predict = client.submit_predict(images["id"], model_job_id=job.job_id)
    done = client.wait(predict["id"], poll=1.0, timeout=300)
    assert done["state"] == "succeeded", client.logs(predict["id"], 0, 1 << 20)["text"][-3000:]
    stages = [e.data.get("message", "") for e in client.events(predict["id"])[0] if e.kind == "stage"]
    assert "segmenting with incumbent" in stages and any(m.startswith("loading the selection") for m in stages)
    with zipfile.ZipFile(client.download(predict["id"], "predictions.zip", tmp_path)) as archive:
        archive.extract(image.name, tmp_path / "served")
    assert np.array_equal(Volume.read(tmp_path / "served" / image.name).array, labels.array)
    refused = _cli(remote, "submit", "select", "--search-job", search_id, "--epochs", "0")
    assert refused.returncode == 2 and "epochs" in refused.stderr and "422" in refused.stderr, refused.stderr


def test_a_module_selection_of_an_unknown_search_fails_with_the_servers_reason(remote, tmp_path):
    from AutoNNUNetLib.jobs.params import SelectParams
    from AutoNNUNetSlicerLib import jobs as modulejobs

    job, context = modulejobs.start_remote_selection(tmp_path, "no-such-job", SelectParams(epochs=1), remote.url,
                                                     remote.alice_token)
    board = modulejobs.JobBoard()
    board.add("select", job, context)
    entry = board.wait("select", timeout=120, interval=0.1)
    assert entry.state == "failed" and "no-such-job" in entry.message, entry.message
    with pytest.raises(ValueError, match="run a search on the runner first"):
        modulejobs.start_remote_selection(tmp_path, "", SelectParams(epochs=1), remote.url, remote.alice_token)


def _cli(remote, *args: str, token: Optional[str] = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "AUTONNUNET_URL": remote.url, "AUTONNUNET_TOKEN": token or remote.alice_token}
    return subprocess.run([PY, "-m", "AutoNNUNetLib", "remote", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_remote_cli_verbs(remote, search_job, tmp_path):
    job_id = search_job["job"]["id"]
    listing = _cli(remote, "list")
    assert listing.returncode == 0 and job_id in listing.stdout and "succeeded" in listing.stdout
    status = _cli(remote, "status", job_id)
    assert status.returncode == 0 and "best Dice" in status.stdout
    assert json.loads(_cli(remote, "status", job_id, "--json").stdout)["id"] == job_id
    logs = _cli(remote, "logs", job_id, "--follow")
    assert logs.returncode == 0 and "[autonnunet job] succeeded" in logs.stdout
    download = _cli(remote, "download", job_id, "--artifact", "trials.csv", "-o", str(tmp_path))
    assert download.returncode == 0 and (tmp_path / "trials.csv").read_text().count("\n") >= 3
    missing = _cli(remote, "status", "j0000000000000000")
    assert missing.returncode == 2 and "not found" in missing.stderr and remote.url in missing.stderr
    health = _cli(remote, "health")
    assert health.returncode == 0 and "token accepted for user 'alice'" in health.stdout


def test_errors_name_the_server_and_what_to_do(remote, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RemoteError, match="cannot reach the AutoNNUNet server at " + closed) as error:
        RemoteClient(closed, "x", retries=1, backoff=0.01, timeout=(1, 1)).health()
    assert "autonnunet serve" in str(error.value)
    with pytest.raises(RemoteError, match="refused the token") as error:
        RemoteClient(remote.url, "ann_wrong").list_jobs()
    assert error.value.status == 401 and "autonnunet token create" in str(error.value)
    with pytest.raises(RemoteError, match="needs a token"):
        RemoteClient(remote.url).list_jobs()
    with pytest.raises(RemoteError, match="404") as error:
        remote.client.status("j0123456789abcdef")
    assert error.value.status == 404
    big = tmp_path / "big.tar"
    with open(big, "wb") as handle:
        handle.truncate(11 << 20)  # over this server's 10 MB limit
    with pytest.raises(RemoteError, match="too large") as error:
        remote.client.upload_file(big)
    assert error.value.status == 413 and "--max-upload-gb" in str(error.value)


def test_remote_job_reattaches_by_id_folds_progress_and_downloads(remote, search_job, tmp_path):
    job = RemoteJob.attach(remote.client, search_job["job"]["id"], download_dir=tmp_path)
    assert isinstance(job, Job) and job.job_id == search_job["job"]["id"] and job.kind == "search"
    final = job.wait(timeout=120, interval=0.1)
    assert final.state == "succeeded" and final.done, final.message
    # All events from the start, folded by the same SearchProgress the Slicer module shows.
    assert [e.kind for e in final.events] == [e.kind for e in search_job["events"]]
    assert final.progress.best_dice is not None and final.progress.trials_finished >= 2
    assert "[autonnunet job] succeeded" in final.log
    expected = next(a["sha256"] for a in search_job["job"]["artifacts"] if a["name"] == "model.zip")
    from AutoNNUNetLib.files import sha256_file

    assert job.output == tmp_path / "model.zip" and sha256_file(job.output) == expected
    assert (tmp_path / "results.json").is_file()
    assert job.poll().state == "succeeded" and job.poll().events == []  # later polls: the same end
    with pytest.raises(RemoteError, match="404"):
        RemoteJob.attach(remote.client, "j0123456789abcdef")


def test_remote_job_cancelled_right_after_submit_leaves_nothing_running(remote, search_job):
    params = {"upload_id": search_job["upload"]["id"], "epochs": 200, "iterations_per_epoch": 2}
    job = RemoteJob.submit(remote.client, "train", params)
    job.cancel()  # before the submit has even returned: cancelled as soon as it has
    final = job.wait(timeout=120, interval=0.1)
    assert final.state == "cancelled", final.message
    assert job.job_id and "Submitted remote job" in final.log
    record = Store(remote.data_dir / "autonnunet.db").get_job(job.job_id)
    assert record.state == "cancelled"
    assert record.pid is None or process_group_members(record.pid) == []


def test_data_dir_is_consistent_after_the_round_trip(remote, search_job):
    check_data_dir(remote.data_dir)
