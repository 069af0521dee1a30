"""The one job abstraction: what a caller (Slicer module, server, CLI) sees of long work.

A job runs somewhere else (a supervisor process on this machine, or the job server) and is
watched by polling, so a UI thread never blocks: a QTimer calls :meth:`Job.poll` every second or
so and gets a :class:`JobUpdate` holding what is new since the previous call (events, log text)
and the state now. Both implementations follow the same protocol:

- :class:`~AutoNNUNetLib.jobs.local.LocalJob` (a supervisor process group on this machine),
- ``AutoNNUNetLib.remote.job.RemoteJob`` (a job on the server, through the HTTP client).

Re-attach after the caller restarts is a classmethod of each implementation, because what
identifies a job differs (a job folder here, a server URL and job id there); it returns a job
whose next :meth:`~Job.poll` reports the state now, finished or not.

Standard library only: the Slicer module and the server import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

from ..events import ProgressEvent
from ..states import JobState


@dataclass
class JobUpdate:
    """What changed in a job since the previous :meth:`Job.poll` (and its state now).

    ``events`` and ``log`` hold only what is new since the previous poll, so a caller appends
    them to what it shows; ``progress`` is the fold of *all* events so far (``None`` when the
    implementation does not fold them). ``message`` says how a finished job ended (the error of
    a failed one); ``exit_code`` is the process's, when there is one.
    """

    state: JobState
    events: list[ProgressEvent] = field(default_factory=list)
    log: str = ""
    progress: Optional[Any] = None
    message: str = ""
    exit_code: Optional[int] = None

    @property
    def done(self) -> bool:
        """The job has ended (succeeded, failed or cancelled); later polls return the same state."""
        return JobState(self.state).done


@runtime_checkable
class Job(Protocol):
    """A running or finished job, watched by polling (never blocks unless asked to with wait)."""

    @property
    def job_id(self) -> str:
        """A stable id: what a caller persists to re-attach (the folder name / the server's id)."""
        ...

    def poll(self) -> JobUpdate:
        """New events and log text since the last call, and the state now. Returns quickly."""
        ...

    def cancel(self) -> None:
        """Ask the job to stop and return at once: a graceful stop first (a search puts its running
        trial back to pending), a hard kill after a grace period. Polls report ``cancelled``."""
        ...

    def wait(self, timeout: Optional[float] = None) -> JobUpdate:
        """Block until the job ends or ``timeout`` seconds pass; the last update (all events and
        log text since the previous poll). Meant for scripts, tests and worker threads."""
        ...
