"""Jobs: the one way long work (search, train, predict) runs, locally or on the job server.

A job is a folder and a process group:

- ``job.json``: the :class:`JobSpec`: a list of :class:`Step` s, each one ``autonnunet`` command
  (``python -m AutoNNUNetLib <verb> ...``), possibly as several parallel workers (one per GPU,
  each with its own ``CUDA_VISIBLE_DEVICES``), or a small built-in action (zip the incumbent, write
  the trials table);
- ``log.txt``: stdout and stderr of everything the job runs;
- ``events.jsonl``: progress events (:mod:`AutoNNUNetLib.events`) from which :class:`Progress` is
  derived, so the Slicer module, the CLI and the server show the same thing;
- ``exit.json``: written by the supervisor when it ends (state, exit code, message).

:class:`LocalJob` starts ``python -m AutoNNUNetLib.jobs supervise JOB_DIR`` in a new session (its
own process group). The supervisor runs the steps as its children, so cancelling is one
``killpg`` of the whole tree, and nothing survives it. Because the supervisor records its own
exit in ``exit.json`` and does not depend on its parent, a job keeps running when the server that
started it dies: a restarted server re-attaches to it (:meth:`LocalJob.attach`), or, when the
process group is gone too (machine reboot), starts the supervisor again on the same folder. The
steps are written so that a re-run resumes: preparation steps leave a marker and are skipped, and
the search is NePS's, which continues its root directory.

With ``executor="slurm"`` the worker steps go to a Slurm cluster through submitit (same command,
one Slurm job per worker with one GPU each); the supervisor stays on the server and waits for them.

This module imports only the standard library at the top: the Slicer module uses it to run local
jobs, and the supervisor must start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

from .errors import AutoNNUNetError
from .events import EventWriter, ProgressEvent, read_events
# The server runs on Linux; local jobs (the Slicer module) may run on Windows, where a process
# group is a console group and the tree is ended with ``taskkill /T`` (see .processes).
from .processes import (
    CANCEL_GRACE_SECONDS, IS_WINDOWS, kill_process_group, pid_alive, process_group_members, signal_group,
)

JobKind = Literal["search", "train", "predict"]
JOB_KINDS: tuple[str, ...] = ("search", "train", "predict")
EXECUTORS: tuple[str, ...] = ("local", "slurm", "submitit-local")

SPEC_NAME = "job.json"
LOG_NAME = "log.txt"
EVENTS_NAME = "events.jsonl"
EXIT_NAME = "exit.json"
ARTIFACTS_DIR = "artifacts"
MODEL_DIR_PREFIX = "@model_dir:"


class JobError(AutoNNUNetError, RuntimeError):
    """A job could not be started, attached or controlled."""


# ---------------------------------------------------------------------------------------------
# Parameters: what a user can ask of each job kind. The same records validate the server's JSON
# (FastAPI/pydantic read stdlib dataclasses; ``__pydantic_config__`` forbids unknown keys so a typo
# is an error, not a silently ignored setting) and build the CLI arguments of local runs.
# ---------------------------------------------------------------------------------------------


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _folds_argv(folds: Union[str, list[int]]) -> list[str]:
    if folds == "all":
        return ["all"]
    _check(isinstance(folds, list) and len(folds) > 0, "folds must be 'all' or a non-empty list of fold numbers")
    _check(all(isinstance(f, int) and 0 <= f <= 4 for f in folds), "fold numbers must be in 0..4")
    return [str(f) for f in folds]


@dataclass
class SearchParams:
    """A PriorBand search (``autonnunet search``) on an uploaded dataset."""

    __pydantic_config__ = {"extra": "forbid"}

    upload_id: str = ""
    space: Literal["hpo", "hpo_nas", "hpo_hnas"] = "hpo"
    profile: Literal["quick", "default"] = "default"
    min_epochs: Optional[int] = None
    max_epochs: Optional[int] = None
    eta: Optional[int] = None
    total_epochs: Optional[int] = None
    max_trials: Optional[int] = None
    wall_time: Optional[float] = None
    folds: Union[Literal["all"], list[int]] = field(default_factory=lambda: [0])
    iterations_per_epoch: Optional[int] = None
    runtime_weight: Optional[float] = None
    seed: Optional[int] = None
    workers: int = 1  # parallel NePS workers; each takes one GPU (or one CPU slot)

    def __post_init__(self) -> None:
        for name in ("min_epochs", "max_epochs", "total_epochs", "max_trials", "iterations_per_epoch", "workers"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and value >= 1), f"{name} must be a positive integer")
        _check(self.eta is None or self.eta >= 2, "eta must be at least 2")
        _check(self.wall_time is None or self.wall_time > 0, "wall_time must be positive (seconds)")
        _check(self.runtime_weight is None or self.runtime_weight >= 0, "runtime_weight must be >= 0")
        if self.min_epochs is not None and self.max_epochs is not None:
            _check(self.min_epochs <= self.max_epochs, "min_epochs must not exceed max_epochs")
        _folds_argv(self.folds)

    def to_argv(self, workdir: Union[str, Path], root: Union[str, Path]) -> list[str]:
        """Arguments of ``autonnunet search`` (without ``--events``/``--device``)."""
        argv = ["search", "--workdir", str(workdir), "--root", str(root), "--space", self.space,
                "--profile", self.profile, "--folds", *_folds_argv(self.folds)]
        for name in ("min_epochs", "max_epochs", "eta", "total_epochs", "max_trials", "wall_time",
                     "iterations_per_epoch", "runtime_weight", "seed"):
            value = getattr(self, name)
            if value is not None:
                argv += ["--" + name.replace("_", "-"), str(value)]
        return argv


@dataclass
class TrainParams:
    """One nnU-Net training (``autonnunet train``) of a configuration on an uploaded dataset."""

    __pydantic_config__ = {"extra": "forbid"}

    upload_id: str = ""
    epochs: int = 100
    config: Optional[dict[str, Any]] = None  # TrialConfig fields; None = nnU-Net default
    folds: Union[Literal["all"], list[int]] = field(default_factory=lambda: [0])
    max_epochs: Optional[int] = None
    iterations_per_epoch: Optional[int] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        _check(isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be a positive integer")
        for name in ("max_epochs", "iterations_per_epoch"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and value >= 1), f"{name} must be a positive integer")
        if self.max_epochs is not None:
            _check(self.max_epochs >= self.epochs, "max_epochs must be at least epochs")
        _folds_argv(self.folds)
        if self.config is not None:  # refuse a bad configuration now, not after queueing and planning
            from .config import TrialConfig

            try:
                TrialConfig.from_dict(self.config).validate()
            except (TypeError, ValueError) as error:
                raise ValueError(f"config: {error}") from None

    def to_argv(self, workdir: Union[str, Path], output: Union[str, Path],
                config_file: Optional[Union[str, Path]] = None) -> list[str]:
        argv = ["train", "--workdir", str(workdir), "--epochs", str(self.epochs), "--output", str(output),
                "--folds", *_folds_argv(self.folds)]
        if config_file is not None:
            argv += ["--config", str(config_file)]
        for name in ("max_epochs", "iterations_per_epoch", "seed"):
            value = getattr(self, name)
            if value is not None:
                argv += ["--" + name.replace("_", "-"), str(value)]
        return argv


@dataclass
class PredictParams:
    """Segment uploaded images (``autonnunet predict``) with a model from a job or an upload."""

    __pydantic_config__ = {"extra": "forbid"}

    images_upload_id: str = ""
    model_job_id: Optional[str] = None     # a finished search/train job of the same user
    model_upload_id: Optional[str] = None  # or an uploaded model zip
    mirroring: bool = False
    largest_component: bool = False

    def __post_init__(self) -> None:
        _check((self.model_job_id is None) != (self.model_upload_id is None),
               "give exactly one of model_job_id and model_upload_id")

    def to_argv(self, model_dir: Union[str, Path], images: Union[str, Path], output: Union[str, Path]) -> list[str]:
        argv = ["predict", "--model", str(model_dir), "-i", str(images), "-o", str(output)]
        if self.mirroring:
            argv.append("--mirroring")
        if self.largest_component:
            argv.append("--largest-component")
        return argv


PARAMS_TYPES: dict[str, type] = {"search": SearchParams, "train": TrainParams, "predict": PredictParams}


def params_from_dict(kind: str, data: dict[str, Any]) -> Union[SearchParams, TrainParams, PredictParams]:
    """Rebuild validated parameters from their JSON form (unknown keys are an error)."""
    if kind not in PARAMS_TYPES:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
    cls = PARAMS_TYPES[kind]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {kind} parameter(s): {', '.join(unknown)}")
    return cls(**data)


# ---------------------------------------------------------------------------------------------
# Progress: derived from the events file, never from log text.
# ---------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What a user wants to see of a running job, folded from its progress events."""

    stage: Optional[str] = None
    message: Optional[str] = None
    trial: Optional[Any] = None          # the trial most recently started or trained
    rung: Optional[int] = None
    trial_epochs: Optional[int] = None   # that trial's epoch budget (fidelity)
    epoch: Optional[int] = None
    max_epochs: Optional[int] = None
    loss: Optional[float] = None
    trials_started: int = 0
    trials_finished: int = 0
    trials_failed: int = 0
    best_dice: Optional[float] = None
    best_trial: Optional[Any] = None
    fraction: Optional[float] = None
    eta_seconds: Optional[float] = None
    finished_state: Optional[str] = None
    updated: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ProgressTracker:
    """Reads an events file incrementally and keeps the folded :class:`Progress`.

    Trials are counted by id, so a trial that is restarted after an interruption (NePS re-runs
    it on resume) is not counted twice.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.offset = 0
        self.progress = Progress()
        self._started: set[str] = set()
        self._finished: set[str] = set()
        self._failed: set[str] = set()

    def poll(self) -> list[ProgressEvent]:
        """Fold the events written since the last call; returns them."""
        events, self.offset = read_events(self.path, self.offset)
        for event in events:
            self.apply(event)
        return events

    def apply(self, event: ProgressEvent) -> None:
        p, d = self.progress, event.data
        p.updated = event.time
        trial = d.get("trial")
        if event.kind == "stage":
            p.stage = d.get("name", p.stage)
            p.message = d.get("message", p.message)
        elif event.kind == "trial_started":
            p.trial, p.rung, p.trial_epochs = trial, d.get("rung", p.rung), d.get("epochs")
            p.epoch = None
            self._started.add(str(trial))
        elif event.kind == "epoch":
            if trial is not None:
                p.trial = trial
            p.epoch, p.loss = d.get("epoch", p.epoch), d.get("loss", p.loss)
            p.max_epochs = d.get("max_epochs", p.max_epochs)
        elif event.kind == "trial_finished":
            (self._failed if d.get("state") == "failed" else self._finished).add(str(trial))
            dice = d.get("dice")
            if isinstance(dice, (int, float)) and (p.best_dice is None or dice > p.best_dice):
                p.best_dice, p.best_trial = float(dice), trial
        elif event.kind == "best":
            dice = d.get("dice")
            if isinstance(dice, (int, float)):
                p.best_dice, p.best_trial = float(dice), trial
        elif event.kind == "progress":
            p.fraction = d.get("fraction", p.fraction)
            p.eta_seconds = d.get("eta_seconds", p.eta_seconds)
            p.message = d.get("message", p.message)
        elif event.kind == "finished":
            p.finished_state = d.get("state")
            p.message = d.get("message") or p.message
            if p.finished_state == "succeeded":
                p.fraction, p.eta_seconds = 1.0, 0.0
        p.trials_started = len(self._started)
        p.trials_finished = len(self._finished)
        p.trials_failed = len(self._failed - self._finished)


# ---------------------------------------------------------------------------------------------
# Specs: what a job runs.
# ---------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One step of a job.

    ``argv`` is an ``autonnunet`` command line (run as ``python -m AutoNNUNetLib ...``), or, when
    ``builtin`` is set, the name of a function in :data:`BUILTINS` called with ``kwargs`` inside
    the supervisor (small file work that needs no heavy imports). ``workers`` runs the command as
    several parallel processes, each with its environment overlay (``CUDA_VISIBLE_DEVICES``).
    ``done_marker`` makes a step run once across re-runs (and across jobs sharing a workspace,
    together with ``lock``, an exclusive file lock held while the step runs).
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
        path = self.dir / SPEC_NAME
        _atomic_write(path, json.dumps(asdict(self), indent=2))
        return path

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


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _is_supervisor_of(pid: int, job_dir: Path) -> bool:
    """Guard against pid reuse: the pid must still be the supervisor of this job folder."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return pid_alive(pid)
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return str(job_dir).encode() in args and b"supervise" in args


# ---------------------------------------------------------------------------------------------
# Running a job.
# ---------------------------------------------------------------------------------------------


@dataclass
class JobExit:
    """How a job ended: ``state`` is succeeded, failed or cancelled."""

    state: str
    exit_code: Optional[int]
    message: str = ""


def read_exit(job_dir: Union[str, Path]) -> Optional[JobExit]:
    path = Path(job_dir) / EXIT_NAME
    try:
        return JobExit(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


class LocalJob:
    """A job's supervisor process on this machine: start, re-attach, poll, cancel, read its log."""

    def __init__(self, job_dir: Union[str, Path], pid: int, process: Optional[subprocess.Popen] = None):
        self.job_dir = Path(job_dir).resolve()
        self.pid = pid  # also the process group id: the supervisor leads its own session
        self._process = process
        self.tracker = ProgressTracker(self.job_dir / EVENTS_NAME)
        self._kill_deadline: Optional[float] = None
        self._cancelled = False

    @property
    def log_path(self) -> Path:
        return self.job_dir / LOG_NAME

    @property
    def events_path(self) -> Path:
        return self.job_dir / EVENTS_NAME

    @classmethod
    def start(cls, spec: JobSpec, *, env: Optional[dict[str, str]] = None, banner: str = "") -> "LocalJob":
        """Write the spec and start its supervisor in a new process group.

        ``env`` is the complete environment of the job (default: this process's); the Slicer
        module passes its own so it never has to change ``os.environ``.
        """
        job_dir = spec.dir.resolve()
        spec.job_dir = str(job_dir)
        spec.save()
        with contextlib.suppress(FileNotFoundError):
            (job_dir / EXIT_NAME).unlink()  # a re-run must not report the previous attempt's end
        run_env = dict(os.environ if env is None else env)
        run_env["PYTHONUNBUFFERED"] = "1"  # log lines appear as they are printed
        with open(job_dir / LOG_NAME, "ab") as log:
            if banner:
                log.write(f"\n=== {banner} ===\n".encode())
                log.flush()
            # Own session (process group) so cancelling reaches the whole tree and never the caller.
            group: dict[str, Any] = (
                {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if IS_WINDOWS  # type: ignore[attr-defined]
                else {"start_new_session": True})
            process = subprocess.Popen(
                [spec.python, "-m", "AutoNNUNetLib.jobs", "supervise", str(job_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=run_env, cwd=str(job_dir), **group,
            )
        return cls(job_dir, process.pid, process)

    @classmethod
    def attach(cls, job_dir: Union[str, Path], pid: Optional[int]) -> Optional["LocalJob"]:
        """The job's supervisor if it is still running (after a restart of whoever started it)."""
        job_dir = Path(job_dir).resolve()
        if pid is None or not pid_alive(pid) or not _is_supervisor_of(pid, job_dir):
            return None
        return cls(job_dir, pid)

    def running(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return pid_alive(self.pid)

    def poll(self) -> Optional[JobExit]:
        """None while running; then how it ended (from ``exit.json``; a supervisor that died
        without writing it, e.g. killed with SIGKILL, counts as failed).

        Also finishes a :meth:`request_cancel`: SIGKILL to what is left of the tree once the
        grace period is over, or at once when the supervisor has already ended.
        """
        alive = self.running()
        if self._kill_deadline is not None and (not alive or time.monotonic() > self._kill_deadline):
            if process_group_members(self.pid):
                signal_group(self.pid, hard=True)
            if not alive:
                self._kill_deadline = None
        if alive:
            return None
        ended = read_exit(self.job_dir)
        if ended is not None:
            return ended
        code = self._process.returncode if self._process is not None else None
        if self._cancelled:  # killed before it could record its end
            return JobExit("cancelled", code, "cancelled")
        return JobExit("failed", code, f"the job's supervisor died unexpectedly (exit code {code})")

    def wait(self, timeout: Optional[float] = None) -> Optional[JobExit]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ended = self.poll()
            if ended is not None or (deadline is not None and time.monotonic() >= deadline):
                return ended
            time.sleep(0.1)

    def cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> bool:
        """Terminate the whole process tree and wait; True when no process of the group is left."""
        self._cancelled = True
        reap = (lambda: self._process.poll()) if self._process is not None else None
        return kill_process_group(self.pid, grace=grace, reap=reap)

    def request_cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """Non-blocking cancel for a UI thread: SIGTERM to the tree now; later :meth:`poll` calls
        send SIGKILL to whatever is left after ``grace`` seconds."""
        self._cancelled = True
        signal_group(self.pid, hard=False)
        self._kill_deadline = time.monotonic() + grace

    def group_members(self) -> list[int]:
        return process_group_members(self.pid)

    def progress(self) -> Progress:
        self.tracker.poll()
        return self.tracker.progress

    def read_log(self, offset: int = 0, limit: int = 65536) -> tuple[bytes, int]:
        return read_log(self.log_path, offset, limit)


def read_log(path: Union[str, Path], offset: int = 0, limit: int = 65536) -> tuple[bytes, int]:
    """Up to ``limit`` bytes of a log from ``offset``; returns them and the next offset."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, offset))
            data = handle.read(max(0, limit))
    except FileNotFoundError:
        return b"", offset
    return data, offset + len(data)


# ---------------------------------------------------------------------------------------------
# The supervisor (``python -m AutoNNUNetLib.jobs supervise JOB_DIR``).
# ---------------------------------------------------------------------------------------------


class _Cancelled(Exception):
    pass


class Supervisor:
    """Runs a job's steps in order inside the job's process group and records how it ended."""

    def __init__(self, job_dir: Union[str, Path]):
        self.spec = JobSpec.load(job_dir)
        self.dir = self.spec.dir
        self.events = EventWriter(self.dir / EVENTS_NAME)
        self.children: list[subprocess.Popen] = []
        self.slurm_jobs: list[Any] = []
        self.stop_signal: Optional[int] = None

    # Signals: the canceller sends SIGTERM to the whole group, so children get it directly; the
    # supervisor forwards it anyway (someone may signal only the supervisor) and cancels cluster
    # jobs, which are outside the group.
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    def run(self) -> int:
        for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGBREAK"):  # the last two exist on POSIX / Windows only
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._on_signal)
        print(f"[autonnunet job] supervisor pid {os.getpid()} in {self.dir}", flush=True)
        try:
            for step in self.spec.steps:
                self._check_stop()
                code = self._run_step(step)
                if code != 0:
                    self._check_stop()
                    if step.optional:
                        print(f"[autonnunet job] optional step {step.name} failed (exit code {code}); going on",
                              flush=True)
                        continue
                    return self._finish("failed", code, f"step '{step.name}' failed with exit code {code}")
            return self._finish("succeeded", 0, "")
        except _Cancelled:
            self._stop_everything()
            return self._finish("cancelled", 128 + (self.stop_signal or signal.SIGTERM), "cancelled")
        except Exception as error:  # a bug or an unusable spec: record it, don't vanish silently
            self._stop_everything()
            return self._finish("failed", 1, f"{type(error).__name__}: {error}")

    def _check_stop(self) -> None:
        if self.stop_signal is not None:
            raise _Cancelled()

    def _finish(self, state: str, code: int, message: str) -> int:
        self.events.emit("finished", state=state, message=message)
        _atomic_write(self.dir / EXIT_NAME, json.dumps(asdict(JobExit(state, code, message))))
        print(f"[autonnunet job] {state}" + (f": {message}" if message else ""), flush=True)
        return 0 if state == "succeeded" else (code or 1)

    def _stop_everything(self) -> None:
        for job in self.slurm_jobs:
            with contextlib.suppress(Exception):
                job.cancel(check=False)
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
        deadline = time.monotonic() + 5.0
        for child in self.children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()

    @contextlib.contextmanager
    def _lock(self, path: Optional[str]) -> Iterator[None]:
        if path is None:
            yield
            return
        try:
            import fcntl  # POSIX; only the server's shared preparation steps use locks
        except ImportError:
            yield
            return

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            while True:  # poll so a cancel is noticed while waiting for another job's step
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    self._check_stop()
                    time.sleep(0.5)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _run_step(self, step: Step) -> int:
        if step.done_marker and Path(step.done_marker).exists():
            print(f"[autonnunet job] step {step.name}: already done, skipped", flush=True)
            return 0
        with self._lock(step.lock):
            if step.done_marker and Path(step.done_marker).exists():  # done by another job meanwhile
                return 0
            self.events.emit("stage", name=step.name, message=step.message or step.name)
            print(f"[autonnunet job] step {step.name}", flush=True)
            if step.builtin:
                BUILTINS[step.builtin](self, **step.kwargs)
                code = 0
            elif step.remote and self.spec.executor in ("slurm", "submitit-local"):
                code = self._run_submitit(step)
            else:
                code = self._run_local(step)
            if code in step.ok_codes:
                code = 0
            if code == 0 and step.done_marker:
                Path(step.done_marker).parent.mkdir(parents=True, exist_ok=True)
                Path(step.done_marker).write_text(json.dumps({"time": time.time(), "job": str(self.dir)}))
        return code

    def _command(self, step: Step) -> list[str]:
        # "@model_dir:PATH" stands for the model folder found under PATH when the step runs (an
        # imported zip's folder name is known only after the import step).
        if step.command:
            return list(step.command)
        argv = [str(find_model_dir(a[len(MODEL_DIR_PREFIX):])) if a.startswith(MODEL_DIR_PREFIX) else a
                for a in step.argv]
        return [self.spec.python, "-m", "AutoNNUNetLib", *argv]

    def _worker_envs(self, step: Step) -> list[dict[str, str]]:
        return step.workers if step.workers else [{}]

    def _run_local(self, step: Step) -> int:
        command = self._command(step)
        self.children = []
        for index, overlay in enumerate(self._worker_envs(step)):
            env = {**os.environ, **self.spec.env, **step.env, **overlay}
            if len(self._worker_envs(step)) > 1:
                print(f"[autonnunet job] worker {index}: {overlay}", flush=True)
            # Children inherit our stdout (the job log) and our process group.
            self.children.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))
        codes: list[Optional[int]] = [None] * len(self.children)
        while any(code is None for code in codes):
            self._check_stop()
            for i, child in enumerate(self.children):
                if codes[i] is None:
                    codes[i] = child.poll()
            time.sleep(0.2)
        self.children = []
        return next((code for code in codes if code), 0)

    def _run_submitit(self, step: Step) -> int:
        import submitit

        folder = self.dir / "submitit"
        cluster = "local" if self.spec.executor == "submitit-local" else "slurm"
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        opts = self.spec.slurm
        params: dict[str, Any] = {"timeout_min": opts.timeout_min, "name": f"autonnunet-{self.dir.name}"}
        if cluster == "slurm":
            params.update(slurm_partition=opts.partition, cpus_per_task=opts.cpus_per_task,
                          gpus_per_node=opts.gpus_per_node, tasks_per_node=1,
                          slurm_additional_parameters=dict(opts.additional))
            if opts.mem_gb:
                params["mem_gb"] = opts.mem_gb
            params = {k: v for k, v in params.items() if v is not None}
        executor.update_parameters(**params)
        ids_file = self.dir / "submitit_jobs.json"
        self.slurm_jobs = []
        # A re-run supervisor (after a server restart) waits for the workers it already submitted
        # instead of submitting a second set onto the same search root.
        if cluster == "slurm" and ids_file.exists():
            previous = json.loads(ids_file.read_text())
            if previous.get("step") == step.name:
                jobs = [submitit.SlurmJob(folder=str(folder), job_id=job_id) for job_id in previous["ids"]]
                if not any(job.done() for job in jobs):
                    self.slurm_jobs = jobs
        if not self.slurm_jobs:
            for overlay in self._worker_envs(step):
                # On Slurm the GPU is Slurm's to assign: drop our CUDA_VISIBLE_DEVICES choice.
                env = {**self.spec.env, **step.env, **overlay}
                if cluster == "slurm":
                    env.pop("CUDA_VISIBLE_DEVICES", None)
                self.slurm_jobs.append(
                    executor.submit(run_worker, self._command(step), env, str(self.dir / LOG_NAME)))
            _atomic_write(ids_file, json.dumps({"step": step.name, "ids": [j.job_id for j in self.slurm_jobs]}))
        print(f"[autonnunet job] submitted {cluster} jobs {[j.job_id for j in self.slurm_jobs]}", flush=True)
        while not all(job.done() for job in self.slurm_jobs):
            self._check_stop()
            time.sleep(1.0)
        code = 0
        for job in self.slurm_jobs:
            try:
                job.result()
            except Exception as error:
                print(f"[autonnunet job] worker {job.job_id} failed: {error}", flush=True)
                code = 1
        self.slurm_jobs = []
        return code


def run_worker(command: list[str], env_overlay: dict[str, str], log_path: str) -> int:
    """Body of a submitit worker: run one command, output appended to the job log.

    Module-level so submitit can pickle it by reference (the cluster node imports this module from
    the same installation, which is why the data directory and the environment must be shared).
    """
    env = {**os.environ, **env_overlay, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited with code {code}")
    return code


# ---------------------------------------------------------------------------------------------
# Built-in steps: small file work done by the supervisor itself.
# ---------------------------------------------------------------------------------------------


def find_model_dir(root: Union[str, Path]) -> Path:
    """The nnU-Net model folder (the one holding ``plans.json``) at or below ``root``."""
    root = Path(root)
    if (root / "plans.json").is_file():
        return root
    candidates = sorted(p.parent for p in root.rglob("plans.json"))
    if not candidates:
        raise JobError(f"no model folder (plans.json) under {root}")
    return candidates[0]


def _builtin_export_model(sup: Supervisor, source: str, dest: str) -> None:
    """Zip a model folder with the library's exporter (a separate process: it imports torch)."""
    model_dir = find_model_dir(source)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    code = subprocess.call([sup.spec.python, "-m", "AutoNNUNetLib", "export-model", str(model_dir), dest],
                           env={**os.environ, **sup.spec.env}, stdin=subprocess.DEVNULL)
    if code != 0:
        raise JobError(f"export-model {model_dir} failed with exit code {code}")


def _builtin_copy(sup: Supervisor, source: str, dest: str, missing_ok: bool = False) -> None:
    src = Path(source)
    if not src.exists():
        if missing_ok:
            return
        raise JobError(f"{src} was not produced")
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def _builtin_trials_table(sup: Supervisor, results: str, dest: str) -> None:
    """``results.json``'s trials as CSV: one row per trial, nested values as JSON text."""
    data = json.loads(Path(results).read_text())
    trials = data.get("trials", []) if isinstance(data, dict) else data
    rows = [_flatten(t) for t in trials if isinstance(t, dict)]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, list):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def _builtin_zip_folder(sup: Supervisor, source: str, dest: str) -> None:
    src = Path(source)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(dest).with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(src).as_posix())
    os.replace(tmp, dest)


def _builtin_import_model(sup: Supervisor, source: str, dest: str) -> None:
    code = subprocess.call([sup.spec.python, "-m", "AutoNNUNetLib", "import-model", source, dest],
                           env={**os.environ, **sup.spec.env}, stdin=subprocess.DEVNULL)
    if code != 0:
        raise JobError(f"import-model {source} failed with exit code {code}")


BUILTINS: dict[str, Callable[..., None]] = {
    "export_model": _builtin_export_model,
    "copy": _builtin_copy,
    "trials_table": _builtin_trials_table,
    "zip_folder": _builtin_zip_folder,
    "import_model": _builtin_import_model,
}


def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m AutoNNUNetLib.jobs")
    sub = parser.add_subparsers(dest="command", required=True)
    sup = sub.add_parser("supervise", help="run a job folder's steps (started by LocalJob)")
    sup.add_argument("job_dir")
    args = parser.parse_args(argv)
    return Supervisor(args.job_dir).run()


if __name__ == "__main__":
    sys.exit(main())
