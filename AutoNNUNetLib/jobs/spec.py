"""What a job runs and how it ended: the files of a job folder.

A job is a folder and a process group:

- ``job.json``: the :class:`JobSpec`, a list of :class:`Step` s, each one ``autonnunet`` command
  (``python -m AutoNNUNetLib <verb> ...``), possibly as several parallel workers (one per GPU,
  each with its own ``CUDA_VISIBLE_DEVICES``), or a small built-in action (zip the incumbent,
  write the trials table; see :mod:`.builtins`);
- ``log.txt``: stdout and stderr of everything the job runs;
- ``events.jsonl``: progress events (:mod:`AutoNNUNetLib.events`);
- ``supervisor.json``: the supervisor's pid (the job's process group), written when it starts,
  so whoever started the job can re-attach after a restart from the folder alone;
- ``cancel.request``: written by a canceller; the supervisor stops its steps gracefully (the way
  to ask on Windows, where a GUI process cannot send a console break to a hidden console);
- ``exit.json``: the :class:`JobExit`, written by the supervisor when it ends.

Standard library only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import AutoNNUNetError
from ..files import atomic_write_json
from ..states import JobState

SPEC_NAME = "job.json"
LOG_NAME = "log.txt"
EVENTS_NAME = "events.jsonl"
EXIT_NAME = "exit.json"
PID_NAME = "supervisor.json"
CANCEL_NAME = "cancel.request"
ARTIFACTS_DIR = "artifacts"
#: ``@model_dir:PATH`` in a step's argv stands for the model folder found under PATH when the
#: step runs (an imported zip's folder name is known only after the import step).
MODEL_DIR_PREFIX = "@model_dir:"


class JobError(AutoNNUNetError, RuntimeError):
    """A job could not be started, attached or controlled."""


@dataclass
class Step:
    """One step of a job.

    ``argv`` is an ``autonnunet`` command line (run as ``python -m AutoNNUNetLib ...``), or, when
    ``builtin`` is set, the name of a function in :data:`.builtins.BUILTINS` called with
    ``kwargs`` inside the supervisor (small file work that needs no heavy imports). ``workers``
    runs the command as several parallel processes, each with its environment overlay
    (``CUDA_VISIBLE_DEVICES``). ``done_marker`` makes a step run once across re-runs (and across
    jobs sharing a workspace, together with ``lock``, an exclusive file lock held while the step
    runs).
    """

    name: str
    argv: list[str] = field(default_factory=list)
    builtin: Optional[str] = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workers: Optional[list[dict[str, str]]] = None
    remote: bool = False        # may go to the cluster when the job's executor is slurm
    done_marker: Optional[str] = None
    lock: Optional[str] = None
    optional: bool = False      # a failure is logged but does not fail the job
    message: str = ""
    ok_codes: list[int] = field(default_factory=lambda: [0])  # exit codes that count as success
    command: Optional[list[str]] = None  # a plain command instead of an autonnunet verb


@dataclass
class SlurmOptions:
    """Resources of each Slurm worker (submitit parameters)."""

    partition: Optional[str] = None
    timeout_min: int = 24 * 60
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None
    gpus_per_node: int = 1
    additional: dict[str, Any] = field(default_factory=dict)  # e.g. {"account": "..."} -> slurm_additional_parameters


@dataclass
class JobSpec:
    job_dir: str
    steps: list[Step]
    env: dict[str, str] = field(default_factory=dict)
    executor: str = "local"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def dir(self) -> Path:
        return Path(self.job_dir)

    def save(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(self.dir / SPEC_NAME, asdict(self))

    @classmethod
    def load(cls, job_dir: Union[str, Path]) -> "JobSpec":
        raw = json.loads((Path(job_dir) / SPEC_NAME).read_text())
        raw["steps"] = [Step(**s) for s in raw["steps"]]
        raw["slurm"] = SlurmOptions(**raw.get("slurm", {}))
        return cls(**raw)

    @classmethod
    def single(cls, job_dir: Union[str, Path], argv: list[str], *, name: Optional[str] = None,
               env: Optional[dict[str, str]] = None) -> "JobSpec":
        """A job of one ``autonnunet`` command; ``--events`` is added when the verb is not given one."""
        job_dir = Path(job_dir).resolve()
        if "--events" not in argv:
            argv = [*argv, "--events", str(job_dir / EVENTS_NAME)]
        return cls(job_dir=str(job_dir), steps=[Step(name=name or argv[0], argv=list(argv))], env=dict(env or {}))


@dataclass
class JobExit:
    """How a job ended: ``state`` is succeeded, failed or cancelled."""

    state: str
    exit_code: Optional[int]
    message: str = ""

    def __post_init__(self) -> None:
        self.state = JobState(self.state)


def read_exit(job_dir: Union[str, Path]) -> Optional[JobExit]:
    """The job's end record, or None while it runs (or when its supervisor died without one)."""
    path = Path(job_dir) / EXIT_NAME
    try:
        return JobExit(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_exit(job_dir: Union[str, Path], ended: JobExit) -> None:
    atomic_write_json(Path(job_dir) / EXIT_NAME, asdict(ended), indent=None)


def read_log(path: Union[str, Path], offset: int = 0, limit: int = 65536) -> tuple[bytes, int]:
    """Up to ``limit`` bytes of a log from ``offset``; returns them and the next offset."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, offset))
            data = handle.read(max(0, limit))
    except FileNotFoundError:
        return b"", offset
    return data, offset + len(data)
