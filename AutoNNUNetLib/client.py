"""Client of the AutoNNUNet job server (``autonnunet remote ...`` and the Slicer module).

Only ``requests`` is needed (it ships with Slicer): no FastAPI, no torch. Every call has connect
and read timeouts; connection errors, timeouts and 5xx answers are retried with exponential
backoff. Retrying is safe for every request this client makes: uploads are created per content
hash (a retried create returns the same upload), chunks are written at explicit offsets (a
repeated chunk is answered with the server's offset), ``complete`` and ``cancel`` are idempotent,
and a job submit carries an ``Idempotency-Key`` that stays the same across its retries.

Uploads go in chunks, each with a CRC32 the server checks (a damaged chunk is sent again), and
the whole archive's SHA-256 is checked at the end. Uploads resume from the server's committed offset after a broken connection (also in a later
call: the server finds an unfinished upload by its SHA-256); downloads resume with HTTP Range
and are checked against the server's SHA-256.

Calls block: run them off a UI thread (the Slicer module uses a worker thread).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import requests

from .errors import AutoNNUNetError
from .events import ProgressEvent

DEFAULT_TIMEOUT = (10.0, 120.0)
DEFAULT_CHUNK = 16 << 20
#: Retry on these answers: the server (or a proxy in front of it) is restarting or overloaded.
RETRY_STATUS = (500, 502, 503, 504)
FINAL_STATES = ("succeeded", "failed", "cancelled")

ProgressFn = Callable[[int, int], None]


class RemoteError(AutoNNUNetError, RuntimeError):
    """A request to the job server failed; the message names the server and what to do."""

    def __init__(self, message: str, status: Optional[int] = None, url: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.url = url


def _sha256_file(path: Path, block: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_archive(folder: Union[str, Path], dest: Union[str, Path]) -> Path:
    """Tar ``folder`` (uncompressed: NIfTI files are compressed already) as ``<folder name>/...``.

    Only regular files and folders go in; links are followed, so the server (which refuses
    links) gets their content.
    """
    folder, dest = Path(folder), Path(dest)
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT, dereference=True) as archive:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            # Hidden files and folders (.DS_Store, .git, editor state) are not part of a dataset.
            if any(part.startswith(".") for part in relative.parts) or not (path.is_file() or path.is_dir()):
                continue
            arcname = f"{folder.name}/{relative.as_posix()}"
            archive.add(path, arcname=arcname, recursive=False)
    return dest


class RemoteClient:
    """One server, one token.

    ``url`` is the server's address (``http://gpu-host:8765``; ``/v1`` is added). ``timeout`` is
    ``(connect, read)`` seconds; ``retries`` how many times a failed request is repeated, waiting
    ``backoff * 2**attempt`` seconds (at most 30) in between.
    """

    def __init__(self, url: str, token: Optional[str] = None, timeout: tuple[float, float] = DEFAULT_TIMEOUT,
                 retries: int = 5, backoff: float = 0.5, chunk_size: int = DEFAULT_CHUNK,
                 session: Optional[requests.Session] = None, verify: Union[bool, str] = True):
        if not url:
            raise RemoteError("no server URL: pass --url or set AUTONNUNET_URL (e.g. http://gpu-host:8765)")
        base = url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            base = "http://" + base
        self.server_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.api = self.server_url + "/v1"
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.chunk_size = chunk_size
        self.session = session or requests.Session()
        self.session.verify = verify
        self.session.headers["User-Agent"] = "AutoNNUNet-client"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self._has_token = bool(token)

    # -- plumbing -------------------------------------------------------------------------------
    def _sleep(self, attempt: int) -> None:
        time.sleep(min(30.0, self.backoff * (2 ** attempt)))

    def _unreachable(self, error: Exception) -> RemoteError:
        return RemoteError(
            f"cannot reach the AutoNNUNet server at {self.server_url} ({type(error).__name__}: {error}). "
            "Check that `autonnunet serve` is running there, that the URL and port are right, and that any "
            "SSH tunnel or VPN to it is open.", url=self.server_url)

    def _error(self, response: requests.Response) -> RemoteError:
        try:
            detail = response.json().get("detail", "")
        except ValueError:
            detail = response.text[:300]
        code, where = response.status_code, self.server_url
        hints = {
            401: (f"the server at {where} refused the token (401): {detail}. Create a token on the server with "
                  "`autonnunet token create --user NAME` and pass it with --token or AUTONNUNET_TOKEN."
                  if self._has_token else
                  f"the server at {where} needs a token (401). Create one on the server with "
                  "`autonnunet token create --user NAME` and pass it with --token or AUTONNUNET_TOKEN."),
            403: f"the server at {where} forbids this (403): {detail}. Ask the server's administrator for access.",
            404: f"not found on {where} (404): {detail}. Check the id; `autonnunet remote list` shows your jobs.",
            413: f"too large for the server at {where} (413): {detail}. Upload fewer cases, or ask the "
                 "administrator to raise `autonnunet serve --max-upload-gb`.",
            507: f"the server at {where} is out of disk space (507): {detail}. Ask its administrator to free space.",
        }
        message = hints.get(code, f"the server at {where} answered {code}: {detail}")
        return RemoteError(message, status=code, url=where)

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201, 202, 204),
                 **kwargs: Any) -> requests.Response:
        """One API call with retries; raises :class:`RemoteError` on failure."""
        kwargs.setdefault("timeout", self.timeout)
        url = self.api + path
        for attempt in range(self.retries + 1):
            try:
                response = self.session.request(method, url, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as error:
                if attempt >= self.retries:
                    raise self._unreachable(error) from None
                self._sleep(attempt)
                continue
            if response.status_code in RETRY_STATUS and attempt < self.retries:
                response.close()
                self._sleep(attempt)
                continue
            if response.status_code not in ok:
                raise self._error(response)
            return response
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        return response.json() if response.content else None

    # -- meta -----------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Server status (no token needed): version, executor, number of job slots, GPUs."""
        return self._json("GET", "/health")

    def whoami(self) -> str:
        """The user the token belongs to (checks the token)."""
        return self._json("GET", "/me")["user"]

    # -- uploads --------------------------------------------------------------------------------
    def upload_dataset(self, folder_or_archive: Union[str, Path], *, kind: str = "dataset",
                       progress: Optional[ProgressFn] = None, wait: bool = True,
                       wait_timeout: Optional[float] = None) -> dict[str, Any]:
        """Upload a dataset folder (tarred on the fly into a temporary file) or an archive.

        Returns the upload record; with ``wait`` after the server validated it (state ``ready``),
        raising :class:`RemoteError` with the server's reason when it is not a valid dataset.
        """
        source = Path(folder_or_archive)
        if not source.exists():
            raise FileNotFoundError(f"{source} does not exist")
        if source.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix="autonnunet-upload-"))
            try:
                archive = make_archive(source, tmp / f"{source.name}.tar")
                return self.upload_file(archive, kind=kind, progress=progress, wait=wait, wait_timeout=wait_timeout)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return self.upload_file(source, kind=kind, progress=progress, wait=wait, wait_timeout=wait_timeout)

    def upload_file(self, archive: Union[str, Path], *, kind: str = "dataset", progress: Optional[ProgressFn] = None,
                    wait: bool = True, wait_timeout: Optional[float] = None) -> dict[str, Any]:
        archive = Path(archive)
        size = archive.stat().st_size
        record = self._json("POST", "/uploads", json={"size": size, "sha256": _sha256_file(archive),
                                                      "filename": archive.name, "kind": kind})
        if record["state"] == "receiving":
            self._send_chunks(record["id"], archive, record["received"], size, progress)
            record = self._json("POST", f"/uploads/{record['id']}/complete")
        elif progress is not None:
            progress(size, size)
        if wait:
            record = self.wait_upload(record["id"], timeout=wait_timeout)
        return record

    def _server_offset(self, upload_id: str) -> int:
        return int(self._json("GET", f"/uploads/{upload_id}")["received"])

    def _send_chunks(self, upload_id: str, archive: Path, offset: int, size: int,
                     progress: Optional[ProgressFn]) -> None:
        failures = 0
        url = f"{self.api}/uploads/{upload_id}/chunks"
        with open(archive, "rb") as handle:
            while offset < size:
                handle.seek(offset)
                data = handle.read(self.chunk_size)
                # CRC32 per chunk catches damage in transit at a fraction of SHA-256's cost; the
                # whole file's SHA-256 is checked by the server at complete.
                crc = f"{zlib.crc32(data):08x}"
                try:
                    response = self.session.put(
                        url, params={"offset": offset}, data=data, timeout=self.timeout,
                        headers={"Content-Type": "application/octet-stream", "X-Chunk-CRC32": crc})
                except (requests.ConnectionError, requests.Timeout) as error:
                    # The connection broke mid-chunk: the server discards the partial chunk, so
                    # ask where it stands and go on from there.
                    failures += 1
                    if failures > self.retries:
                        raise self._unreachable(error) from None
                    self._sleep(failures - 1)
                    offset = self._server_offset(upload_id)
                    continue
                if response.status_code == 200:
                    offset = int(response.json()["received"])
                    failures = 0
                    if progress is not None:
                        progress(offset, size)
                    continue
                if response.status_code == 409:
                    header = response.headers.get("Upload-Offset")
                    failures += 1
                    if header is not None:  # not where the server is: take its offset
                        offset = int(header)
                    else:
                        # The server is still finishing the chunk whose connection broke: give it
                        # a moment to notice, then ask where it stands.
                        self._sleep(failures - 1)
                        offset = self._server_offset(upload_id)
                elif response.status_code == 422 or response.status_code in RETRY_STATUS:
                    failures += 1  # chunk damaged in transit, or server trouble: send it again
                    self._sleep(failures - 1)
                else:
                    raise self._error(response)
                if failures > self.retries:
                    raise self._error(response)

    def upload(self, upload_id: str) -> dict[str, Any]:
        return self._json("GET", f"/uploads/{upload_id}")

    def wait_upload(self, upload_id: str, poll: float = 1.0, timeout: Optional[float] = None) -> dict[str, Any]:
        """Wait until the server has validated the upload; the record, or RemoteError if invalid."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.upload(upload_id)
            if record["state"] == "ready":
                return record
            if record["state"] == "invalid":
                raise RemoteError(f"the server at {self.server_url} rejected upload {upload_id}: {record['error']}",
                                  url=self.server_url)
            if deadline is not None and time.monotonic() > deadline:
                raise RemoteError(f"upload {upload_id} is still {record['state']} after {timeout:.0f} s")
            time.sleep(poll)

    def list_uploads(self) -> list[dict[str, Any]]:
        return self._json("GET", "/uploads")

    def delete_upload(self, upload_id: str) -> None:
        self._request("DELETE", f"/uploads/{upload_id}")

    # -- jobs -----------------------------------------------------------------------------------
    def _submit(self, kind: str, params: dict[str, Any], idempotency_key: Optional[str]) -> dict[str, Any]:
        # One key for all retries of this call: a submit whose answer was lost is not repeated.
        key = idempotency_key or str(uuid.uuid4())
        body = {k: v for k, v in params.items() if v is not None}
        return self._json("POST", f"/jobs/{kind}", json=body, headers={"Idempotency-Key": key})

    def submit_search(self, upload_id: str, *, idempotency_key: Optional[str] = None, **params: Any) -> dict[str, Any]:
        """Queue a search on a ready dataset upload; ``params`` as ``autonnunet search`` (``space``,
        ``profile``, ``max_epochs``, ``total_epochs``, ``workers``, ...). Returns the job record."""
        return self._submit("search", {"upload_id": upload_id, **params}, idempotency_key)

    def submit_train(self, upload_id: str, *, idempotency_key: Optional[str] = None, **params: Any) -> dict[str, Any]:
        """Queue one training (``epochs``, ``config``, ``folds``, ...) on a ready dataset upload."""
        return self._submit("train", {"upload_id": upload_id, **params}, idempotency_key)

    def submit_predict(self, images_upload_id: str, *, model_job_id: Optional[str] = None,
                       model_upload_id: Optional[str] = None, idempotency_key: Optional[str] = None,
                       **params: Any) -> dict[str, Any]:
        """Queue a prediction of uploaded images with the model of a finished job or an uploaded model zip."""
        return self._submit("predict", {"images_upload_id": images_upload_id, "model_job_id": model_job_id,
                                        "model_upload_id": model_upload_id, **params}, idempotency_key)

    def status(self, job_id: str) -> dict[str, Any]:
        """The job record: ``state``, ``progress`` (trial, rung, epoch, best_dice, eta_seconds, ...),
        ``artifacts``, ``error``."""
        return self._json("GET", f"/jobs/{job_id}")

    def list_jobs(self, state: Optional[str] = None) -> list[dict[str, Any]]:
        return self._json("GET", "/jobs", params={"state": state} if state else None)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/jobs/{job_id}/cancel")

    def delete_job(self, job_id: str) -> None:
        self._request("DELETE", f"/jobs/{job_id}")

    def logs(self, job_id: str, offset: int = 0, limit: int = 65536) -> dict[str, Any]:
        """A page of the job's log: ``text``, ``next_offset``, ``size``, ``complete``."""
        return self._json("GET", f"/jobs/{job_id}/log", params={"offset": offset, "limit": limit})

    def follow_logs(self, job_id: str, offset: int = 0, poll: float = 2.0,
                    should_stop: Optional[Callable[[], bool]] = None) -> Iterator[str]:
        """Yield log text as it is written until the job has ended and its log is read to the end."""
        while True:
            page = self.logs(job_id, offset, limit=1 << 20)
            if page["text"]:
                yield page["text"]
            advanced = page["next_offset"] > offset
            offset = page["next_offset"]
            if page["complete"] or (should_stop is not None and should_stop()):
                return
            if not advanced or offset >= page["size"]:
                time.sleep(poll)

    def events(self, job_id: str, offset: int = 0) -> tuple[list[ProgressEvent], int, bool]:
        """Progress events since ``offset`` (the same events a local run writes), the next offset,
        and whether the job has ended and all events were read."""
        page = self._json("GET", f"/jobs/{job_id}/events", params={"offset": offset})
        events = [ProgressEvent(kind=e["kind"], data=e.get("data", {}), time=e.get("time", 0.0))
                  for e in page["events"]]
        return events, int(page["next_offset"]), bool(page["complete"])

    def wait(self, job_id: str, poll: float = 2.0, timeout: Optional[float] = None,
             on_status: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
        """Poll until the job has ended; returns its final record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.status(job_id)
            if on_status is not None:
                on_status(job)
            if job["state"] in FINAL_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise RemoteError(f"job {job_id} is still {job['state']} after {timeout:.0f} s")
            time.sleep(poll)

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/jobs/{job_id}/artifacts")

    def download(self, job_id: str, artifact: str = "model.zip", dest: Union[str, Path, None] = None,
                 progress: Optional[ProgressFn] = None) -> Path:
        """Download an artifact; resumes a partial download (``DEST.part``) with HTTP Range and
        checks the SHA-256 the server announced. Returns the file's path."""
        info = next((a for a in self.artifacts(job_id) if a["name"] == artifact), None)
        if info is None:
            job = self.status(job_id)
            names = ", ".join(a["name"] for a in job["artifacts"]) or "none"
            raise RemoteError(f"job {job_id} ({job['state']}) has no artifact {artifact!r}; it has: {names}",
                              status=404, url=self.server_url)
        target = Path(dest) if dest is not None else Path.cwd()
        if target.is_dir() or str(dest).endswith(("/", os.sep)):
            target = target / artifact
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        size, expected = int(info["size"]), info["sha256"]
        for verify_attempt in range(2):
            self._fetch(job_id, artifact, part, size, expected, progress)
            if _sha256_file(part) == expected:
                os.replace(part, target)
                return target
            part.unlink()  # damaged somewhere: the second try downloads it whole
        raise RemoteError(f"{artifact} of job {job_id} from {self.server_url} failed its SHA-256 check twice",
                          url=self.server_url)

    def _fetch(self, job_id: str, artifact: str, part: Path, size: int, sha256: str,
               progress: Optional[ProgressFn]) -> None:
        url = f"{self.api}/jobs/{job_id}/artifacts/{artifact}"
        failures = 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            if have == size:
                return
            # If-Range: a changed file is sent whole (200) instead of spliced onto an old prefix.
            headers = {"Range": f"bytes={have}-", "If-Range": f'"{sha256}"'} if have else {}
            try:
                with self.session.get(url, headers=headers, stream=True, timeout=self.timeout) as response:
                    if response.status_code in RETRY_STATUS:
                        raise requests.ConnectionError(f"server answered {response.status_code}")
                    if response.status_code == 416:
                        part.unlink(missing_ok=True)
                        continue
                    if response.status_code not in (200, 206):
                        raise self._error(response)
                    mode = "ab" if response.status_code == 206 else "wb"
                    written = have if mode == "ab" else 0
                    with open(part, mode) as out:
                        for block in response.iter_content(1 << 20):
                            out.write(block)
                            written += len(block)
                            if progress is not None:
                                progress(written, size)
                    failures = 0
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
                failures += 1
                if failures > self.retries:
                    raise self._unreachable(error) from None
                self._sleep(failures - 1)


# ---------------------------------------------------------------------------------------------
# CLI: autonnunet remote ...
# ---------------------------------------------------------------------------------------------


def describe(job: dict[str, Any]) -> str:
    """One line for a job: id, kind, state and what its progress says."""
    parts = [job["id"], job["kind"], job["state"]]
    p = job.get("progress") or {}
    if job["state"] == "queued" and job.get("queue_position") is not None:
        parts.append(f"position {job['queue_position'] + 1} in the queue")
    if p.get("stage") and job["state"] == "running":
        parts.append(f"stage {p['stage']}")
    if p.get("trial") is not None:
        rung = f", rung {p['rung']}" if p.get("rung") is not None else ""
        parts.append(f"trial {p['trial']}{rung}")
    if p.get("epoch") is not None:
        parts.append(f"epoch {p['epoch']}" + (f"/{p['max_epochs']}" if p.get("max_epochs") else ""))
    if p.get("trials_finished"):
        parts.append(f"{p['trials_finished']} trials done")
    if p.get("best_dice") is not None:
        parts.append(f"best Dice {p['best_dice']:.4f}")
    if p.get("eta_seconds") and job["state"] == "running":
        parts.append(f"ETA {_duration(p['eta_seconds'])}")
    if job.get("error"):
        parts.append(f"error: {job['error']}")
    return "  ".join(str(x) for x in parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def client_from_args(args: argparse.Namespace) -> RemoteClient:
    url = args.url or os.environ.get("AUTONNUNET_URL", "")
    token = args.token or os.environ.get("AUTONNUNET_TOKEN")
    return RemoteClient(url, token, timeout=(args.connect_timeout, args.read_timeout), retries=args.retries)


def _upload_progress(done: int, total: int) -> None:
    print(f"\ruploading {done / 2**20:.1f} / {total / 2**20:.1f} MB ({100 * done / max(total, 1):.0f}%)",
          end="" if done < total else "\n", file=sys.stderr, flush=True)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="server address, e.g. http://gpu-host:8765 (default: $AUTONNUNET_URL)")
    common.add_argument("--token", help="access token (default: $AUTONNUNET_TOKEN)")
    common.add_argument("--connect-timeout", type=float, default=DEFAULT_TIMEOUT[0], help=argparse.SUPPRESS)
    common.add_argument("--read-timeout", type=float, default=DEFAULT_TIMEOUT[1], help=argparse.SUPPRESS)
    common.add_argument("--retries", type=int, default=5, help="retries on connection errors (default: 5)")

    remote = subparsers.add_parser("remote", help="use a job server: upload, submit, follow, download",
                                   description="Talk to an `autonnunet serve` job server.")
    actions = remote.add_subparsers(dest="remote_command", metavar="ACTION", required=True)

    p = actions.add_parser("health", parents=[common], help="check that the server answers")
    p.set_defaults(func=_cmd_health)

    p = actions.add_parser("upload", parents=[common], help="upload a dataset folder or archive")
    p.add_argument("path", type=Path)
    p.add_argument("--kind", choices=["dataset", "images", "model"], default="dataset")
    p.set_defaults(func=_cmd_upload)

    submit = actions.add_parser("submit", help="submit a search, train or predict job")
    kinds = submit.add_subparsers(dest="kind", metavar="KIND", required=True)

    def job_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--idempotency-key", help="reuse to make a retried submit return the same job")
        parser.add_argument("--follow", action="store_true", help="print the job's log until it ends")

    s = kinds.add_parser("search", parents=[common], help="PriorBand search (same options as `autonnunet search`)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", type=Path, help="dataset folder or archive to upload (MSD or nnU-Net raw)")
    src.add_argument("--upload", help="id of a ready upload")
    s.add_argument("--space", choices=["hpo", "hpo_nas", "hpo_hnas"], default="hpo")
    s.add_argument("--profile", choices=["quick", "default"], default="default")
    for flag, kind in (("--min-epochs", int), ("--max-epochs", int), ("--eta", int), ("--total-epochs", int),
                       ("--max-trials", int), ("--wall-time", float), ("--iterations-per-epoch", int),
                       ("--runtime-weight", float), ("--seed", int)):
        s.add_argument(flag, type=kind)
    s.add_argument("--folds", nargs="+", default=["0"], help="fold numbers or 'all'")
    s.add_argument("--workers", type=int, default=1, help="parallel workers (GPUs) for this search")
    job_options(s)
    s.set_defaults(func=_cmd_submit)

    t = kinds.add_parser("train", parents=[common], help="train one configuration")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", type=Path)
    src.add_argument("--upload")
    t.add_argument("--epochs", type=int, required=True)
    t.add_argument("--config", help="TrialConfig as JSON text or a JSON file")
    t.add_argument("--folds", nargs="+", default=["0"])
    t.add_argument("--max-epochs", type=int)
    t.add_argument("--iterations-per-epoch", type=int)
    t.add_argument("--seed", type=int)
    job_options(t)
    t.set_defaults(func=_cmd_submit)

    pr = kinds.add_parser("predict", parents=[common], help="segment images with a model on the server")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of <case>_0000.nii.gz images to upload")
    src.add_argument("--images-upload")
    model = pr.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-job", help="id of a succeeded search or train job")
    model.add_argument("--model", type=Path, help="model zip to upload (from `autonnunet export-model`)")
    model.add_argument("--model-upload")
    pr.add_argument("--mirroring", action="store_true")
    pr.add_argument("--largest-component", action="store_true")
    job_options(pr)
    pr.set_defaults(func=_cmd_submit)

    p = actions.add_parser("status", parents=[common], help="a job's state and progress")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = actions.add_parser("logs", parents=[common], help="a job's log")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.add_argument("--offset", type=int, default=0)
    p.set_defaults(func=_cmd_logs)

    p = actions.add_parser("cancel", parents=[common], help="cancel a job (kills all its processes)")
    p.add_argument("job_id")
    p.set_defaults(func=_cmd_cancel)

    p = actions.add_parser("download", parents=[common], help="download a job's artifact (resumable, checked)")
    p.add_argument("job_id")
    p.add_argument("--artifact", default="model.zip", help="model.zip (default), results.json, trials.csv, ...")
    p.add_argument("-o", "--output", type=Path, default=None, help="file or folder (default: current folder)")
    p.set_defaults(func=_cmd_download)

    p = actions.add_parser("list", parents=[common], help="your jobs")
    p.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_list)


def _cmd_health(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    info = client.health()
    print(f"{client.server_url}: {info['status']}, version {info['version']}, {info['slots']} slot(s), "
          f"executor {info['executor']}" + (f", GPUs {','.join(info['gpus'])}" if info["gpus"] else ", CPU"))
    if client._has_token:
        print(f"token accepted for user {client.whoami()!r}")
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    record = client_from_args(args).upload_dataset(args.path, kind=args.kind, progress=_upload_progress)
    print(record["id"])
    if record.get("summary"):
        print(json.dumps(record["summary"]), file=sys.stderr)
    return 0


def _folds(values: list[str]) -> Union[str, list[int]]:
    if values == ["all"]:
        return "all"
    try:
        return [int(v) for v in values]
    except ValueError:
        raise RemoteError(f"--folds takes fold numbers or 'all', got {' '.join(values)}") from None


def _cmd_submit(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    if args.kind in ("search", "train"):
        upload_id = args.upload or client.upload_dataset(args.dataset, progress=_upload_progress)["id"]
    if args.kind == "search":
        params = {name: getattr(args, name) for name in (
            "space", "profile", "min_epochs", "max_epochs", "eta", "total_epochs", "max_trials", "wall_time",
            "iterations_per_epoch", "runtime_weight", "seed", "workers")}
        job = client.submit_search(upload_id, folds=_folds(args.folds), idempotency_key=args.idempotency_key,
                                   **params)
    elif args.kind == "train":
        config = None
        if args.config:
            text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
            config = json.loads(text)
        job = client.submit_train(upload_id, epochs=args.epochs, config=config, folds=_folds(args.folds),
                                  max_epochs=args.max_epochs, iterations_per_epoch=args.iterations_per_epoch,
                                  seed=args.seed, idempotency_key=args.idempotency_key)
    else:
        images = args.images_upload or client.upload_dataset(args.images, kind="images",
                                                             progress=_upload_progress)["id"]
        model_upload = args.model_upload
        if args.model is not None:
            model_upload = client.upload_file(args.model, kind="model", progress=_upload_progress)["id"]
        job = client.submit_predict(images, model_job_id=args.model_job, model_upload_id=model_upload,
                                    mirroring=args.mirroring, largest_component=args.largest_component,
                                    idempotency_key=args.idempotency_key)
    print(job["id"])
    if args.follow:
        for text in client.follow_logs(job["id"]):
            print(text, end="", flush=True)
        final = client.status(job["id"])
        print(describe(final), file=sys.stderr)
        return 0 if final["state"] == "succeeded" else 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    job = client_from_args(args).status(args.job_id)
    print(json.dumps(job, indent=2) if args.json else describe(job))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    if args.follow:
        for text in client.follow_logs(args.job_id, offset=args.offset):
            print(text, end="", flush=True)
        return 0
    offset = args.offset
    while True:
        page = client.logs(args.job_id, offset, limit=1 << 20)
        print(page["text"], end="")
        if page["next_offset"] >= page["size"] or page["next_offset"] == offset:
            return 0
        offset = page["next_offset"]


def _cmd_cancel(args: argparse.Namespace) -> int:
    print(describe(client_from_args(args).cancel(args.job_id)))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    def show(done: int, total: int) -> None:
        print(f"\rdownloading {done / 2**20:.1f} / {total / 2**20:.1f} MB", end="", file=sys.stderr, flush=True)

    path = client_from_args(args).download(args.job_id, args.artifact, args.output, progress=show)
    print(file=sys.stderr)
    print(path)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    jobs = client_from_args(args).list_jobs(state=args.state)
    if args.json:
        print(json.dumps(jobs, indent=2))
    for job in [] if args.json else jobs:
        print(describe(job))
    return 0
