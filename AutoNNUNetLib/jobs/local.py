"""The local Job: a supervisor process group on this machine (used by the server and by Slicer).

:meth:`LocalJob.start` writes the job folder's spec and starts ``python -m AutoNNUNetLib.jobs
supervise JOB_DIR`` as the leader of a new process group (a new session on POSIX; a new console
group with no window on Windows), so cancelling reaches the whole tree and never the caller.
The supervisor's pid is written to ``supervisor.json`` in the folder, so after a restart of the
caller :meth:`LocalJob.open` finds the job again from the folder alone.

Everything here returns quickly: a Slicer QTimer calls :meth:`LocalJob.poll` on the UI thread.
Standard library only.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Optional, Union

from ..files import atomic_write_json, read_json
from ..processes import (
    CANCEL_GRACE_SECONDS, IS_WINDOWS, kill_process_group, pid_alive, process_group_members, signal_group,
)
from ..progress import ProgressReader, SearchProgress
from ..states import JobState
from .job import JobUpdate
from .spec import (
    CANCEL_NAME, EVENTS_NAME, EXIT_NAME, LOG_NAME, PID_NAME, JobError, JobExit, JobSpec, read_exit, read_log,
)

#: Most log bytes one poll reads: a UI that re-attaches to a long job catches up over a few polls.
LOG_CHUNK = 256 * 1024


def _is_supervisor_of(pid: int, job_dir: Path) -> bool:
    """Guard against pid reuse: the pid must still be the supervisor of this job folder."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():  # no /proc (macOS, Windows): trust a live pid from the folder's own file
        return pid_alive(pid)
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return str(job_dir).encode() in args and b"supervise" in args


def supervisor_creation_flags() -> dict[str, Any]:
    """Popen arguments that make the supervisor the leader of its own process group.

    On Windows: a new process group with no console window (closing a visible console would kill
    the job, and Slicer's ``launchConsoleProcess`` hides it the same way)."""
    if IS_WINDOWS:
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}  # type: ignore[attr-defined]
    return {"start_new_session": True}


class LocalJob:
    """A job's supervisor on this machine: start, re-attach, poll, cancel, read its log.

    Implements :class:`~AutoNNUNetLib.jobs.job.Job`. ``job_id`` is the folder's name.
    """

    def __init__(self, job_dir: Union[str, Path], pid: Optional[int], process: Optional[subprocess.Popen] = None):
        self.job_dir = Path(job_dir).resolve()
        self.pid = pid  # also the process group id: the supervisor leads its own group
        self._process = process
        self.tracker = ProgressReader(self.job_dir / EVENTS_NAME)
        self._log_offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._kill_deadline: Optional[float] = None
        self._cancelled = False

    # -- paths ----------------------------------------------------------------------------------
    @property
    def job_id(self) -> str:
        return self.job_dir.name

    @property
    def log_path(self) -> Path:
        return self.job_dir / LOG_NAME

    @property
    def events_path(self) -> Path:
        return self.job_dir / EVENTS_NAME

    # -- start and re-attach --------------------------------------------------------------------
    @classmethod
    def start(cls, spec: JobSpec, *, env: Optional[dict[str, str]] = None, banner: str = "") -> "LocalJob":
        """Write the spec and start its supervisor in a new process group.

        ``env`` is the complete environment of the job (default: this process's); the Slicer
        module passes its own so it never has to change ``os.environ``. Starting a folder again
        (after an interruption) resumes it: finished steps with a marker are skipped.
        """
        job_dir = spec.dir.resolve()
        spec.job_dir = str(job_dir)
        spec.save()
        for stale in (EXIT_NAME, CANCEL_NAME):  # a re-run must not report the previous attempt's end
            with contextlib.suppress(FileNotFoundError):
                (job_dir / stale).unlink()
        run_env = dict(os.environ if env is None else env)
        run_env["PYTHONUNBUFFERED"] = "1"  # log lines appear as they are printed
        with open(job_dir / LOG_NAME, "ab") as log:
            if banner:
                log.write(f"\n=== {banner} ===\n".encode())
                log.flush()
            process = subprocess.Popen(
                [spec.python, "-m", "AutoNNUNetLib.jobs", "supervise", str(job_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=run_env, cwd=str(job_dir), **supervisor_creation_flags(),
            )
        atomic_write_json(job_dir / PID_NAME, {"pid": process.pid, "started": time.time()})
        return cls(job_dir, process.pid, process)

    @classmethod
    def attach(cls, job_dir: Union[str, Path], pid: Optional[int] = None) -> Optional["LocalJob"]:
        """The job's supervisor if it is still running, else None (the server's re-attach).

        ``pid`` defaults to the one recorded in the folder's ``supervisor.json``.
        """
        job_dir = Path(job_dir).resolve()
        if pid is None:
            pid = _recorded_pid(job_dir)
        if pid is None or not pid_alive(pid) or not _is_supervisor_of(pid, job_dir):
            return None
        return cls(job_dir, pid)

    @classmethod
    def open(cls, job_dir: Union[str, Path]) -> "LocalJob":
        """The job of a folder, running or finished (the Slicer module's re-attach after a
        restart): its first :meth:`poll` replays the events and log written so far."""
        job_dir = Path(job_dir).resolve()
        if not (job_dir / "job.json").is_file():
            raise JobError(f"{job_dir} is not a job folder (no job.json)")
        running = cls.attach(job_dir)
        return running if running is not None else cls(job_dir, None)

    # -- state ----------------------------------------------------------------------------------
    def running(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return self.pid is not None and pid_alive(self.pid) and _is_supervisor_of(self.pid, self.job_dir)

    def exit_status(self) -> Optional[JobExit]:
        """None while running; then how it ended (from ``exit.json``; a supervisor that died
        without writing it, e.g. killed with SIGKILL, counts as failed).

        Also finishes a :meth:`cancel`: SIGKILL to what is left of the tree once the grace
        period is over, or at once when the supervisor has already ended.
        """
        alive = self.running()
        if self._kill_deadline is not None and self.pid is not None and (
                not alive or time.monotonic() > self._kill_deadline):
            if process_group_members(self.pid):
                signal_group(self.pid, hard=True)
            if not alive:
                self._kill_deadline = None
        if alive:
            return None
        # The supervisor is gone: whatever is left of its group (a worker of a supervisor that was
        # killed alone) would hold a GPU or a slot unseen. End it; the pid cannot have been reused
        # while the group has members.
        if self.pid is not None and not IS_WINDOWS and process_group_members(self.pid):
            signal_group(self.pid, hard=True)
        ended = read_exit(self.job_dir)
        if ended is not None:
            return ended
        code = self._process.returncode if self._process is not None else None
        if self._cancelled or (self.job_dir / CANCEL_NAME).exists():  # killed before it could record its end
            return JobExit(JobState.CANCELLED, code, "cancelled")
        return JobExit(JobState.FAILED, code, f"the job's supervisor died unexpectedly (exit code {code})")

    def poll(self) -> JobUpdate:
        """New events and log text since the last poll, and the state now (never blocks long)."""
        ended = self.exit_status()
        events = self.tracker.poll()
        log = self._read_new_log()
        if ended is None:
            return JobUpdate(JobState.RUNNING, events, log, self.tracker.progress)
        # Ended: drain what was written between the check and the reads above.
        while True:
            more_events, more_log = self.tracker.poll(), self._read_new_log()
            if not more_events and not more_log:
                break
            events += more_events
            log += more_log
        return JobUpdate(ended.state, events, log, self.tracker.progress, ended.message, ended.exit_code)

    def _read_new_log(self) -> str:
        data, self._log_offset = read_log(self.log_path, self._log_offset, LOG_CHUNK)
        return self._decoder.decode(data)

    def wait(self, timeout: Optional[float] = None) -> JobUpdate:
        """Poll until the job ends or ``timeout`` passes; everything new since the last poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        total = self.poll()
        while not total.done and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.1)
            update = self.poll()
            total = JobUpdate(update.state, total.events + update.events, total.log + update.log,
                              update.progress, update.message, update.exit_code)
        return total

    # -- cancel ---------------------------------------------------------------------------------
    def cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """Ask the job to stop and return at once.

        The supervisor is asked gracefully (a ``cancel.request`` file, plus SIGTERM to the group on
        POSIX) and stops its steps, so a search puts its running trial back to pending; later
        :meth:`poll` calls kill whatever is left after ``grace`` seconds.
        """
        self._cancelled = True
        with contextlib.suppress(OSError):
            atomic_write_json(self.job_dir / CANCEL_NAME, {"time": time.time()})
        if self.pid is not None and not IS_WINDOWS:  # Windows' signal_group is a hard kill
            signal_group(self.pid, hard=False)
        self._kill_deadline = time.monotonic() + grace

    # Older name of the non-blocking cancel.
    request_cancel = cancel

    def stop(self, grace: float = CANCEL_GRACE_SECONDS) -> bool:
        """Blocking cancel: terminate the whole tree and wait; True when no process of the group is left."""
        self._cancelled = True
        if self.pid is None:
            return True
        with contextlib.suppress(OSError):
            atomic_write_json(self.job_dir / CANCEL_NAME, {"time": time.time()})
        reap = (lambda: self._process.poll()) if self._process is not None else None
        return kill_process_group(self.pid, grace=grace, reap=reap)

    # -- reading --------------------------------------------------------------------------------
    def group_members(self) -> list[int]:
        return process_group_members(self.pid) if self.pid is not None else []

    def progress(self) -> SearchProgress:
        self.tracker.poll()
        return self.tracker.progress

    def read_log(self, offset: int = 0, limit: int = 65536) -> tuple[bytes, int]:
        return read_log(self.log_path, offset, limit)


def _recorded_pid(job_dir: Path) -> Optional[int]:
    record = read_json(job_dir / PID_NAME)
    pid = record.get("pid") if isinstance(record, dict) else None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None
