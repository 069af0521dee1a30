"""A job on the job server behind the one Job protocol (:mod:`AutoNNUNetLib.jobs.job`).

:class:`RemoteJob` is what the Slicer module holds for a remote search, train, predict or select, the
same way it holds a :class:`~AutoNNUNetLib.jobs.local.LocalJob` for a local one: ``poll()``
gives a :class:`~AutoNNUNetLib.jobs.job.JobUpdate` (state, the events and log text that are new,
the progress fold), ``cancel()``, ``wait()``, ``job_id``, and :meth:`RemoteJob.attach` to pick a
job up again by its id after a restart.

Every network call runs in one worker thread: ``poll()`` only collects what that thread fetched
and starts the next fetch, so it never waits on the network and can be called from a UI timer.
Network errors are retried by the client; one that outlasts its retries ends the job's updates
as ``failed`` with the client's message (the job on the server is not touched).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..jobs.job import JobUpdate
from ..progress import SearchProgress
from ..states import JobState
from .client import RemoteClient, RemoteError

#: What a successful job's download step fetches into ``download_dir`` (the first is required).
DOWNLOADS = {"search": ("model.zip", "results.json"), "train": ("model.zip", "record.json"),
             "predict": ("predictions.zip",), "select": ("selection.zip", "selection.json")}


class RemoteJob:
    """A server job watched by polling. Build one with :meth:`submit`, :meth:`start` or :meth:`attach`.

    With ``download_dir``, a job that succeeds is reported ``succeeded`` only after its main
    artifact (``model.zip``, or ``predictions.zip`` for predict) was downloaded and checked there;
    :attr:`output` is then its path.
    """

    def __init__(self, client: RemoteClient, job_id: Optional[str] = None, *,
                 download_dir: Union[str, Path, None] = None,
                 submit: Optional[Callable[[], dict[str, Any]]] = None, kind: str = ""):
        self.client = client
        self.kind = kind
        self.download_dir = Path(download_dir) if download_dir is not None else None
        self.output: Optional[Path] = None
        self.record: dict[str, Any] = {}  # the server's job record, as of the last fetch
        self.progress = SearchProgress()
        self._job_id = job_id
        self._state = JobState.QUEUED
        self._message = ""
        self._log_offset = 0
        self._event_offset = 0
        self._done = False
        self._cancel_requested = False
        self._cancel_sent = False
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autonnunet-remote")
        self._pending: Future = self._executor.submit(self._submit, submit) if submit else self._executor.submit(
            self._fetch)

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def submit(cls, client: RemoteClient, kind: str, params: dict[str, Any], *,
               idempotency_key: Optional[str] = None, **options: Any) -> "RemoteJob":
        """Submit a job on ready uploads (``params`` as the server's request record) and watch it."""
        submitters = {"search": client.submit_search, "train": client.submit_train}
        if kind in submitters:
            body = dict(params)
            upload = body.pop("upload_id")
            call = lambda: submitters[kind](upload, idempotency_key=idempotency_key, **body)  # noqa: E731
        elif kind == "predict":
            body = dict(params)
            images = body.pop("images_upload_id")
            call = lambda: client.submit_predict(images, idempotency_key=idempotency_key, **body)  # noqa: E731
        elif kind == "select":
            body = dict(params)
            search = body.pop("search_job_id")
            call = lambda: client.submit_select(search, idempotency_key=idempotency_key, **body)  # noqa: E731
        else:
            raise RemoteError(f"unknown job kind {kind!r}; use search, train, predict or select")
        return cls(client, submit=call, kind=kind, **options)

    @classmethod
    def start_search(cls, client: RemoteClient, dataset: Union[str, Path], params: dict[str, Any],
                     **options: Any) -> "RemoteJob":
        """Upload a dataset folder or archive, then submit a search on it; returns at once (both
        run in the worker thread; ``job_id`` is None until the submit has returned)."""

        def call() -> dict[str, Any]:
            upload = client.upload_dataset(dataset)  # resumable, checked by SHA-256, waits for validation
            return client.submit_search(upload["id"], **params)

        return cls(client, submit=call, kind="search", **options)

    @classmethod
    def attach(cls, client: RemoteClient, job_id: str, **options: Any) -> "RemoteJob":
        """Watch a job submitted earlier (e.g. before Slicer restarted). Raises
        :class:`RemoteError` (404) when the server has no such job for this token."""
        record = client.status(job_id)
        job = cls(client, job_id, kind=record.get("kind", ""), **options)
        job.record = record
        return job

    # -- the protocol -------------------------------------------------------------------------------

    @property
    def job_id(self) -> str:
        return self._job_id or ""

    @property
    def state(self) -> JobState:
        return self._state

    def poll(self) -> JobUpdate:
        """What the worker thread fetched since the last call; starts the next fetch. Never blocks."""
        with self._lock:
            if self._done or not self._pending.done():
                return self._update()
            return self._collect(self._pending)

    def wait(self, timeout: Optional[float] = None, interval: float = 1.0) -> JobUpdate:
        """Poll until the job has ended (and its download is done); all news since the last poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        total = JobUpdate(state=self._state)
        while True:
            with self._lock:
                future = self._pending
            future_done = future.done() or _wait_future(future, interval)
            update = self.poll() if future_done else self._update()
            total.events += update.events
            total.log += update.log
            total.state, total.message, total.progress = update.state, update.message, update.progress
            total.exit_code = update.exit_code
            if update.done:
                return total
            if deadline is not None and time.monotonic() > deadline:
                return total
            if future_done:
                time.sleep(interval)

    def cancel(self) -> None:
        """Ask the server to cancel (it kills the job's whole process tree); returns at once. A
        job still being uploaded or submitted is cancelled as soon as the submit returns."""
        # The worker thread runs one call at a time: the cancel goes out right after the fetch in
        # flight, whose news the next poll still reports.
        self._cancel_requested = True

    def close(self) -> None:
        """Stop fetching (the job on the server runs on; :meth:`attach` finds it again)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- caller side --------------------------------------------------------------------------------

    def _update(self, **fields: Any) -> JobUpdate:
        return JobUpdate(state=self._state, progress=self.progress, message=self._message,
                         exit_code=self.record.get("exit_code"), **fields)

    def _collect(self, future: Future) -> JobUpdate:
        try:
            result = future.result()
        except Exception as error:  # the client already retried: report it and stop watching
            self._end(JobState.FAILED, f"{error}")
            return self._update()
        events, log = result.get("events", []), result.get("log", "")
        for event in events:
            self.progress.update(event)
        if result.get("finished"):
            self._end(JobState(result["state"]), result.get("message", ""))
        else:
            self._state = JobState(result.get("state", self._state))
            if self._cancel_requested and not self._cancel_sent:
                self._cancel_sent = True
                self._pending = self._executor.submit(self._cancel)
            elif self._state == JobState.SUCCEEDED and self.download_dir is not None:
                self._state = JobState.RUNNING  # not done for the caller until the model is here
                self._pending = self._executor.submit(self._download)
            else:
                self._pending = self._executor.submit(self._fetch)
        return self._update(events=events, log=log)

    def _end(self, state: JobState, message: str) -> None:
        self._done, self._state, self._message = True, state, message
        self._executor.shutdown(wait=False)

    # -- worker-thread side: the only place the client is called ------------------------------------

    def _submit(self, call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        record = call()
        self._job_id = str(record["id"])
        self.kind = self.kind or record.get("kind", "")
        self.record = record
        return {"state": record.get("state", JobState.QUEUED), "submitted": True,
                "log": f"Submitted remote job {self._job_id} to {self.client.server_url}\n"}

    def _fetch(self) -> dict[str, Any]:
        record = self.client.status(self.job_id)
        self.record = record
        events, self._event_offset, _complete = self.client.events(self.job_id, self._event_offset)
        page = self.client.logs(self.job_id, self._log_offset, limit=1 << 20)
        self._log_offset = int(page.get("next_offset", self._log_offset))
        state = JobState(record["state"])
        result: dict[str, Any] = {"state": state, "events": events, "log": page.get("text", "")}
        # Finished only when the log and events are read to their end: the last lines of a
        # failed job are what the user needs.
        drained = page.get("complete", True) and _complete
        if state.done and state != JobState.SUCCEEDED and drained:
            result.update(finished=True, message=str(record.get("error") or state.value))
        elif state == JobState.SUCCEEDED and drained and self.download_dir is None:
            result.update(finished=True, message="succeeded")
        elif state == JobState.SUCCEEDED and not drained:
            result["state"] = JobState.RUNNING  # report success with the last of the log
        return result

    def _download(self) -> dict[str, Any]:
        assert self.download_dir is not None
        self.download_dir.mkdir(parents=True, exist_ok=True)
        names = DOWNLOADS.get(self.kind, ("model.zip",))
        self.output = self.client.download(self.job_id, names[0], self.download_dir)
        for name in names[1:]:
            try:
                self.client.download(self.job_id, name, self.download_dir)
            except RemoteError:  # a bonus next to the model; the model is what matters
                pass
        return {"state": JobState.SUCCEEDED, "finished": True, "message": f"{names[0]} downloaded to {self.output}"}

    def _cancel(self) -> dict[str, Any]:
        record = self.client.cancel(self.job_id)
        self.record = record
        result = self._fetch()
        if not result.get("finished"):
            result["state"] = JobState(record["state"])
        return result


def _wait_future(future: Future, timeout: Optional[float]) -> bool:
    """Wait for ``future`` without raising; whether it is done."""
    try:
        future.exception(timeout=timeout)
    except Exception:  # TimeoutError or CancelledError: not done (or never will be)
        return future.done()
    return True
