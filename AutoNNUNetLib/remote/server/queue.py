"""The job queue: FIFO with one slot per GPU; a thread starts, watches and finishes jobs.

Jobs run under their own supervisor process (:class:`~AutoNNUNetLib.jobs.local.LocalJob`), which
outlives the server: a restarted server re-attaches to running jobs and re-queues jobs whose
processes are gone; a re-run search continues its NePS root, so finished trials are kept.

Every change of a job's state happens under :attr:`JobQueue.lock`: starting a queued job (start
its supervisor, then mark it running) and cancelling it are one step each, so a cancel can never
fall between the two and leave a process running for a job that reads ``cancelled``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Optional

from ...files import sha256_file
from ...jobs import (
    ARTIFACTS_DIR, EVENTS_NAME, LOG_NAME, JobExit, JobSpec, LocalJob, PredictParams, SearchParams, SelectParams,
    TrainParams, plan_step, predict_steps, prepare_steps, read_exit, search_steps, select_steps, train_steps,
)
from ...jobs.params import Params
from ...processes import kill_process_group, process_group_members
from ...progress import ProgressReader
from ...states import JobState
from .settings import ID_RE, ApiError, DataDir, ServerSettings
from .store import FINAL_JOB_STATES, Artifact, IdempotencyConflict, JobRecord, Store, UploadRecord
from .views import JobView

log = logging.getLogger("AutoNNUNetLib.remote.server")

#: A search job's NePS root inside its job folder (a select job reads it).
SEARCH_ROOT = "root"

ARTIFACT_DESCRIPTIONS = {
    "model.zip": "the incumbent model (nnU-Net results layout, zip)", "results.json": "search results: trials and incumbent",
    "trials.csv": "table of all trials", "report.zip": "search report (HTML and plots)",
    "record.json": "training record", "predictions.zip": "predicted label maps",
    "selection.zip": "the selected model or ensemble with its postprocessing (nnU-Net files, zip)",
    "selection.json": "the selection: members, cross-validation Dice of every candidate, postprocessing",
}

#: The artifact a predict job's ``model_job_id`` takes its model from, by the source job's kind
#: (``autonnunet predict`` recognises a selection zip and predicts with the whole selection).
MODEL_ARTIFACTS = {"search": "model.zip", "train": "model.zip", "select": "selection.zip"}


class JobQueue:
    """FIFO queue with one slot per GPU; a background thread starts, watches and finishes jobs."""

    def __init__(self, settings: ServerSettings, store: Store, paths: DataDir):
        self.settings = settings
        self.store = store
        self.paths = paths
        self.lock = threading.RLock()
        self.handles: dict[str, LocalJob] = {}
        self.readers: dict[str, ProgressReader] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="job-queue", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; running jobs keep running and are re-attached by the next server."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the queue must survive a bad job; the error is in the server log
                log.exception("job queue tick failed")
            self._wake.wait(self.settings.poll_interval)
            self._wake.clear()

    # -- submit ---------------------------------------------------------------------------------
    def own(self, user: str, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id, user=user) if ID_RE.match(job_id) else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r} for user {user!r}")
        return job

    def _ready_upload(self, user: str, upload_id: str, kind: str) -> UploadRecord:
        record = self.store.get_upload(upload_id, user=user) if ID_RE.match(upload_id or "") else None
        if record is None:
            raise ApiError(404, f"no upload {upload_id!r} for user {user!r}")
        if record.kind != kind:
            raise ApiError(422, f"upload {upload_id} holds a {record.kind}, this job needs a {kind}")
        if record.state != "ready":
            detail = f": {record.error}" if record.error else ""
            raise ApiError(409, f"upload {upload_id} is {record.state}{detail}; a job needs a ready upload")
        return record

    def submit(self, user: str, kind: str, params: Params, idempotency_key: Optional[str]) -> tuple[JobRecord, bool]:
        """Queue a job whose request record was validated when it was parsed (422 before this)."""
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
            raise ApiError(422, "Idempotency-Key must be 1 to 200 characters")
        slots = 1
        if isinstance(params, SearchParams):
            self._ready_upload(user, params.upload_id, "dataset")
            slots = params.settings().workers
        elif isinstance(params, TrainParams):
            self._ready_upload(user, params.upload_id, "dataset")
        elif isinstance(params, SelectParams):
            self._search_to_select(user, params)
        else:
            self._ready_upload(user, params.images_upload_id, "images")
            if params.model_upload_id is not None:
                self._ready_upload(user, params.model_upload_id, "model")
            else:
                source = self.own(user, params.model_job_id or "")
                if source.kind not in MODEL_ARTIFACTS or source.state != JobState.SUCCEEDED:
                    raise ApiError(409, f"job {source.id} is a {source.state} {source.kind} job; predicting needs a "
                                        "succeeded search, train or select job")
                if not (self.paths.job(source.id) / ARTIFACTS_DIR / MODEL_ARTIFACTS[source.kind]).is_file():
                    raise ApiError(409, f"job {source.id} has no {MODEL_ARTIFACTS[source.kind]} artifact")
        if slots > len(self.settings.devices):
            raise ApiError(422, f"the job asks for {slots} workers but this server has {len(self.settings.devices)} "
                                f"slot(s) ({'GPUs ' + ','.join(self.settings.gpus) if self.settings.gpus else 'CPU'})")
        limit = self.settings.max_queued_jobs
        try:
            job, created = self.store.create_job(user, kind, params.to_dict(), slots=slots,
                                                 idempotency_key=idempotency_key, max_unfinished=limit)
        except IdempotencyConflict as error:
            raise ApiError(422, str(error)) from None
        if job is None:
            raise ApiError(429, f"user {user!r} has {limit} unfinished jobs, the most this server queues per user; "
                                "wait for some to end or cancel some")
        if created:
            self.wake()
        return job, created

    def _search_to_select(self, user: str, params: SelectParams) -> JobRecord:
        """The succeeded search job a select request names (its root and workspace are read)."""
        if not params.remote:
            raise ApiError(422, "invalid request: search_job_id: a select job on the server needs the id of a "
                                "succeeded search job")
        source = self.own(user, params.search_job_id or "")
        if source.kind != "search" or source.state != JobState.SUCCEEDED:
            raise ApiError(409, f"job {source.id} is a {source.state} {source.kind} job; a selection needs a "
                                "succeeded search job")
        if not (self.paths.job(source.id) / SEARCH_ROOT / "results.json").is_file():
            raise ApiError(409, f"job {source.id} has no search results")
        return source

    # -- the loop -------------------------------------------------------------------------------
    def tick(self) -> None:
        with self.lock:
            for job in self.store.list_jobs(states=(JobState.RUNNING,)):
                self._watch(job)
            self._start_queued()

    def _watch(self, job: JobRecord) -> None:
        job_dir = self.paths.job(job.id)
        handle = self.handles.get(job.id)
        if handle is None:
            # Not started by this server process: the server was restarted while the job ran.
            handle = LocalJob.attach(job_dir, job.pid)
            if handle is None:
                ended = read_exit(job_dir)
                if ended is None:
                    self._interrupted(job)
                else:
                    self._finish(job, ended)
                return
            self.handles[job.id] = handle
            # In the log only: a stage event would make the status read "stage server" from now on.
            self._note(job.id, "server restarted; re-attached to the running job", event=False)
        ended = handle.exit_status()
        self._update_progress(job)
        if ended is not None:
            self._finish(job, ended)

    def _reader(self, job_id: str) -> ProgressReader:
        reader = self.readers.get(job_id)
        if reader is None:
            reader = self.readers[job_id] = ProgressReader(self.paths.job(job_id) / EVENTS_NAME)
        return reader

    def _update_progress(self, job: JobRecord) -> None:
        reader = self._reader(job.id)
        if reader.poll():
            self.store.update_job(job.id, progress=reader.progress.to_dict(), events_offset=reader.offset)

    def _note(self, job_id: str, message: str, event: bool = True) -> None:
        """A line in the job's log (and a stage event) so users see what the server did to it."""
        job_dir = self.paths.job(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        with open(job_dir / LOG_NAME, "ab") as handle:
            handle.write(f"[autonnunet server] {time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n".encode())
        if event:
            from ...events import EventWriter

            EventWriter(job_dir / EVENTS_NAME).emit("stage", name="server", message=message)

    def _end_leftovers(self, job: JobRecord) -> None:
        """End what is left of a job's process group (workers of a supervisor that died), but only
        while the group still is this job's: pids get reused after a reboot."""
        if job.pid and process_group_members(job.pid) and _group_runs_job(job.pid, job.id):
            if kill_process_group(job.pid, grace=2.0) is False:
                log.warning("job %s: processes of group %s survive SIGKILL", job.id, job.pid)

    def _interrupted(self, job: JobRecord) -> None:
        """The job's processes are gone without an end record (server and job were killed)."""
        self._end_leftovers(job)
        if job.cancel_requested:
            self._finish(job, JobExit(JobState.CANCELLED, None, "cancelled"))
            return
        if job.attempts >= self.settings.max_attempts:
            self._finish(job, JobExit(JobState.FAILED, None, f"interrupted {job.attempts} times; giving up"))
            return
        self._note(job.id, f"job was interrupted (attempt {job.attempts}); queued to resume where it stopped")
        self.store.update_job(job.id, expect_state=JobState.RUNNING, state=JobState.QUEUED, pid=None, devices=None)
        self.handles.pop(job.id, None)

    def _start_queued(self) -> None:
        running = self.store.list_jobs(states=(JobState.RUNNING,))
        busy = {d for job in running for d in (job.devices or [])}
        free = [d for d in self.settings.devices if d not in busy]
        for job in self.store.list_jobs(states=(JobState.QUEUED,)):
            if job.cancel_requested:
                self.store.update_job(job.id, expect_state=JobState.QUEUED, state=JobState.CANCELLED,
                                      finished=time.time())
                continue
            if job.slots > len(free):
                break  # strict FIFO: a job needing several GPUs is not starved by smaller ones
            devices, free = free[: job.slots], free[job.slots:]
            try:
                spec = self.build_spec(job, devices)
                resumed = job.attempts > 0
                handle = LocalJob.start(
                    spec, banner=f"attempt {job.attempts + 1}" + (" (resuming)" if resumed else ""))
            except Exception as error:
                log.exception("job %s could not start", job.id)
                self.store.update_job(job.id, expect_state=JobState.QUEUED, state=JobState.FAILED,
                                      finished=time.time(), error=f"could not start: {error}")
                free = devices + free
                continue
            self.handles[job.id] = handle
            marked = self.store.update_job(job.id, expect_state=JobState.QUEUED, expect_cancel=False,
                                           state=JobState.RUNNING, pid=handle.pid, devices=devices,
                                           attempts=job.attempts + 1, started=job.started or time.time())
            if not marked:
                # The job was cancelled (or deleted) since it was read: its new processes must not
                # run on unseen, holding a slot that the queue counts as free.
                handle.stop(grace=2.0)
                self.handles.pop(job.id, None)
                self.store.update_job(job.id, expect_state=JobState.QUEUED, state=JobState.CANCELLED,
                                      finished=time.time())
                free = devices + free

    def _finish(self, job: JobRecord, ended: JobExit) -> None:
        self._end_leftovers(job)
        state = JobState.CANCELLED if job.cancel_requested else JobState(ended.state)
        artifacts = self._collect_artifacts(job.id) if state == JobState.SUCCEEDED else []
        if state == JobState.SUCCEEDED and not artifacts:
            state, ended = JobState.FAILED, JobExit(JobState.FAILED, ended.exit_code, "the job produced no artifacts")
        self._update_progress(job)
        error = failure_text(ended.message, self.paths.job(job.id) / LOG_NAME) if state == JobState.FAILED else None
        self.store.update_job(job.id, state=state, finished=time.time(), exit_code=ended.exit_code, error=error,
                              artifacts=artifacts)
        self.handles.pop(job.id, None)
        self.readers.pop(job.id, None)
        self.wake()

    def _collect_artifacts(self, job_id: str) -> list[Artifact]:
        folder = self.paths.job(job_id) / ARTIFACTS_DIR
        if not folder.is_dir():
            return []
        return [
            Artifact(path.name, path.stat().st_size, sha256_file(path), ARTIFACT_DESCRIPTIONS.get(path.name, ""))
            for path in sorted(folder.iterdir())
            if path.is_file() and not path.name.startswith(".") and not path.name.endswith((".tmp", ".sha256"))
        ]

    # -- cancel ---------------------------------------------------------------------------------
    def cancel(self, user: str, job_id: str) -> JobRecord:
        with self.lock:  # one step with the queue's start of a job: see the module's docstring
            job = self.own(user, job_id)
            if job.state in FINAL_JOB_STATES:
                return job
            self.store.update_job(job.id, cancel_requested=True)
            if self.store.update_job(job.id, expect_state=JobState.QUEUED, state=JobState.CANCELLED,
                                     finished=time.time()):
                return self.own(user, job_id)
            handle = self.handles.get(job.id) or LocalJob.attach(self.paths.job(job.id), job.pid)
        # Kill outside the queue lock: status polling and other jobs go on during the grace period.
        if handle is not None:
            handle.stop()
        elif job.pid and _group_runs_job(job.pid, job.id):
            kill_process_group(job.pid)
        with self.lock:
            current = self.store.get_job(job.id)
            if current is not None and current.state == JobState.RUNNING:
                self._note(job.id, "cancelled by the user", event=False)
                self._finish(current, JobExit(JobState.CANCELLED, None, "cancelled"))
        return self.own(user, job_id)

    def delete(self, user: str, job_id: str) -> None:
        with self.lock:
            job = self.own(user, job_id)
            if job.state not in FINAL_JOB_STATES:
                raise ApiError(409, f"job {job_id} is {job.state}; cancel it first")
            readers = self.unfinished_readers(job.id)
            if readers:
                raise ApiError(409, f"job {job_id} is read by unfinished job(s) {', '.join(readers)}")
            self.store.delete_job(job.id)
        shutil.rmtree(self.paths.job(job.id), ignore_errors=True)

    def unfinished_readers(self, object_id: str) -> list[str]:
        """Unfinished jobs that read ``object_id`` (an upload or a job), directly or through a job
        that names it: a select job reads its search job's root and that search's dataset."""
        readers: list[str] = []
        for job in self.store.jobs_using_upload(object_id):  # every job whose request names the id
            if job.id == object_id:
                continue
            if job.state not in FINAL_JOB_STATES:
                readers.append(job.id)
            elif job.kind == "search":
                readers += [j.id for j in self.store.jobs_using_upload(job.id)
                            if j.id != job.id and j.state not in FINAL_JOB_STATES]
        return list(dict.fromkeys(readers))

    # -- views ----------------------------------------------------------------------------------
    def view(self, job: JobRecord, position: Optional[int] = None) -> JobView:
        """The API's record of a job. ``position`` in the queue when known (a listing computes all
        positions in one query); else one count query for a queued job."""
        if job.state == JobState.QUEUED and position is None:
            position = self.store.queue_position(job.seq)
        return JobView(
            id=job.id, kind=job.kind, state=job.state, params=job.params, created=job.created, started=job.started,
            finished=job.finished, attempts=job.attempts, exit_code=job.exit_code, error=job.error,
            progress=job.progress, artifacts=job.artifacts, devices=job.devices,
            cancel_requested=job.cancel_requested, queue_position=position if job.state == JobState.QUEUED else None,
        )

    def list_views(self, user: str, state: Optional[str], offset: int, limit: int) -> list[JobView]:
        """A page of a user's jobs in queue order; queue positions from one query (linear)."""
        jobs = self.store.list_jobs(user=user, states=(state,) if state else None, limit=limit, offset=offset)
        queued = [job.seq for job in jobs if job.state == JobState.QUEUED]
        positions = self.store.queue_positions(queued) if queued else {}
        return [self.view(job, positions.get(job.seq)) for job in jobs]

    # -- what a job runs ------------------------------------------------------------------------
    def build_spec(self, job: JobRecord, devices: list[str]) -> JobSpec:
        """The job folder's steps, from the job kind's recipe (:mod:`AutoNNUNetLib.jobs.recipes`)."""
        job_dir = self.paths.job(job.id)
        job_dir.mkdir(parents=True, exist_ok=True)
        artifacts = job_dir / ARTIFACTS_DIR
        gpu = self.settings.uses_gpus
        device = "cuda" if gpu else "cpu"
        # One environment overlay per worker of a train/predict step.
        workers = [{"CUDA_VISIBLE_DEVICES": d if gpu else ""} for d in devices]
        if job.kind == "search":
            params = SearchParams.from_dict(job.params)
            workspace = self.paths.upload_workspace(params.upload_id)
            # The search runs its own NePS workers (one per visible GPU, or submitit/Slurm jobs), so
            # it gets all the job's GPUs in one CUDA_VISIBLE_DEVICES and its worker count.
            extra: list[str] = []
            if self.settings.executor in ("slurm", "submitit-local"):
                extra = ["--launcher", "submitit", "--executor",
                         "slurm" if self.settings.executor == "slurm" else "local"]
                if self.settings.executor == "slurm" and self.settings.slurm.partition:
                    extra += ["--slurm-partition", self.settings.slurm.partition]
            search_env = {"CUDA_VISIBLE_DEVICES": ",".join(devices) if gpu else ""}
            steps = prepare_steps(workspace, params.settings().configurations) + search_steps(
                params, job_dir, workspace, job_dir / SEARCH_ROOT, device=device, env=search_env, extra_argv=extra,
                artifacts=artifacts)
        elif job.kind == "train":
            params = TrainParams.from_dict(job.params)
            workspace = self.paths.upload_workspace(params.upload_id)
            steps = [plan_step(workspace)] + train_steps(params, job_dir, workspace, job_dir / "output",
                                                          device=device, workers=workers[:1], artifacts=artifacts)
        elif job.kind == "predict":
            params = PredictParams.from_dict(job.params)
            if params.model_upload_id is not None:
                model_zip = self.paths.upload_archive(params.model_upload_id)
            else:
                source = self.store.get_job(params.model_job_id or "")
                if source is None:
                    raise ApiError(409, f"job {params.model_job_id} is gone")
                model_zip = self.paths.job(source.id) / ARTIFACTS_DIR / MODEL_ARTIFACTS[source.kind]
            images_upload = self.store.get_upload(params.images_upload_id)
            if images_upload is None or not images_upload.summary:
                raise ApiError(409, f"upload {params.images_upload_id} is gone")
            images = self.paths.upload_content(params.images_upload_id) / images_upload.summary.get("folder", ".")
            # The recipe imports a model given as a .zip; an uploaded model is stored as "archive".
            model = model_zip if model_zip.suffix == ".zip" else _zip_link(model_zip, job_dir / "model-upload.zip")
            steps = predict_steps(params, job_dir, model, images, job_dir / "predictions", device=device,
                                  workers=workers[:1], artifacts=artifacts)
        elif job.kind == "select":
            params = SelectParams.from_dict(job.params)
            search = self.store.get_job(params.search_job_id or "")
            if search is None:
                raise ApiError(409, f"search job {params.search_job_id} is gone")
            workspace = self.paths.upload_workspace(SearchParams.from_dict(search.params).upload_id)
            # The selection root is this job's: a re-run (after an interruption) resumes its folds,
            # and the search job's folder is only read.
            # The plan step is the search's (a no-op by its marker); the other configurations are
            # preprocessed here, so the selection can train them where nnU-Net planned them.
            steps = prepare_steps(workspace, params.configurations) + select_steps(
                params, job_dir, workspace, self.paths.job(search.id) / SEARCH_ROOT, job_dir / "selection",
                device=device, workers=workers[:1], artifacts=artifacts)
        else:
            raise ApiError(422, f"unknown job kind {job.kind!r}")
        return JobSpec(job_dir=str(job_dir), steps=steps, executor=self.settings.executor,
                       slurm=self.settings.slurm, python=self.settings.python,
                       env={"AUTONNUNET_JOB_ID": job.id})


def _zip_link(source: Path, link: Path) -> Path:
    """A ``.zip`` name for an uploaded model archive (a hard link: no copy, same bytes)."""
    if not link.exists():
        os.link(source, link)
    return link


def failure_text(message: str, log_path: Path) -> str:
    """A failed job's error: the step's end in words (a signal by name) and its last error line.

    The supervisor reports ``step 'search' failed with exit code -9``; a user needs to read that
    the step was killed (SIGKILL: out of memory, an administrator) or what it printed last.
    """
    text = message or "failed"

    def name_signal(match: re.Match) -> str:
        number = -int(match.group(1))
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        hint = " (out of memory, or killed by someone)" if number == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"

    text = re.sub(r"failed with exit code (-\d+)", name_signal, text)
    last = last_error_line(log_path)
    if last and last not in text:
        text += f": {last}"
    return text


_ERROR_LINE = re.compile(r"(: error: |^[\w.]*(Error|Exception)\b[^:]*:|^error: )", re.IGNORECASE)


def last_error_line(log_path: Path, tail: int = 64 << 10) -> str:
    """The last line of the log's tail that reads as an error (the CLI's ``autonnunet VERB: error:``
    line, or the last line of a traceback); the server's and supervisor's own lines are skipped."""
    try:
        with open(log_path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - tail))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        line = line.strip()
        if not line or line.startswith(("[autonnunet job]", "[autonnunet server]")):
            continue
        if _ERROR_LINE.search(line):
            return line[:500]
    return ""


def _group_runs_job(pgid: int, job_id: str) -> bool:
    """Whether a process of group ``pgid`` carries this job's ``AUTONNUNET_JOB_ID`` (every
    process a job's steps start inherits it)."""
    marker = f"AUTONNUNET_JOB_ID={job_id}".encode()
    for pid in process_group_members(pgid):
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return True
        except OSError:
            continue
    return False
