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

import os
import shutil
import tarfile
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import requests

from ..errors import AutoNNUNetError
from ..events import ProgressEvent
from ..files import sha256_file
from ..states import JobState

DEFAULT_TIMEOUT = (10.0, 120.0)
DEFAULT_CHUNK = 16 << 20
#: Retry on these answers: the server (or a proxy in front of it) is restarting or overloaded. Never
#: 507 (a full disk does not free itself in seconds) nor 4xx: the same request would fail again.
RETRY_STATUS = (500, 502, 503, 504)
FINAL_STATES = tuple(state.value for state in JobState if state.done)

ProgressFn = Callable[[int, int], None]


class RemoteError(AutoNNUNetError, RuntimeError):
    """A request to the job server failed; the message names the server and what to do."""

    def __init__(self, message: str, status: Optional[int] = None, url: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.url = url


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
            429: f"the server at {where} refused more work for now (429): {detail}",
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
        record = self._json("POST", "/uploads", json={"size": size, "sha256": sha256_file(archive),
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

    def submit_select(self, search_job_id: str, *, idempotency_key: Optional[str] = None,
                      **params: Any) -> dict[str, Any]:
        """Queue nnU-Net's model selection on a succeeded search job (``epochs``, ``top``,
        ``configurations``, ``folds``, ``tta``, ``ensembles``, ...): finalize, then select."""
        return self._submit("select", {"search_job_id": search_job_id, **params}, idempotency_key)

    def status(self, job_id: str) -> dict[str, Any]:
        """The job record: ``state``, ``progress`` (trial, rung, epoch, best_dice, eta_seconds, ...),
        ``artifacts``, ``error``."""
        return self._json("GET", f"/jobs/{job_id}")

    def list_jobs(self, state: Optional[str] = None, page: int = 200) -> list[dict[str, Any]]:
        """All of the user's jobs in queue order (fetched a page at a time)."""
        jobs: list[dict[str, Any]] = []
        while True:
            params: dict[str, Any] = {"offset": len(jobs), "limit": page}
            if state:
                params["state"] = state
            batch = self._json("GET", "/jobs", params=params)
            jobs += batch
            if len(batch) < page:
                return jobs

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
            if sha256_file(part) == expected:
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
