"""A job's progress for people, folded from its events file (never from log text)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..events import ProgressEvent, read_events


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
