"""States and names shared by the producers and the consumers of progress.

The search writes a trial's state, the progress fold (CLI, server, Slicer) reads it; the job store
writes a job's state, the client and the module read it. Both sides import the same enum, so a
string typed differently on one side (``"success"`` vs ``"succeeded"``) cannot happen again.
They are StrEnums: they compare equal to, and serialise as, their plain string values.
"""

from __future__ import annotations

from enum import StrEnum


class TrialState(StrEnum):
    """A trial of a search (one configuration at one rung)."""

    PENDING = "pending"
    EVALUATING = "evaluating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the configuration trained but could not be scored (e.g. diverged)
    CRASHED = "crashed"  # the trial raised

    @property
    def done(self) -> bool:
        return self in (TrialState.SUCCEEDED, TrialState.FAILED, TrialState.CRASHED)


class JobState(StrEnum):
    """A job (local or remote): search, train, predict, dataset preparation."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class EventKind(StrEnum):
    """Kinds of :class:`~AutoNNUNetLib.events.ProgressEvent` (their data keys: see events.py)."""

    STAGE = "stage"
    TRIAL_STARTED = "trial_started"
    EPOCH = "epoch"
    TRIAL_FINISHED = "trial_finished"
    BEST = "best"
    PROGRESS = "progress"
    FINISHED = "finished"


class Executor(StrEnum):
    """Where the server runs a job's workers."""

    LOCAL = "local"  # subprocesses on this machine
    SLURM = "slurm"  # submitit jobs on a Slurm cluster
    SUBMITIT_LOCAL = "submitit-local"  # submitit's local emulation (tests, single nodes)
