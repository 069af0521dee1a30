"""The search: (Regularized) PriorBand over nnU-Net trainings with NePS, fidelity = epochs.

One search lives in one root directory::

    ROOT/search.json          settings of the search (resuming reads them back)
    ROOT/events.jsonl         progress events (JSON lines, see AutoNNUNetLib.events)
    ROOT/results.json         trials table, incumbents, Pareto front, budget (rewritten after each trial)
    ROOT/incumbent/<model>/   the incumbent's model folder (nnU-Net layout, stock loaders read it)
    ROOT/final/<model>/       optional: the incumbent retrained at full fidelity on all chosen folds
    ROOT/neps/                NePS's root directory (its state, locks and summary)
    ROOT/neps/configs/config_<id>_rung_<r>/   one folder per trial; ours adds <model>/ and trial.json

Each NePS trial trains one configuration with :func:`AutoNNUNetLib.trainer.train` to the trial's
epoch budget (the LR schedule always spans ``max_epochs``). A promoted trial passes its lower
rung's model folder as ``resume_from``, so only the extra epochs are trained. The objective is
``1 - mean validation Dice``; the NePS cost of a trial is the number of epochs it actually trained,
which is what the ``total_epochs`` budget counts.

Control: ``SIGTERM``/``SIGINT`` (and the wall-clock limit) stop a worker cleanly: the trial it was
training goes back to "pending" and is retrained by the next run (its finished lower rung is
kept). A trial left "evaluating" by a dead worker (killed, node lost) is reset and retried once,
then recorded as failed. Failing trials (NaN loss, out of memory, ...) are recorded with their
error and the search goes on. Rerunning a search on its root resumes it; nothing finished is
trained again.

Parallelism: ``workers > 1`` starts that many worker processes on the same root (NePS
synchronises them through file locks), one GPU each via ``CUDA_VISIBLE_DEVICES``; the launcher is
submitit (local executor by default, Slurm on request) or plain processes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from .settings import IDENTITY_FIELDS, PROFILES, SearchError, SearchSettings
from ..folds import parse_folds as _parse_folds


def parse_folds(values):
    return None if values is None else _parse_folds(values)

from ..config import TrialConfig
from ..events import EventWriter, ProgressCallback, ProgressEvent, fanout, read_events
from ..processes import pid_alive
from ..workspace import Workspace

log = logging.getLogger(__name__)

SETTINGS_NAME = "search.json"
RESULTS_NAME = "results.json"
EVENTS_NAME = "events.jsonl"
TRIAL_RECORD_NAME = "trial.json"
HEARTBEAT_NAME = "heartbeat"
ATTEMPTS_NAME = "attempts"
INCUMBENT_DIR = "incumbent"
NEPS_DIR = "neps"
FINAL_DIR = "final"

class SearchStopped(BaseException):
    """Raised in a worker's main thread on SIGTERM/SIGINT or at the wall-clock limit.

    A ``BaseException`` so neither nnU-Net's nor NePS's ``except Exception`` handlers swallow it:
    it must unwind the worker, whose handler then returns the trial to "pending".
    """


# ----------------------------------------------------------------------------------------------
# settings



# ----------------------------------------------------------------------------------------------
# records


@dataclass
class TrialRecord:
    """One row of the trials table (plain parameter names; times in seconds)."""

    trial_id: str
    config_id: int
    rung: Optional[int]
    epochs: Optional[int]  # the fidelity: epochs reached by this trial
    state: str  # pending / evaluating / success / failed / crashed
    config: dict[str, Any]
    mean_dice: Optional[float] = None
    dice_per_class: dict[str, float] = field(default_factory=dict)
    objective: Optional[float] = None
    epochs_trained: Optional[int] = None  # epochs trained by this trial (the rest was resumed)
    train_seconds: Optional[float] = None  # cumulative over the rungs it continues
    seconds_per_epoch: Optional[float] = None
    inference_seconds: Optional[float] = None  # validation (sliding-window prediction) time
    resumed_from: Optional[str] = None
    error: Optional[str] = None
    worker: Optional[str] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    attempts: int = 0
    model_dir: Optional[str] = None
    curve: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SearchResults:
    """What ``ROOT/results.json`` holds."""

    root: str
    settings: dict[str, Any]
    rungs: dict[int, int]
    trials: list[TrialRecord]
    incumbent: Optional[str]  # best mean Dice at the highest fidelity reached (trial id)
    incumbent_any_fidelity: Optional[str]
    pareto_front: list[str]  # non-dominated in (1 - Dice, training time, inference time)
    budget: dict[str, Any]
    state: str = "running"
    incumbent_model_dir: Optional[str] = None
    final: Optional[dict[str, Any]] = None
    updated: float = field(default_factory=time.time)

    def trial(self, trial_id: Optional[str]) -> Optional[TrialRecord]:
        return next((t for t in self.trials if t.trial_id == trial_id), None)

    @property
    def best(self) -> Optional[TrialRecord]:
        return self.trial(self.incumbent)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rungs"] = {str(k): v for k, v in self.rungs.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchResults":
        values = dict(data)
        values["rungs"] = {int(k): v for k, v in data.get("rungs", {}).items()}
        values["trials"] = [TrialRecord(**t) for t in data.get("trials", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_text(self) -> str:
        lines = [f"search {self.root}: {self.state}, {len(self.trials)} trials"]
        best = self.best
        if best is not None:
            lines.append(f"incumbent {best.trial_id}: Dice {best.mean_dice:.4f} at {best.epochs} epochs "
                         f"({best.seconds_per_epoch or float('nan'):.1f} s/epoch)")
        if self.incumbent_model_dir:
            lines.append(f"model: {self.incumbent_model_dir}")
        return "\n".join(lines)


def load_results(root: Union[str, Path]) -> SearchResults:
    path = Path(root) / RESULTS_NAME
    if not path.is_file():
        raise SearchError(f"no search results in {root} (missing {RESULTS_NAME})")
    return SearchResults.from_dict(json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------
# small helpers


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (released by the OS if the holder dies)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _finite(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def split_trial_id(trial_id: str) -> tuple[int, Optional[int]]:
    """``"7_rung_2"`` -> (7, 2); random search ids (``"7"``) have no rung."""
    if "_rung_" in trial_id:
        config_id, rung = trial_id.split("_rung_")
        return int(config_id), int(rung)
    return int(trial_id), None


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (all objectives minimised)."""
    front = []
    for i, p in enumerate(points):
        dominated = any(
            all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
            for j, q in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def _worker_id(index: int) -> str:
    # host:pid lets another worker on the same host tell whether the owner of a trial is alive;
    # the random tail keeps ids unique when one process runs several searches (NePS refuses reuse).
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{index}:{uuid.uuid4().hex[:8]}"


# ----------------------------------------------------------------------------------------------
# the space and the optimizer of a search


def _planned_stages(workspace: Workspace, configuration: str) -> int:
    from .space import planned_stage_count

    return planned_stage_count(workspace.load_plans(), configuration)


def make_space(settings: SearchSettings, workspace: Workspace):
    from .space import build_space

    return build_space(
        settings.space,  # type: ignore[arg-type]
        min_epochs=settings.min_epochs,
        max_epochs=settings.max_epochs,
        prior_confidence=settings.prior_confidence,  # type: ignore[arg-type]
        planned_stages=_planned_stages(workspace, settings.configuration) if settings.space == "hpo_hnas" else None,
    )


def make_optimizer(settings: SearchSettings) -> Callable:
    """The callable NePS builds the optimizer from (``optimizer(space)``)."""
    if settings.optimizer == "random":
        from neps.optimizers.algorithms import neps_random_search

        return functools.partial(neps_random_search, ignore_fidelity="highest_fidelity")
    from .priorband import RegularizedPriorBand

    return functools.partial(
        RegularizedPriorBand,
        eta=settings.eta,
        sample_prior_first="highest_fidelity" if settings.prior_first else False,
        runtime_weight=settings.runtime_weight,
    )


def rung_fidelities(settings: SearchSettings) -> dict[int, int]:
    """Rung -> epochs (``{0: 12, 1: 37, 2: 111, 3: 333, 4: 1000}`` for 10..1000, eta 3)."""
    from neps.optimizers.utils.brackets import calculate_hb_bracket_layouts

    rungs, _ = calculate_hb_bracket_layouts((settings.min_epochs, settings.max_epochs), settings.eta)
    return {int(r): int(f) for r, f in rungs.items()}


# ----------------------------------------------------------------------------------------------
# stop control


class _StopControl:
    """Turns SIGTERM/SIGINT and the wall-clock deadline into :class:`SearchStopped`.

    The exception is raised right away while a trial trains (that trial goes back to pending);
    otherwise the request is remembered and raised when the next trial would start, so NePS is
    never interrupted inside its own bookkeeping.
    """

    DEADLINE = "wall-clock limit reached"

    def __init__(self, deadline: Optional[float]):
        self.deadline = deadline
        self.requested: Optional[str] = None
        self.in_trial = False
        self._previous: dict[int, Any] = {}
        self._timer: Optional[threading.Timer] = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only live in the main thread; rely on the deadline check
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.deadline is not None:
            self._timer = threading.Timer(max(0.0, self.deadline - time.time()), self._deadline_reached)
            self._timer.daemon = True
            self._timer.start()

    def uninstall(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _deadline_reached(self) -> None:
        self.requested = self.requested or self.DEADLINE
        if self.in_trial:
            # Deliver to the main thread, where the trial trains.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = self.requested or f"stopped by {signal.Signals(signum).name}"
        if self.in_trial:
            self.in_trial = False  # raise once; the unwinding must not be interrupted again
            raise SearchStopped(self.requested)

    def check(self) -> None:
        if self.requested is None and self.deadline is not None and time.time() >= self.deadline:
            self.requested = self.DEADLINE
        if self.requested is not None:
            raise SearchStopped(self.requested)


# ----------------------------------------------------------------------------------------------
# recovery of abandoned trials


def neps_root(root: Union[str, Path]) -> Path:
    """NePS's own root directory inside a search root (NePS treats an existing folder as a run)."""
    return Path(root) / NEPS_DIR


def _neps_state(root: Path):
    from neps.state import NePSState

    return NePSState.create_or_load(path=neps_root(root), load_only=True)


def _read_trials(state: Any) -> dict[str, Any]:
    """All trials of a NePS state.

    NePS 0.17 deletes its trial cache when a trial is reset, and the next read rebuilds the cache
    but returns no trials; read again in that case (and so leave a warm cache for NePS itself).
    """
    trials = state.lock_and_read_trials()
    if not trials and any(p.name.startswith("config_") for p in (state.path / "configs").glob("config_*")):
        trials = state.lock_and_read_trials()
    return trials


def _read_attempts(trial_dir: Path) -> int:
    try:
        return int((trial_dir / ATTEMPTS_NAME).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _is_abandoned(trial: Any, stale_after: float, now: float) -> bool:
    worker = str(trial.metadata.evaluating_worker_id or "")
    parts = worker.split(":")
    if len(parts) >= 3 and parts[0] == socket.gethostname() and parts[1].isdigit():
        if int(parts[1]) == os.getpid():
            return False
        if not pid_alive(int(parts[1])):
            return True
    # Another host (or an id we did not make): judge by the heartbeat the trial writes.
    heartbeat = Path(trial.metadata.location) / HEARTBEAT_NAME
    try:
        last = heartbeat.stat().st_mtime
    except OSError:
        last = float(trial.metadata.time_started or now)
    return now - last > stale_after


def recover_abandoned_trials(
    root: Union[str, Path], *, retries: int = 1, stale_after: float = 900.0,
    events: Optional[ProgressCallback] = None,
) -> list[tuple[str, str]]:
    """Reset trials left "evaluating" by dead workers; fail them after ``retries`` retries.

    Returns ``(trial_id, "reset" | "failed")`` pairs.
    """
    root = Path(root)
    if not (neps_root(root) / "optimizer_info.yaml").is_file():
        return []
    actions: list[tuple[str, str]] = []
    with _file_lock(root / ".recovery.lock"):
        state = _neps_state(root)
        now = time.time()
        for trial in _read_trials(state).values():
            if str(trial.metadata.state) != "evaluating" or not _is_abandoned(trial, stale_after, now):
                continue
            trial_dir = Path(trial.metadata.location)
            attempts = _read_attempts(trial_dir)
            if attempts > retries:
                error = (f"the worker evaluating this trial died {attempts} times "
                         f"(last: {trial.metadata.evaluating_worker_id}); not retried again")
                report = trial.set_complete(
                    report_as="failed", time_end=now, objective_to_minimize=None, cost=None,
                    learning_curve=None, err=RuntimeError(error), tb=None,
                    extra={"error": error}, evaluation_duration=None,
                )
                state.lock_and_report_trial_evaluation(trial, report, worker_id=str(trial.metadata.evaluating_worker_id))
                _update_trial_record(trial_dir, state="failed", error=error, finished=now)
                actions.append((trial.id, "failed"))
            else:
                state.lock_and_reset_trial_by_id(trial.id)
                _update_trial_record(trial_dir, state="pending", error="worker died; reset for a retry")
                actions.append((trial.id, "reset"))
            if events is not None:
                events(ProgressEvent("trial_finished" if actions[-1][1] == "failed" else "stage", {
                    "trial": trial.id, "state": actions[-1][1], "name": "search",
                    "message": f"trial {trial.id} abandoned by a dead worker: {actions[-1][1]}",
                    **({"error": error} if actions[-1][1] == "failed" else {}),
                }))
        if actions:
            _read_trials(state)  # rebuild NePS's trial cache now (see _read_trials)
    return actions


def _reset_own_trials(root: Path, worker_id: str, reason: str) -> list[str]:
    """Return this worker's in-flight trials to pending (graceful stop)."""
    state = _neps_state(root)
    reset = []
    for trial in _read_trials(state).values():
        if str(trial.metadata.state) == "evaluating" and trial.metadata.evaluating_worker_id == worker_id:
            state.lock_and_reset_trial_by_id(trial.id)
            trial_dir = Path(trial.metadata.location)
            # A stop is not a failure: do not count this attempt against the retry limit (if this
            # worker got as far as counting it).
            if (_read_json(trial_dir / TRIAL_RECORD_NAME) or {}).get("worker") == worker_id:
                (trial_dir / ATTEMPTS_NAME).write_text(str(max(0, _read_attempts(trial_dir) - 1)))
            _update_trial_record(trial_dir, state="pending", error=f"interrupted ({reason}); will be retrained")
            reset.append(trial.id)
    if reset:
        _read_trials(state)  # rebuild NePS's trial cache now (see _read_trials)
    return reset


def _update_trial_record(trial_dir: Path, **changes: Any) -> None:
    path = trial_dir / TRIAL_RECORD_NAME
    record = _read_json(path) or {}
    record.update(changes)
    trial_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(path, record)


# ----------------------------------------------------------------------------------------------
# evaluating one trial


class _Heartbeat:
    """Touches ``<trial>/heartbeat`` while a trial trains (other hosts judge liveness by it)."""

    def __init__(self, path: Path, interval: float = 30.0):
        self.path, self.interval = path, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Heartbeat":
        self.path.write_text(str(time.time()))
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self.path.write_text(str(time.time()))


@dataclass
class _TrialRunner:
    """The NePS evaluation function of a worker: trains one trial, records it, reports it."""

    workspace_root: str
    dataset_name: Optional[str]
    root: str
    settings: SearchSettings
    worker_id: str
    session_start: float
    stop: Optional[_StopControl] = None
    trainer: Optional[Callable[..., Any]] = None  # injectable for tests of the control flow

    def __post_init__(self) -> None:
        root = Path(self.root)
        writers = [EventWriter(root / EVENTS_NAME)]
        if self.settings.events:
            writers.append(EventWriter(self.settings.events))
        self.emit: ProgressCallback = fanout(*writers)

    def _update_results(self) -> None:
        # Called before NePS stores the report (it does not hold its locks while evaluating);
        # collect_results reads this trial's own record, which is already final.
        try:
            update_results(Path(self.root), emit=self.emit, session_start=self.session_start)
        except Exception:  # noqa: BLE001 - bookkeeping must never stop the search
            log.exception("could not update the results of %s", self.root)

    def __call__(self, pipeline_directory: Path, previous_pipeline_directory: Optional[Path],
                 pipeline_id: str, **values: Any) -> dict[str, Any]:
        from .space import trial_config_from_values
        from ..trainer import model_dir_name

        if self.stop is not None:
            self.stop.check()
        settings = self.settings
        root = Path(self.root)
        recover_abandoned_trials(root, retries=settings.retries, stale_after=settings.stale_after, events=self.emit)

        trial_dir = Path(pipeline_directory)
        trial_dir.mkdir(parents=True, exist_ok=True)
        config, epochs = trial_config_from_values(values)
        epochs = int(epochs if epochs is not None else settings.max_epochs)
        config_id, rung = split_trial_id(pipeline_id)
        attempts = _read_attempts(trial_dir) + 1
        (trial_dir / ATTEMPTS_NAME).write_text(str(attempts))

        model_dir = trial_dir / model_dir_name(settings.configuration)
        if model_dir.exists():
            shutil.rmtree(model_dir)  # leftovers of an interrupted attempt: start this rung clean
        resume_from = None
        resumed_from = None
        if previous_pipeline_directory is not None:
            candidate = Path(previous_pipeline_directory) / model_dir_name(settings.configuration)
            if all((candidate / f"fold_{f}" / "checkpoint_final.pth").is_file() for f in settings.folds):
                resume_from = candidate
                resumed_from = Path(previous_pipeline_directory).name.removeprefix("config_")
            else:
                log.warning("trial %s: lower rung %s has no checkpoint; training from scratch",
                            pipeline_id, candidate)

        started = time.time()
        record = TrialRecord(
            trial_id=pipeline_id, config_id=config_id, rung=rung, epochs=epochs, state="evaluating",
            config=config.to_dict(), resumed_from=resumed_from, worker=self.worker_id, started=started,
            attempts=attempts, model_dir=str(model_dir),
        )
        _atomic_write_json(trial_dir / TRIAL_RECORD_NAME, record.to_dict())
        self.emit(ProgressEvent("trial_started", {
            "trial": pipeline_id, "rung": rung, "epochs": epochs, "config": config.to_dict(),
            "resumed_from": resumed_from, "worker": self.worker_id, "attempt": attempts}))

        curve: list[dict[str, Any]] = []

        def on_progress(event: ProgressEvent) -> None:
            if event.kind == "epoch":
                curve.append({k: event.data.get(k) for k in ("fold", "epoch", "loss", "seconds")})
            self.emit(ProgressEvent(event.kind, {**event.data, "trial": pipeline_id}, event.time))

        train = self.trainer
        if train is None:
            from ..trainer import train
        workspace = Workspace(Path(self.workspace_root), self.dataset_name)
        try:
            with _Heartbeat(trial_dir / HEARTBEAT_NAME):
                if self.stop is not None:
                    self.stop.in_trial = True
                    self.stop.check()
                try:
                    result = train(
                        workspace, config, model_dir, folds=list(settings.folds), epochs=epochs,
                        max_epochs=settings.max_epochs, iterations_per_epoch=settings.iterations_per_epoch,
                        resume_from=resume_from, device=settings.device,
                        seed=settings.seed, progress=on_progress, configuration=settings.configuration,
                        max_validation_cases=settings.max_validation_cases,
                    )
                finally:
                    if self.stop is not None:
                        self.stop.in_trial = False
        except SearchStopped:
            raise
        except Exception as error:
            # Recorded here with its message; re-raised so NePS stores the trial as crashed (with
            # ignore_errors=True the worker goes on with the next trial).
            finished = time.time()
            message = f"{type(error).__name__}: {error}"
            record.state, record.error, record.finished, record.curve = "failed", message, finished, curve
            _atomic_write_json(trial_dir / TRIAL_RECORD_NAME, record.to_dict())
            self.emit(ProgressEvent("trial_finished", {
                "trial": pipeline_id, "rung": rung, "epochs": epochs, "state": "failed", "error": message}))
            self._update_results()
            raise

        finished = time.time()
        mean_dice = _finite(result.mean_dice)
        folds = list(result.folds)
        epochs_trained = max((f.epochs_trained for f in folds), default=0)
        seconds_per_epoch = result.train_seconds / max(1, result.epochs)
        inference_seconds = float(sum(f.validation_seconds for f in folds) / max(1, len(folds)))
        record.state = "success"
        record.mean_dice = mean_dice
        record.dice_per_class = {k: float(v) for k, v in result.dice_per_class.items()}
        record.objective = 1.0 - mean_dice if mean_dice is not None else 1.0
        record.epochs = int(result.epochs)
        record.epochs_trained = int(epochs_trained)
        record.train_seconds = float(result.train_seconds)
        record.seconds_per_epoch = float(seconds_per_epoch)
        record.inference_seconds = inference_seconds
        record.finished = finished
        record.curve = curve
        _atomic_write_json(trial_dir / TRIAL_RECORD_NAME, record.to_dict())
        self.emit(ProgressEvent("trial_finished", {
            "trial": pipeline_id, "rung": rung, "epochs": record.epochs, "dice": mean_dice,
            "dice_per_class": record.dice_per_class, "train_seconds": record.train_seconds,
            "epochs_trained": record.epochs_trained, "state": "success"}))
        self._update_results()
        return {
            "objective_to_minimize": record.objective,
            "cost": float(epochs_trained),
            "info_dict": {
                "mean_dice": mean_dice,
                "dice_per_class": record.dice_per_class,
                "train_seconds": record.train_seconds,
                "seconds_per_epoch": record.seconds_per_epoch,
                "inference_seconds": inference_seconds,
                "epochs": record.epochs,
                "epochs_trained": record.epochs_trained,
                "resumed_from": resumed_from,
                "wall_seconds": finished - started,
            },
        }




# ----------------------------------------------------------------------------------------------
# one worker


def _configure_worker_environment(settings: SearchSettings, index: int) -> None:
    # One GPU per worker. Slurm already restricts CUDA_VISIBLE_DEVICES for its jobs.
    if settings.gpus and settings.device != "cpu" and "SLURM_JOB_ID" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(settings.gpus[index % len(settings.gpus)])
    os.environ.setdefault("nnUNet_compile", "false")


def run_worker(
    workspace: Workspace,
    root: Union[str, Path],
    settings: SearchSettings,
    *,
    index: int = 0,
    session_start: Optional[float] = None,
    trainer: Optional[Callable[..., Any]] = None,
) -> str:
    """Run one NePS worker on ``root`` until a budget is spent or it is stopped.

    Returns ``"finished"`` (a budget, the wall-clock limit included, is spent) or ``"stopped"``
    (SIGTERM/SIGINT). Either way the trial in training goes back to pending.
    """
    import neps

    root = Path(root)
    session_start = session_start or time.time()
    worker_id = _worker_id(index)
    deadline = session_start + settings.wall_time if settings.wall_time else None
    stop = _StopControl(deadline)
    runner = _TrialRunner(
        workspace_root=str(workspace.root), dataset_name=workspace.require_dataset(), root=str(root),
        settings=settings, worker_id=worker_id, session_start=session_start, stop=stop, trainer=trainer,
    )

    if settings.seed is not None:
        # NePS snapshots the global RNG state when it creates the search state; seed it first.
        import random

        import numpy as np

        random.seed(settings.seed)
        np.random.seed(settings.seed)

    stop.install()
    try:
        with warnings.catch_warnings():
            # With only a wall-clock budget NePS warns it would run forever; our deadline stops it.
            warnings.filterwarnings("ignore", message="None of the following were set")
            neps.run(
                evaluate_pipeline=runner,
                pipeline_space=make_space(settings, workspace),
                root_directory=str(neps_root(root)),
                optimizer=make_optimizer(settings),
                total_cost_to_spend=settings.effective_total_epochs(),
                total_evaluations_to_spend=settings.max_trials,
                ignore_errors=True,  # a failing configuration is recorded; the search goes on
                worker_id=worker_id,
            )
        return "finished"
    except SearchStopped as stopped:
        # NePS marks "a trial is running in this process" without try/finally; unwinding through
        # it leaves the mark set and the next neps.run in this process would refuse to start.
        import neps.runtime

        neps.runtime._CURRENTLY_RUNNING_TRIAL_IN_PROCESS = None
        reset = _reset_own_trials(root, worker_id, str(stopped))
        runner.emit(ProgressEvent("stage", {
            "name": "search", "message": f"worker {worker_id} stopped ({stopped}); "
                                         f"returned to pending: {', '.join(reset) or 'none'}"}))
        return "finished" if str(stopped) == _StopControl.DEADLINE else "stopped"
    finally:
        stop.uninstall()


def _worker_entry(payload: dict[str, Any], index: int) -> str:
    """Entry point of a worker process (plain process or submitit job)."""
    settings = SearchSettings.from_dict(payload["settings"])
    _configure_worker_environment(settings, index)
    root = Path(payload["root"])
    logs = root / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=str(logs / f"worker_{index}_{os.getpid()}.log"), level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True,
    )
    workspace = Workspace(Path(payload["workspace"]), payload.get("dataset"))
    return run_worker(workspace, root, settings, index=index, session_start=payload.get("session_start"))


# ----------------------------------------------------------------------------------------------
# results


def collect_results(root: Union[str, Path], *, state: str = "running") -> SearchResults:
    """Read every trial of the search at ``root`` into a :class:`SearchResults`."""
    root = Path(root)
    settings, _ = load_settings(root)
    records: list[TrialRecord] = []
    if (neps_root(root) / "optimizer_info.yaml").is_file():
        neps_state = _neps_state(root)
        space = neps_state.lock_and_get_search_space()
        for trial_id, trial in _read_trials(neps_state).items():
            records.append(_record_from_trial(trial_id, trial, space))
    records.sort(key=lambda r: (r.config_id, r.rung if r.rung is not None else -1))
    successes = [r for r in records if r.state == "success" and r.mean_dice is not None]

    def best_of(candidates: list[TrialRecord]) -> Optional[str]:
        if not candidates:
            return None
        return min(candidates, key=lambda r: (-(r.mean_dice or 0.0), r.finished or 0.0)).trial_id

    incumbent = None
    if successes:
        top = max(r.epochs or 0 for r in successes)
        incumbent = best_of([r for r in successes if (r.epochs or 0) == top])
    points = [(1.0 - (r.mean_dice or 0.0), r.train_seconds or math.inf, r.inference_seconds or math.inf)
              for r in successes]
    front = [successes[i].trial_id for i in pareto_front(points)]

    epochs_used = sum(r.epochs_trained or 0 for r in records if r.state == "success")
    budget = {
        "epochs_used": epochs_used,
        "total_epochs": settings.effective_total_epochs(),
        "trials": len([r for r in records if r.state in ("success", "failed", "crashed")]),
        "max_trials": settings.max_trials,
        "wall_time": settings.wall_time,
        "train_seconds": float(sum((r.train_seconds or 0.0) for r in records
                                   if r.state == "success" and not r.resumed_from)
                               + sum(_increment_seconds(r, records) for r in records
                                     if r.state == "success" and r.resumed_from)),
    }
    model = root / INCUMBENT_DIR
    incumbent_dirs = [p for p in model.glob("*__*__*") if p.is_dir()] if model.is_dir() else []
    previous = _read_json(root / RESULTS_NAME) or {}
    return SearchResults(
        root=str(root), settings=settings.to_dict(), rungs=_safe_rungs(settings), trials=records,
        incumbent=incumbent, incumbent_any_fidelity=best_of(successes), pareto_front=front, budget=budget,
        state=state, incumbent_model_dir=str(incumbent_dirs[0]) if incumbent_dirs else None,
        final=previous.get("final"),
    )


def _safe_rungs(settings: SearchSettings) -> dict[int, int]:
    try:
        return rung_fidelities(settings)
    except Exception:  # noqa: BLE001 - informative only
        return {}


def _increment_seconds(record: TrialRecord, records: list[TrialRecord]) -> float:
    """Training seconds a promoted trial added on top of the rung it resumed from."""
    previous = next((r for r in records if r.trial_id == record.resumed_from), None)
    before = previous.train_seconds if previous is not None and previous.train_seconds else 0.0
    return max(0.0, (record.train_seconds or 0.0) - before)


def _record_from_trial(trial_id: str, trial: Any, space: Any) -> TrialRecord:
    from .space import config_from_neps

    config_id, rung = split_trial_id(trial_id)
    trial_dir = Path(trial.metadata.location)
    own = _read_json(trial_dir / TRIAL_RECORD_NAME) or {}
    try:
        config, epochs = config_from_neps(space, trial.config)
        config_dict = config.to_dict()
    except Exception:  # noqa: BLE001 - a space change must not hide the trial
        config_dict, epochs = own.get("config", {}), own.get("epochs")
    state = str(trial.metadata.state)
    if state == "evaluating" and own.get("state") in ("success", "failed") and own.get("worker") == \
            trial.metadata.evaluating_worker_id:
        # The worker finished training and is about to report: its own record is final.
        state = own["state"]
    report = trial.report
    values = {k: v for k, v in own.items() if k in {f.name for f in dataclasses.fields(TrialRecord)}}
    values.update(trial_id=trial_id, config_id=config_id, rung=rung, config=config_dict, state=state,
                  worker=trial.metadata.evaluating_worker_id or own.get("worker"),
                  started=trial.metadata.time_started or own.get("started"),
                  attempts=_read_attempts(trial_dir))
    values["epochs"] = own.get("epochs", epochs)
    if report is not None:
        extra = dict(report.extra or {})
        values["objective"] = _finite(report.objective_to_minimize)
        values["finished"] = trial.metadata.time_end or own.get("finished")
        for key in ("mean_dice", "train_seconds", "seconds_per_epoch", "inference_seconds",
                    "epochs_trained", "resumed_from"):
            if key in extra and extra[key] is not None:
                values[key] = extra[key]
        if "dice_per_class" in extra:
            values["dice_per_class"] = dict(extra["dice_per_class"])
        if "epochs" in extra:
            values["epochs"] = extra["epochs"]
        if report.err is not None:
            values["error"] = own.get("error") or f"{type(report.err).__name__}: {report.err}"
    elif state in ("pending", "evaluating"):
        values["error"] = own.get("error") if state == "pending" else None
    if values.get("state") != "success":
        values.setdefault("mean_dice", None)
    return TrialRecord(**values)


def update_results(
    root: Union[str, Path], *, emit: Optional[ProgressCallback] = None, session_start: Optional[float] = None,
    state: str = "running",
) -> SearchResults:
    """Rewrite ``ROOT/results.json``, refresh ``ROOT/incumbent/`` and emit best/progress events."""
    root = Path(root)
    with _file_lock(root / ".results.lock"):
        previous = _read_json(root / RESULTS_NAME) or {}
        results = collect_results(root, state=state)
        best = results.best
        if best is not None and best.model_dir and Path(best.model_dir).is_dir():
            marker = _read_json(root / INCUMBENT_DIR / "incumbent.json") or {}
            if marker.get("trial_id") != best.trial_id:
                _copy_incumbent(root, best)
                results.incumbent_model_dir = str(root / INCUMBENT_DIR / Path(best.model_dir).name)
                if emit is not None:
                    emit(ProgressEvent("best", {"trial": best.trial_id, "dice": best.mean_dice,
                                                "epochs": best.epochs, "dice_per_class": best.dice_per_class}))
        _atomic_write_json(root / RESULTS_NAME, results.to_dict())
        if emit is not None and previous.get("budget") != results.budget:
            emit(ProgressEvent("progress", _progress_data(results, session_start)))
    return results


def _copy_incumbent(root: Path, best: TrialRecord) -> None:
    """Copy the incumbent's model folder to ROOT/incumbent/ (swap in whole, never half-copied)."""
    source = Path(best.model_dir)  # type: ignore[arg-type]
    target_parent = root / INCUMBENT_DIR
    staging = root / f".{INCUMBENT_DIR}.{os.getpid()}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    # The final checkpoint is all a prediction needs; "latest"/"best" copies would double the size.
    shutil.copytree(source, staging / source.name, ignore=shutil.ignore_patterns("checkpoint_latest.pth",
                                                                                  "checkpoint_best.pth"))
    _atomic_write_json(staging / "incumbent.json", {"trial_id": best.trial_id, "mean_dice": best.mean_dice,
                                                    "epochs": best.epochs, "config": best.config})
    old = root / f".{INCUMBENT_DIR}.{os.getpid()}.old"
    if target_parent.exists():
        os.replace(target_parent, old)
    os.replace(staging, target_parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _progress_data(results: SearchResults, session_start: Optional[float]) -> dict[str, Any]:
    """Fraction of the tightest budget spent and an ETA from this session's pace."""
    budget = results.budget
    now = time.time()
    fractions = []
    etas = []
    elapsed = now - session_start if session_start else None
    session = _read_json(Path(results.root) / ".session.json") or {}
    if budget.get("total_epochs"):
        total = float(budget["total_epochs"])
        used = float(budget["epochs_used"])
        fractions.append(min(1.0, used / total))
        done_now = used - float(session.get("epochs_used_at_start", 0.0))
        if elapsed and done_now > 0:
            etas.append(max(0.0, (total - used) * elapsed / done_now))
    if budget.get("max_trials"):
        total = float(budget["max_trials"])
        used = float(budget["trials"])
        fractions.append(min(1.0, used / total))
        done_now = used - float(session.get("trials_at_start", 0.0))
        if elapsed and done_now > 0:
            etas.append(max(0.0, (total - used) * elapsed / done_now))
    if budget.get("wall_time") and elapsed is not None:
        fractions.append(min(1.0, elapsed / float(budget["wall_time"])))
        etas.append(max(0.0, float(budget["wall_time"]) - elapsed))
    best = results.best
    return {
        "fraction": max(fractions) if fractions else None,
        "eta_seconds": min(etas) if etas else None,
        "trials": budget.get("trials"),
        "epochs_used": budget.get("epochs_used"),
        "best_dice": best.mean_dice if best else None,
        "message": (f"{budget.get('trials')} trials, {budget.get('epochs_used')} epochs"
                    + (f", best Dice {best.mean_dice:.4f} ({best.trial_id})" if best and best.mean_dice else "")),
    }


# ----------------------------------------------------------------------------------------------
# the search


def _write_settings(root: Path, workspace: Workspace, settings: SearchSettings) -> SearchSettings:
    """Create or check ROOT/search.json; returns the settings to use."""
    path = root / SETTINGS_NAME
    stored = _read_json(path)
    if stored is not None:
        old = SearchSettings.from_dict(stored["settings"])
        changed = [name for name in IDENTITY_FIELDS if getattr(old, name) != getattr(settings, name)]
        if changed:
            raise SearchError(
                f"{root} holds a search with other settings ({', '.join(changed)} differ); "
                "use another --root or the stored settings")
        if stored.get("dataset") != workspace.require_dataset():
            raise SearchError(f"{root} holds a search on {stored.get('dataset')}, not {workspace.require_dataset()}")
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(path, {
        "kind": "autonnunet-search", "workspace": str(workspace.root), "dataset": workspace.require_dataset(),
        "created": (stored or {}).get("created", time.time()), "settings": settings.to_dict(),
    })
    return settings


def load_settings(root: Union[str, Path]) -> tuple[SearchSettings, Workspace]:
    """The settings and workspace of an existing search root (for resuming)."""
    stored = _read_json(Path(root) / SETTINGS_NAME)
    if stored is None:
        raise SearchError(f"{root} is not a search root (no {SETTINGS_NAME})")
    return SearchSettings.from_dict(stored["settings"]), Workspace(Path(stored["workspace"]), stored.get("dataset"))


def run_search(
    workspace: Optional[Workspace],
    root: Union[str, Path],
    settings: Optional[SearchSettings] = None,
    *,
    progress: Optional[ProgressCallback] = None,
    trainer: Optional[Callable[..., Any]] = None,
) -> SearchResults:
    """Run (or resume) a search at ``root`` and return its results.

    ``settings=None`` resumes with the settings stored in ``root`` (``workspace=None`` too).
    Budgets may change between runs; what is searched may not. ``progress`` receives the events
    this process emits (with workers in other processes, read ``ROOT/events.jsonl`` instead).
    Scripts calling this with ``workers > 1`` need an ``if __name__ == "__main__"`` guard.
    """
    root = Path(root).expanduser().resolve()
    if settings is None or workspace is None:
        stored_settings, stored_workspace = load_settings(root)
        settings = settings or stored_settings
        workspace = workspace or stored_workspace
    settings = _write_settings(root, workspace, settings.validate())
    if settings.workers > 1 and settings.launcher == "inline":
        settings = dataclasses.replace(settings, launcher="submitit")

    writers: list[ProgressCallback] = [EventWriter(root / EVENTS_NAME)]
    if settings.events:
        writers.append(EventWriter(settings.events))
    emit = fanout(*writers, progress)
    session_start = time.time()
    before = collect_results(root)
    _atomic_write_json(root / ".session.json", {
        "start": session_start, "epochs_used_at_start": before.budget["epochs_used"],
        "trials_at_start": before.budget["trials"]})
    emit(ProgressEvent("stage", {"name": "search", "message": (
        f"{'resuming' if before.trials else 'starting'} {settings.optimizer} search ({settings.space}) in {root}")}))
    recover_abandoned_trials(root, retries=settings.retries, stale_after=settings.stale_after, events=emit)

    if settings.gpus is None and settings.device != "cpu" and settings.workers > 1:
        settings = dataclasses.replace(settings, gpus=_visible_gpus())

    outcome = "finished"
    try:
        if settings.workers == 1 and settings.launcher == "inline":
            outcome = _run_inline(workspace, root, settings, session_start, trainer, progress)
        else:
            outcome = _run_workers(workspace, root, settings, session_start)
    finally:
        state = "stopped" if outcome == "stopped" else "finished"
        results = update_results(root, emit=emit, session_start=session_start, state=state)

    if state == "finished" and settings.final_folds:
        results = retrain_incumbent(root, folds=settings.final_folds, progress=progress)
    emit(ProgressEvent("finished", {
        "state": "succeeded" if state == "finished" else "cancelled",
        "message": results.to_text(), "incumbent": results.incumbent,
        "dice": results.best.mean_dice if results.best else None}))
    return results


def _run_inline(workspace: Workspace, root: Path, settings: SearchSettings, session_start: float,
                trainer: Optional[Callable[..., Any]], progress: Optional[ProgressCallback]) -> str:
    _configure_worker_environment(settings, 0)
    if progress is None:
        return run_worker(workspace, root, settings, session_start=session_start, trainer=trainer)
    # Forward this process's events to the caller while the worker runs.
    stop = threading.Event()
    tail = threading.Thread(target=_tail_events, args=(root / EVENTS_NAME, progress, stop), daemon=True)
    tail.start()
    try:
        return run_worker(workspace, root, settings, session_start=session_start, trainer=trainer)
    finally:
        stop.set()
        tail.join(timeout=5)


def _tail_events(path: Path, callback: ProgressCallback, stop: threading.Event, interval: float = 0.5) -> None:
    offset = path.stat().st_size if path.exists() else 0
    while True:
        events, offset = read_events(path, offset)
        for event in events:
            if event.kind not in ("stage", "finished"):  # those the caller gets directly
                callback(event)
        if stop.is_set():
            break
        stop.wait(interval)


def _visible_gpus() -> list[int]:
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001
        return []


def _run_workers(workspace: Workspace, root: Path, settings: SearchSettings, session_start: float) -> str:
    """Start ``settings.workers`` worker processes on ``root`` and wait for all of them."""
    payload = {"settings": settings.to_dict(), "root": str(root), "workspace": str(workspace.root),
               "dataset": workspace.require_dataset(), "session_start": session_start}
    stop_requested: list[str] = []

    def request_stop(signum: int, frame: Any) -> None:
        stop_requested.append(signal.Signals(signum).name)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if settings.launcher == "submitit":
            outcomes = _run_submitit(payload, settings, root, stop_requested)
        else:
            outcomes = _run_processes(payload, settings, stop_requested)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return "stopped" if stop_requested or "stopped" in outcomes else "finished"


def _run_processes(payload: dict, settings: SearchSettings, stop_requested: list[str]) -> list[str]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_entry, args=(payload, i), name=f"autonnunet-worker-{i}")
                 for i in range(settings.workers)]
    for process in processes:
        process.start()
    forwarded = False
    while any(p.is_alive() for p in processes):
        if stop_requested and not forwarded:
            for process in processes:
                if process.is_alive() and process.pid:
                    os.kill(process.pid, signal.SIGTERM)
            forwarded = True
        time.sleep(0.5)
    for process in processes:
        process.join()
    return ["finished" if p.exitcode == 0 else "stopped" for p in processes]


def _run_submitit(payload: dict, settings: SearchSettings, root: Path, stop_requested: list[str]) -> list[str]:
    import submitit

    folder = root / "submitit"
    if settings.executor == "slurm":
        executor: Any = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = {"timeout_min": int(math.ceil((settings.wall_time or 3 * 86400) / 60)) + 10,
                  "slurm_gpus_per_node": 1 if settings.device != "cpu" else 0,
                  **settings.slurm}
        executor.update_parameters(**params)
    else:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=int(math.ceil((settings.wall_time or 30 * 86400) / 60)) + 10)
    jobs = [executor.submit(_worker_entry, payload, i) for i in range(settings.workers)]
    cancelled = False
    while not all(job.done() for job in jobs):
        if stop_requested and not cancelled:
            for job in jobs:
                with contextlib.suppress(Exception):
                    job.cancel(check=False)  # local: SIGINT; slurm: scancel -> SIGTERM
            cancelled = True
        time.sleep(1.0)
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(job.result())
        except Exception as error:  # noqa: BLE001 - one worker's failure is reported, not fatal
            log.error("worker job %s failed: %s", job.job_id, error)
            outcomes.append("stopped")
    return outcomes


# ----------------------------------------------------------------------------------------------
# final training


def retrain_incumbent(
    root: Union[str, Path], *, folds: Sequence[int] = (0, 1, 2, 3, 4),
    progress: Optional[ProgressCallback] = None, max_validation_cases: Optional[int] = None,
) -> SearchResults:
    """Train the incumbent configuration at ``max_epochs`` on ``folds`` into ``ROOT/final/``.

    Validation uses every validation case of each fold unless ``max_validation_cases`` is given.
    """
    from ..trainer import model_dir_name, train

    root = Path(root)
    settings, workspace = load_settings(root)
    results = collect_results(root, state="finished")
    best = results.best
    if best is None:
        raise SearchError(f"{root} has no successful trial to retrain")
    emit = fanout(EventWriter(root / EVENTS_NAME), progress)
    config = TrialConfig.from_dict(best.config)
    target = root / FINAL_DIR / model_dir_name(settings.configuration)
    emit(ProgressEvent("stage", {"name": "train", "message": f"final training of {best.trial_id} on folds "
                                                              f"{', '.join(map(str, folds))}"}))
    result = train(workspace, config, target, folds=list(folds), epochs=settings.max_epochs,
                   max_epochs=settings.max_epochs, iterations_per_epoch=settings.iterations_per_epoch,
                   device=settings.device, seed=settings.seed, configuration=settings.configuration,
                   max_validation_cases=max_validation_cases,
                   progress=lambda e: emit(ProgressEvent(e.kind, {**e.data, "trial": "final"}, e.time)))
    final = {"trial_id": best.trial_id, "folds": list(folds), "mean_dice": _finite(result.mean_dice),
             "dice_per_class": result.dice_per_class, "train_seconds": result.train_seconds,
             "model_dir": str(target)}
    with _file_lock(root / ".results.lock"):
        results = collect_results(root, state="finished")
        results.final = final
        _atomic_write_json(root / RESULTS_NAME, results.to_dict())
    return results


# ----------------------------------------------------------------------------------------------
# CLI


class ProgressBar:
    """Renders search events as one updating line on a terminal (a line per trial otherwise)."""

    def __init__(self, stream: Any = None, width: int = 24):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.fraction = 0.0
        self.eta: Optional[float] = None
        self.best: Optional[float] = None
        self.current = ""

    def __call__(self, event: ProgressEvent) -> None:
        data = event.data
        if event.kind == "progress":
            self.fraction = float(data.get("fraction") or 0.0)
            self.eta = data.get("eta_seconds")
        elif event.kind == "best":
            self.best = data.get("dice")
        elif event.kind == "trial_started":
            self.current = f"trial {data.get('trial')} ({data.get('epochs')} ep)"
        elif event.kind == "epoch":
            self.current = f"trial {data.get('trial')} epoch {data.get('epoch')}/{data.get('target_epochs')}"
        elif event.kind == "trial_finished":
            dice = data.get("dice")
            line = (f"trial {data.get('trial')}: {data.get('state')}"
                    + (f", Dice {dice:.4f}" if isinstance(dice, (int, float)) else "")
                    + (f" ({data.get('error')})" if data.get("error") else ""))
            self._line(line, final=True)
            return
        elif event.kind in ("stage", "finished"):
            self._line(str(data.get("message", "")), final=True)
            return
        else:
            return
        if self.tty:
            self._line(self._bar(), final=False)

    def _bar(self) -> str:
        filled = int(round(self.fraction * self.width))
        eta = f" ETA {_format_seconds(self.eta)}" if self.eta is not None else ""
        best = f" best {self.best:.4f}" if isinstance(self.best, (int, float)) else ""
        return f"[{'#' * filled}{'-' * (self.width - filled)}] {self.fraction:4.0%}{best}{eta} {self.current}"

    def _line(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def prepare_workspace(source: Union[str, Path], workdir: Union[str, Path], dataset: Optional[str] = None,
                      progress: Optional[ProgressCallback] = None) -> Workspace:
    """A planned workspace for ``source`` (MSD or nnU-Net raw folder), built only where missing.

    The dataset is assembled (and validated) when the workspace holds none; nnU-Net's fingerprint,
    plan and preprocessing run when there are no plans yet. A workspace that already holds a
    dataset is used as it is, so rerunning the same command resumes instead of rebuilding.
    """
    from ..dataset import build_dataset, detect_source
    from ..fingerprint import plan_and_preprocess

    workspace = Workspace(Path(workdir), dataset)
    if not any(workspace.raw.glob("Dataset*")):
        found = detect_source(Path(source))
        build_dataset(found, workspace, dataset_id=1, name=found.name or "AutoNNUNet", progress=progress)
    else:
        log.info("workspace %s already holds %s; using it (not rebuilt from %s)",
                 workspace.root, workspace.require_dataset(), source)
    if not workspace.plans_file.is_file():
        plan_and_preprocess(workspace, progress=progress)
    return workspace


def _log_stage(event: ProgressEvent) -> None:
    if event.data.get("message"):
        log.info("%s", event.data["message"])


def _cmd_search(args: argparse.Namespace) -> int:
    root = Path(args.root)
    overrides = {
        "space": args.space, "min_epochs": args.min_epochs, "max_epochs": args.max_epochs, "eta": args.eta,
        "prior_confidence": args.prior_confidence, "prior_first": args.prior_first or None,
        "folds": parse_folds(args.folds), "iterations_per_epoch": args.iterations_per_epoch,
        "max_validation_cases": args.max_validation_cases, "runtime_weight": args.runtime_weight,
        "optimizer": args.optimizer, "configuration": args.configuration, "seed": args.seed,
        "total_epochs": args.total_epochs, "max_trials": args.max_trials, "wall_time": args.wall_time,
        "workers": args.workers, "launcher": args.launcher, "executor": args.executor, "device": args.device,
        "events": args.events, "final_folds": parse_folds(args.final_folds),
        "slurm": ({"slurm_partition": args.slurm_partition} if args.slurm_partition else None),
    }
    stored = _read_json(root / SETTINGS_NAME)
    if args.source is not None and args.workdir is None and stored is None:
        raise SearchError("--source needs --workdir: the folder where the dataset is built and planned")
    if stored is not None and args.workdir is None:
        workspace = Workspace(Path(stored["workspace"]), stored.get("dataset"))
    elif args.workdir is None:
        raise SearchError("--workdir is required for a new search")
    else:
        workspace = Workspace(Path(args.workdir), args.dataset)
    if stored is not None:
        # Resume: start from the stored settings; flags may change budgets and resources.
        values = {**stored["settings"], **{k: v for k, v in overrides.items() if v is not None}}
        settings = SearchSettings.from_dict(values)
    else:
        settings = SearchSettings.from_profile(args.profile or "default", **overrides)
    if settings.workers > 1 and settings.launcher == "inline":
        settings.launcher = "submitit"
    if args.source is not None and stored is None:
        # After the settings were checked: a typo in a flag fails before minutes of preprocessing.
        prepare_workspace(args.source, args.workdir, args.dataset, progress=_log_stage)
    bar = None if args.quiet else ProgressBar()
    if settings.workers > 1 and bar is not None:
        # Workers are other processes: follow their events file.
        stop = threading.Event()
        tail = threading.Thread(target=_tail_events, args=(root.resolve() / EVENTS_NAME, bar, stop), daemon=True)
        root.mkdir(parents=True, exist_ok=True)
        tail.start()
        try:
            results = run_search(workspace, root, settings, progress=None)
        finally:
            stop.set()
            tail.join(timeout=5)
    else:
        results = run_search(workspace, root, settings, progress=bar)
    if args.json:
        print(json.dumps(results.to_dict(), indent=2, default=_json_default))
    else:
        print(results.to_text())
    return 0 if results.state == "finished" else 3


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "search", help="PriorBand search over nnU-Net configurations (resumable)",
        description="Search nnU-Net hyperparameters/architectures with (Regularized) PriorBand. "
                    "Rerun with the same --root to resume; SIGTERM/Ctrl-C stops cleanly.")
    parser.add_argument("--workdir", help="workspace (planned and preprocessed); optional when resuming")
    parser.add_argument("--source", help="MSD or nnU-Net raw folder: build and plan --workdir from it first "
                                         "(skipped for what the workspace already has)")
    parser.add_argument("--dataset", help="dataset name when the workspace holds several")
    parser.add_argument("--root", required=True, help="search root directory")
    parser.add_argument("--space", choices=("hpo", "hpo_nas", "hpo_hnas"))
    parser.add_argument("--profile", choices=tuple(PROFILES), help="defaults: default (GPU) or quick (CPU/tests)")
    parser.add_argument("--min-epochs", type=int)
    parser.add_argument("--max-epochs", type=int)
    parser.add_argument("--eta", type=int)
    parser.add_argument("--prior-confidence", choices=("low", "medium", "high"))
    parser.add_argument("--prior-first", action="store_true",
                        help="train nnU-Net's default at full fidelity first (as the reference)")
    parser.add_argument("--total-epochs", type=int, help="budget: epochs trained in total")
    parser.add_argument("--max-trials", type=int, help="budget: number of trials")
    parser.add_argument("--wall-time", type=float, help="budget: seconds for this run")
    parser.add_argument("--folds", nargs="+", help="folds per configuration (default 0; 'all' = 5-fold mean)")
    parser.add_argument("--iterations-per-epoch", type=int)
    parser.add_argument("--max-validation-cases", type=int)
    parser.add_argument("--runtime-weight", type=float, help="0 = plain PriorBand; default 1 (Regularized)")
    parser.add_argument("--optimizer", choices=("priorband", "random"))
    parser.add_argument("--configuration", default=None)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--launcher", choices=("inline", "process", "submitit"))
    parser.add_argument("--executor", choices=("local", "slurm"))
    parser.add_argument("--slurm-partition")
    parser.add_argument("--device")
    parser.add_argument("--events", help="also append progress events to this file")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--final-folds", nargs="+", help="retrain the incumbent at full fidelity on these folds")
    parser.add_argument("--json", action="store_true", help="print results.json instead of a summary")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_search)
