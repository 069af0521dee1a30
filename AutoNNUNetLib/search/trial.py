"""One trial: the NePS evaluation function that trains a configuration to a rung's epochs.

Never the same training twice. The LR schedule always spans ``max_epochs``, so a training to
``e`` epochs passes through every lower rung exactly as a shorter training would. Hence:

- A trial whose configuration already has a validation at its epochs (from an earlier trial, or
  from a longer training that validated there on the way) *reuses* it: nothing is trained, the
  NePS cost is 0, ``reused_from`` names the trial that trained it.
- Otherwise the trial continues the furthest checkpoint of the same configuration below its
  epochs (a promotion continues its lower rung; a re-sampled configuration continues its own
  earlier run), and only the missing epochs are trained.
- A trial that jumps over rungs (the prior at F, a random-search trial) stops at each rung epoch
  on the way to validate, so those lower-rung results exist for free later.

Before training, the cost (missing epochs) is checked against the epoch cap of a ``--budget``
search: a trial that would not fit ends the worker instead (its trial goes back to pending).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..events import EventWriter, ProgressCallback, ProgressEvent, fanout
from ..states import TrialState
from ..workspace import Workspace
from .layout import EVENTS_NAME, HEARTBEAT_NAME, NEPS_DIR, TRIAL_RECORD_NAME
from .records import TrialRecord, read_attempts, split_trial_id, write_attempts, write_trial_record
from .settings import SearchSettings
from .stop import Heartbeat, SearchStopped, StopControl, recover_abandoned_trials

log = logging.getLogger(__name__)


def config_key(config: dict[str, Any]) -> str:
    """A configuration's identity: equal keys = the same training (floats to 10 significant digits).

    nnU-Net's configuration is part of it (the same hyperparameters in 2d are another training);
    records written before it was a field were 3d_fullres trainings.
    """
    from ..config import DEFAULT_CONFIGURATION

    def norm(value: Any) -> Any:
        if isinstance(value, float):
            return float(f"{value:.10g}")
        if isinstance(value, list):
            return [norm(v) for v in value]
        return value

    config = {"configuration": DEFAULT_CONFIGURATION, **config}
    return json.dumps({k: norm(v) for k, v in sorted(config.items())}, sort_keys=True)


def _has_checkpoints(model_dir: Optional[str], folds: list[int]) -> bool:
    return bool(model_dir) and all((Path(model_dir) / f"fold_{f}" / "checkpoint_final.pth").is_file() for f in folds)


@dataclass
class TrainingIndex:
    """What the search root already holds for each configuration: validations and checkpoints."""

    validations: dict[str, dict[int, tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    checkpoints: dict[str, list[tuple[int, str, str]]] = field(default_factory=dict)  # (epochs, trial, dir)
    epochs_used: int = 0

    @classmethod
    def scan(cls, root: Path, folds: list[int], exclude: Optional[str] = None) -> "TrainingIndex":
        index = cls()
        for path in sorted((root / NEPS_DIR / "configs").glob(f"config_*/{TRIAL_RECORD_NAME}")):
            try:
                record = TrialRecord.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if record.state != TrialState.SUCCEEDED:
                continue
            index.epochs_used += int(record.epochs_trained or 0)
            if record.trial_id == exclude:
                continue
            key = config_key(record.config)
            for validation in record.validations or []:
                index.validations.setdefault(key, {}).setdefault(int(validation["epochs"]),
                                                                 (record.trial_id, validation))
            if not record.reused_from and record.epochs and _has_checkpoints(record.model_dir, folds):
                index.checkpoints.setdefault(key, []).append((int(record.epochs), record.trial_id,
                                                              str(record.model_dir)))
        return index

    def validation(self, key: str, epochs: int) -> Optional[tuple[str, dict[str, Any]]]:
        return self.validations.get(key, {}).get(int(epochs))

    def resume_point(self, key: str, epochs: int) -> Optional[tuple[int, str, str]]:
        """The furthest checkpoint of this configuration at or below ``epochs``."""
        below = [c for c in self.checkpoints.get(key, []) if c[0] <= epochs]
        return max(below, default=None)


@dataclass
class TrialRunner:
    """The NePS evaluation function of a worker: trains one trial, records it, reports it."""

    workspace_root: str
    dataset_name: Optional[str]
    root: str
    settings: SearchSettings
    worker_id: str
    session_start: float
    rung_epochs: list[int] = field(default_factory=list)
    #: Epochs the whole search may train (a --budget search); None: NePS's budgets alone.
    epoch_cap: Optional[int] = None
    stop: Optional[StopControl] = None
    trainer: Optional[Callable[..., Any]] = None  # injectable for tests of the control flow

    def __post_init__(self) -> None:
        writers = [EventWriter(Path(self.root) / EVENTS_NAME)]
        if self.settings.events:
            writers.append(EventWriter(self.settings.events))
        self.emit: ProgressCallback = fanout(*writers)

    def _update_results(self) -> None:
        # Called before NePS stores the report (it does not hold its locks while evaluating);
        # collect_results reads this trial's own record, which is already final.
        from .results import update_results

        try:
            update_results(Path(self.root), emit=self.emit, session_start=self.session_start)
        except Exception:  # noqa: BLE001 - bookkeeping must never stop the search
            log.exception("could not update the results of %s", self.root)

    def __call__(self, pipeline_directory: Path, previous_pipeline_directory: Optional[Path],
                 pipeline_id: str, **values: Any) -> dict[str, Any]:
        from ..trainer import model_dir_name
        from .space import trial_config_from_values

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
        attempts = read_attempts(trial_dir) + 1
        write_attempts(trial_dir, attempts)
        model_dir = trial_dir / model_dir_name(config.configuration)
        record = TrialRecord(
            trial_id=pipeline_id, config_id=config_id, rung=rung, epochs=epochs, state=TrialState.EVALUATING,
            config=config.to_dict(), worker=self.worker_id, started=time.time(), attempts=attempts,
            model_dir=str(model_dir),
        )
        key = config_key(record.config)
        index = TrainingIndex.scan(root, list(settings.folds), exclude=pipeline_id)
        found = index.validation(key, epochs)
        if found is not None:
            return self._reuse(trial_dir, record, *found)

        resume = index.resume_point(key, epochs)
        start = resume[0] if resume else 0
        if self.epoch_cap is not None and index.epochs_used + (epochs - start) > self.epoch_cap:
            if self.stop is not None:
                self.stop.budget_spent()
            raise SearchStopped(StopControl.BUDGET)
        if model_dir.exists():
            shutil.rmtree(model_dir)  # leftovers of an interrupted attempt: start this rung clean
        if resume is not None:
            record.resumed_from = resume[1]
        elif previous_pipeline_directory is not None:
            log.warning("trial %s: lower rung %s has no checkpoint; training from scratch",
                        pipeline_id, previous_pipeline_directory)
        write_trial_record(trial_dir, record)
        self.emit(ProgressEvent("trial_started", {
            "trial": pipeline_id, "rung": rung, "epochs": epochs, "config": record.config,
            "resumed_from": record.resumed_from, "worker": self.worker_id, "attempt": attempts}))
        try:
            with Heartbeat(trial_dir / HEARTBEAT_NAME):
                self._train(record, config, model_dir, Path(resume[2]) if resume else None, start, epochs)
        except SearchStopped:
            raise
        except Exception as error:
            # Recorded here with its message; re-raised so NePS stores the trial as crashed (with
            # ignore_errors=True the worker goes on with the next trial).
            message = f"{type(error).__name__}: {error}"
            record.state, record.error, record.finished = TrialState.FAILED, message, time.time()
            write_trial_record(trial_dir, record)
            self.emit(ProgressEvent("trial_finished", {
                "trial": pipeline_id, "rung": rung, "epochs": epochs, "state": TrialState.FAILED, "error": message}))
            self._update_results()
            raise
        return self._finish(trial_dir, record)

    def _train(self, record: TrialRecord, config: Any, model_dir: Path, resume_from: Optional[Path],
               start: int, epochs: int) -> None:
        """Train ``start -> epochs``, stopping to validate at every rung epoch on the way."""
        settings = self.settings
        train = self.trainer
        if train is None:
            from ..trainer import train
        workspace = Workspace(Path(self.workspace_root), self.dataset_name)

        def on_progress(event: ProgressEvent) -> None:
            if event.kind == "epoch":
                record.curve.append({k: event.data.get(k) for k in ("fold", "epoch", "loss", "seconds")})
            self.emit(ProgressEvent(event.kind, {**event.data, "trial": record.trial_id}, event.time))

        stops = [e for e in self.rung_epochs if start < e < epochs] + [epochs]
        trained = 0
        for target in stops:
            if self.stop is not None:
                self.stop.in_trial = True
                self.stop.check()
            try:
                result = train(
                    workspace, config, model_dir, folds=list(settings.folds), epochs=target,
                    max_epochs=settings.max_epochs, iterations_per_epoch=settings.iterations_per_epoch,
                    resume_from=resume_from, device=settings.device, seed=settings.seed, progress=on_progress,
                    max_validation_cases=settings.max_validation_cases,
                )
            finally:
                if self.stop is not None:
                    self.stop.in_trial = False
            resume_from = model_dir  # the next segment continues this one's checkpoint
            trained += max((f.epochs_trained for f in result.folds), default=0)
            mean_dice = _finite(result.mean_dice)
            record.validations.append({
                "epochs": int(result.epochs), "mean_dice": mean_dice,
                "dice_per_class": {k: float(v) for k, v in result.dice_per_class.items()},
                "train_seconds": float(result.train_seconds),
                "inference_seconds": float(sum(f.validation_seconds for f in result.folds) / max(1, len(result.folds))),
                "diverged": result.diverged,
            })
            write_trial_record(model_dir.parent, record)  # the rung validations so far are visible at once
        final = record.validations[-1]
        record.epochs = int(final["epochs"])
        record.epochs_trained = int(trained)
        record.mean_dice = final["mean_dice"]
        record.dice_per_class = final["dice_per_class"]
        record.train_seconds = final["train_seconds"]
        record.seconds_per_epoch = final["train_seconds"] / max(1, record.epochs)
        record.inference_seconds = final["inference_seconds"]
        # A diverged run is a result (loss 1, so PriorBand learns to avoid it), with its reason kept.
        record.error = next((v["diverged"] for v in record.validations if v.get("diverged")), None)

    def _reuse(self, trial_dir: Path, record: TrialRecord, source: str, validation: dict[str, Any]) -> dict[str, Any]:
        """This configuration was already validated at these epochs: report that, train nothing."""
        from .records import read_trial_record

        source_record = read_trial_record(Path(self.root) / NEPS_DIR / "configs" / f"config_{source}")
        record.reused_from = source
        record.model_dir = source_record.get("model_dir")
        record.epochs_trained = 0
        record.mean_dice = validation.get("mean_dice")
        record.dice_per_class = dict(validation.get("dice_per_class") or {})
        record.train_seconds = float(validation.get("train_seconds") or 0.0)
        record.seconds_per_epoch = record.train_seconds / max(1, int(validation["epochs"]))
        record.inference_seconds = validation.get("inference_seconds")
        record.validations = [dict(validation)]
        self.emit(ProgressEvent("trial_started", {
            "trial": record.trial_id, "rung": record.rung, "epochs": record.epochs, "config": record.config,
            "reused_from": source, "worker": self.worker_id, "attempt": record.attempts}))
        return self._finish(trial_dir, record)

    def _finish(self, trial_dir: Path, record: TrialRecord) -> dict[str, Any]:
        record.state = TrialState.SUCCEEDED
        record.objective = 1.0 - record.mean_dice if record.mean_dice is not None else 1.0
        record.finished = time.time()
        write_trial_record(trial_dir, record)
        self.emit(ProgressEvent("trial_finished", {
            "trial": record.trial_id, "rung": record.rung, "epochs": record.epochs, "dice": record.mean_dice,
            "dice_per_class": record.dice_per_class, "train_seconds": record.train_seconds,
            "epochs_trained": record.epochs_trained, "reused_from": record.reused_from,
            "diverged": record.error, "state": TrialState.SUCCEEDED}))
        self._update_results()
        return {
            "objective_to_minimize": record.objective,
            "cost": float(record.epochs_trained or 0),
            "info_dict": {
                "mean_dice": record.mean_dice, "dice_per_class": record.dice_per_class,
                "train_seconds": record.train_seconds, "seconds_per_epoch": record.seconds_per_epoch,
                "inference_seconds": record.inference_seconds, "epochs": record.epochs,
                "epochs_trained": record.epochs_trained, "resumed_from": record.resumed_from,
                "reused_from": record.reused_from, "diverged": record.error, "wall_seconds": record.finished - (record.started or record.finished),
            },
        }


def _finite(value: Any) -> Optional[float]:
    import math

    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
