"""Progress for people: the one fold of progress events into what a user is shown.

A search (or a training, a prediction, a dataset step) writes :class:`~AutoNNUNetLib.events.ProgressEvent`
lines to an events file. Three consumers show them: the CLI, the job server (its job status) and the
Slicer module (status label, best Dice, live chart). They all fold the events with
:class:`SearchProgress`, so a state spelled differently by a producer cannot be shown differently by
one consumer: trial states are read through :func:`trial_state`, which also accepts the legacy
``"success"`` written by older searches (their events files stay readable).

:class:`ProgressReader` follows an events file from a byte offset and keeps the fold up to date;
:func:`format_event` is the one log line per event.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Union

from .pareto import pareto_front
from .states import EventKind, TrialState

if TYPE_CHECKING:  # events.py is light, but the fold only needs the record's shape
    from .events import ProgressEvent


def format_duration(seconds: Optional[float]) -> str:
    """``3h 05m``, ``12m 03s`` or ``45s``; empty for unknown or negative."""
    if seconds is None:
        return ""
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(seconds) or seconds < 0:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


#: Spellings producers have used for a trial state (older searches, NePS's own words), folded to
#: the shared enum.
_STATE_ALIASES = {"success": TrialState.SUCCEEDED, "running": TrialState.EVALUATING,
                  "submitted": TrialState.PENDING, "corrupted": TrialState.CRASHED}


def trial_state(value: Any, default: TrialState = TrialState.SUCCEEDED) -> TrialState:
    """The :class:`TrialState` of an event's ``state`` value.

    Missing means ``default`` (events.py documents ``state`` as optional on ``trial_finished``,
    where it means succeeded); an unknown word is a failure, never silently a success.
    """
    if value is None or value == "":
        return default
    text = str(value).strip().lower()
    if text in _STATE_ALIASES:
        return _STATE_ALIASES[text]
    try:
        return TrialState(text)
    except ValueError:
        return TrialState.FAILED


def _opt_int(value: Any) -> Optional[int]:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _opt_float(value: Any) -> Optional[float]:
    try:
        number = None if value is None else float(value)
    except (TypeError, ValueError):
        return None
    return number if number is None or math.isfinite(number) else None


def _fmt_dice(value: Any) -> str:
    number = _opt_float(value)
    return "?" if number is None else f"{number:.4f}"


@dataclass
class TrialPoint:
    """One trial (one configuration at one epoch budget): a point of the chart, a row of a table."""

    trial: str
    rung: Optional[int] = None
    epochs: Optional[int] = None
    state: TrialState = TrialState.EVALUATING
    dice: Optional[float] = None
    train_seconds: Optional[float] = None
    dice_per_class: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def scored(self) -> bool:
        """Succeeded with a Dice and a training time: it can be drawn on the chart."""
        return self.state == TrialState.SUCCEEDED and self.dice is not None and self.train_seconds is not None

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.trial, "rung": self.rung, "epochs": self.epochs, "state": str(self.state),
                "dice": self.dice, "train_seconds": self.train_seconds,
                "dice_per_class": dict(self.dice_per_class), "error": self.error}


def pareto_points(points: Iterable[TrialPoint]) -> list[TrialPoint]:
    """The scored points no other one beats on both training time and Dice, fastest first.

    Sorted by time because a chart draws the front as a staircase from left to right; the front
    itself is :func:`AutoNNUNetLib.pareto.pareto_front` on (seconds, 1 - Dice), both minimised.
    """
    scored = [p for p in points if p.scored]
    front = pareto_front([(p.train_seconds, 1.0 - p.dice) for p in scored])  # type: ignore[operator]
    return sorted((scored[i] for i in front), key=lambda p: (p.train_seconds, -(p.dice or 0.0)))


@dataclass
class SearchProgress:
    """What a user is shown about a running job, folded from its progress events.

    Call :meth:`update` with each event in file order. Trials are keyed by id and epoch budget: a
    promoted configuration evaluated again at a higher budget is a new point, while a trial started
    again after an interruption (NePS re-runs it on resume) stays one point and is counted once.
    """

    stage: str = ""
    message: str = ""
    trial: Optional[str] = None  # the trial most recently started or trained
    rung: Optional[int] = None
    trial_epochs: Optional[int] = None  # that trial's epoch budget (fidelity)
    epoch: Optional[int] = None
    max_epochs: Optional[int] = None
    loss: Optional[float] = None
    best_dice: Optional[float] = None
    best_trial: Optional[str] = None
    fraction: Optional[float] = None
    eta_seconds: Optional[float] = None
    finished_state: Optional[str] = None
    updated: Optional[float] = None
    trials: dict[str, TrialPoint] = field(default_factory=dict)

    # -- folding ---------------------------------------------------------------------------------

    def update(self, event: "ProgressEvent") -> None:
        data = event.data or {}
        kind = event.kind
        self.updated = event.time
        if kind == EventKind.STAGE:
            self.stage = str(data.get("name") or self.stage)
            self.message = str(data.get("message") or "")
        elif kind == EventKind.TRIAL_STARTED:
            self.trial = str(data.get("trial"))
            self.rung = _opt_int(data.get("rung"))
            self.trial_epochs = _opt_int(data.get("epochs"))
            self.epoch = None
            self.trials[self._key(data)] = TrialPoint(trial=self.trial, rung=self.rung, epochs=self.trial_epochs)
        elif kind == EventKind.EPOCH:
            if data.get("trial") is not None:
                self.trial = str(data["trial"])
            self.epoch = _opt_int(data.get("epoch"))
            self.max_epochs = _opt_int(data.get("max_epochs")) or self.max_epochs
            self.loss = _opt_float(data.get("loss")) if data.get("loss") is not None else self.loss
        elif kind == EventKind.TRIAL_FINISHED:
            self._finish_trial(data)
        elif kind == EventKind.BEST:
            dice = _opt_float(data.get("dice"))
            if dice is not None:
                self.best_dice, self.best_trial = dice, str(data.get("trial"))
        elif kind == EventKind.PROGRESS:
            fraction = _opt_float(data.get("fraction"))
            if fraction is not None:
                self.fraction = min(1.0, max(0.0, fraction))
            eta = _opt_float(data.get("eta_seconds"))
            if eta is not None:
                self.eta_seconds = eta
            if data.get("message"):
                self.message = str(data["message"])
        elif kind == EventKind.FINISHED:
            self.finished_state = str(data.get("state") or "succeeded")
            self.message = str(data.get("message") or self.message)
            if self.finished_state == "succeeded":
                self.fraction, self.eta_seconds = 1.0, 0.0

    def update_all(self, events: Iterable["ProgressEvent"]) -> "SearchProgress":
        for event in events:
            self.update(event)
        return self

    def _finish_trial(self, data: Mapping[str, Any]) -> None:
        key = self._key(data)
        point = self.trials.get(key)
        if point is None:
            # No trial_started with this budget seen (a reader attached late, or an abandoned trial
            # recorded by the recovery, which knows no epochs): the running point of that id.
            point = next((p for p in self.trials.values() if p.trial == str(data.get("trial"))
                          and p.state == TrialState.EVALUATING), None)
        if point is None:
            point = self.trials[key] = TrialPoint(trial=str(data.get("trial")))
        if data.get("rung") is not None:
            point.rung = _opt_int(data["rung"])
        if data.get("epochs") is not None:
            point.epochs = _opt_int(data["epochs"])
        point.state = trial_state(data.get("state"))
        point.dice = _opt_float(data.get("dice"))
        point.train_seconds = _opt_float(data.get("train_seconds"))
        point.dice_per_class = {str(k): float(v) for k, v in (data.get("dice_per_class") or {}).items()
                                if _opt_float(v) is not None}
        point.error = str(data.get("error") or "")
        if point.state == TrialState.SUCCEEDED and point.dice is not None and (
                self.best_dice is None or point.dice > self.best_dice):
            self.best_dice, self.best_trial = point.dice, point.trial

    @staticmethod
    def _key(data: Mapping[str, Any]) -> str:
        return f"{data.get('trial')}@{data.get('epochs')}"

    # -- counts ----------------------------------------------------------------------------------

    def _ids(self, *states: TrialState) -> set[str]:
        return {p.trial for p in self.trials.values() if p.state in states}

    @property
    def trials_started(self) -> int:
        return len({p.trial for p in self.trials.values()})

    @property
    def trials_finished(self) -> int:
        """Trials that succeeded (a trial failed once and then succeeded counts here only)."""
        return len(self._ids(TrialState.SUCCEEDED))

    @property
    def trials_failed(self) -> int:
        return len(self._ids(TrialState.FAILED, TrialState.CRASHED) - self._ids(TrialState.SUCCEEDED))

    # -- views -----------------------------------------------------------------------------------

    def points(self) -> list[TrialPoint]:
        """Every trial in the order it started."""
        return list(self.trials.values())

    def finished_points(self) -> list[TrialPoint]:
        """The trials the chart can draw: succeeded, with a Dice and a training time."""
        return [p for p in self.trials.values() if p.scored]

    def pareto_points(self) -> list[TrialPoint]:
        """The Pareto front of :meth:`finished_points` (time vs Dice), fastest first."""
        return pareto_points(self.trials.values())

    def status_text(self) -> str:
        """``Trial 7 (rung 1, 37 epochs), epoch 12/333, ETA 1h 02m`` for the status label."""
        if self.finished_state:
            return f"Finished ({self.finished_state})" + (f": {self.message}" if self.message else "")
        if self.trial is None:
            return self.message or self.stage or "Starting..."
        text = f"Trial {self.trial}"
        details = []
        if self.rung is not None:
            details.append(f"rung {self.rung}")
        if self.trial_epochs is not None:
            details.append(f"{self.trial_epochs} epochs")
        if details:
            text += f" ({', '.join(details)})"
        if self.epoch is not None:
            text += f", epoch {self.epoch}" + (f"/{self.max_epochs}" if self.max_epochs else "")
        if self.eta_seconds is not None and self.eta_seconds > 0:
            text += f", ETA {format_duration(self.eta_seconds)}"
        return text

    def best_text(self) -> str:
        if self.best_dice is None:
            return "-"
        return f"{self.best_dice:.4f} (trial {self.best_trial})"

    def percent(self) -> int:
        """0-100 for a progress bar; falls back to the epochs of the current trial."""
        if self.fraction is not None:
            return int(round(100 * self.fraction))
        if self.epoch is not None and self.max_epochs:
            return int(round(100 * min(1.0, self.epoch / self.max_epochs)))
        return 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary a job status carries (the server stores it; clients show it)."""
        return {
            "stage": self.stage or None, "message": self.message or None, "trial": self.trial,
            "rung": self.rung, "trial_epochs": self.trial_epochs, "epoch": self.epoch,
            "max_epochs": self.max_epochs, "loss": self.loss, "trials_started": self.trials_started,
            "trials_finished": self.trials_finished, "trials_failed": self.trials_failed,
            "best_dice": self.best_dice, "best_trial": self.best_trial, "fraction": self.fraction,
            "eta_seconds": self.eta_seconds, "finished_state": self.finished_state, "updated": self.updated,
        }


class ProgressReader:
    """Follows an events file from a byte offset and keeps its :class:`SearchProgress` folded.

    A partly written last line waits for the next :meth:`poll` (see ``events.read_events``).
    """

    def __init__(self, path: Union[str, Path], offset: int = 0, progress: Optional[SearchProgress] = None):
        self.path = Path(path)
        self.offset = offset
        self.progress = progress if progress is not None else SearchProgress()

    def poll(self) -> list["ProgressEvent"]:
        """Fold the events written since the last call; returns them."""
        from .events import read_events

        events, self.offset = read_events(self.path, self.offset)
        self.progress.update_all(events)
        return events


def format_event(event: "ProgressEvent") -> Optional[str]:
    """One log line for a progress event (None when it has nothing to say)."""
    data = event.data or {}
    kind = event.kind
    if kind == EventKind.STAGE:
        name, message = data.get("name", ""), data.get("message", "")
        return f"[{name}] {message}".strip() if name else str(message)
    if kind == EventKind.TRIAL_STARTED:
        details = []
        if data.get("rung") is not None:
            details.append(f"rung {data['rung']}")
        if data.get("epochs") is not None:
            details.append(f"{data['epochs']} epochs")
        return f"Trial {data.get('trial', '?')} started" + (f" ({', '.join(details)})" if details else "")
    if kind == EventKind.EPOCH:
        line = f"Trial {data.get('trial', '?')}"
        if data.get("fold") is not None:
            line += f" fold {data['fold']}"
        line += f" epoch {data.get('epoch', '?')}"
        if data.get("max_epochs") is not None:
            line += f"/{data['max_epochs']}"
        if _opt_float(data.get("loss")) is not None:
            line += f" loss {float(data['loss']):.4f}"
        if data.get("seconds") is not None:
            line += f" ({format_duration(data['seconds'])})"
        return line
    if kind == EventKind.TRIAL_FINISHED:
        trial, state = data.get("trial", "?"), trial_state(data.get("state"))
        if state != TrialState.SUCCEEDED:
            return f"Trial {trial} {state}: {data.get('error') or 'no error message'}"
        line = f"Trial {trial} finished: Dice {_fmt_dice(data.get('dice'))}"
        if data.get("epochs") is not None:
            line += f" after {data['epochs']} epochs"
        if data.get("train_seconds") is not None:
            line += f", training {format_duration(data['train_seconds'])}"
        per_class = data.get("dice_per_class") or {}
        if per_class:
            line += " (" + ", ".join(f"{name} {_fmt_dice(value)}" for name, value in per_class.items()) + ")"
        return line
    if kind == EventKind.BEST:
        line = f"New best: trial {data.get('trial', '?')}, Dice {_fmt_dice(data.get('dice'))}"
        if data.get("epochs") is not None:
            line += f" ({data['epochs']} epochs)"
        return line
    if kind == EventKind.PROGRESS:
        parts = []
        if data.get("message"):
            parts.append(str(data["message"]))
        if _opt_float(data.get("fraction")) is not None:
            parts.append(f"{100.0 * float(data['fraction']):.0f}%")
        if data.get("eta_seconds") is not None:
            parts.append(f"ETA {format_duration(data['eta_seconds'])}")
        return " - ".join(parts) if parts else None
    if kind == EventKind.FINISHED:
        line = f"Finished: {data.get('state', 'unknown')}"
        if data.get("message"):
            line += f" - {data['message']}"
        return line
    return f"{kind}: {json.dumps(data, default=str)}"
