"""One trial's record (a row of the results table) and the per-trial files that hold it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..files import atomic_write_json, read_json
from ..progress import trial_state as progress_trial_state
from ..states import TrialState
from .layout import ATTEMPTS_NAME, TRIAL_RECORD_NAME


def trial_state(value: Any) -> TrialState:
    """A state as written by any version (the legacy ``"success"`` is succeeded).

    The rule is progress.trial_state's, so the results table and the live fold agree; a record
    without a state is a crash here (a record is written with its state), not a success.
    """
    return progress_trial_state(value.value if hasattr(value, "value") else value, default=TrialState.CRASHED)


@dataclass
class TrialRecord:
    """One row of the trials table (plain parameter names; times in seconds)."""

    trial_id: str
    config_id: int
    rung: Optional[int]
    epochs: Optional[int]  # the fidelity: epochs reached by this trial
    state: str  # a TrialState value
    config: dict[str, Any]
    mean_dice: Optional[float] = None
    dice_per_class: dict[str, float] = field(default_factory=dict)
    objective: Optional[float] = None
    epochs_trained: Optional[int] = None  # epochs trained by this trial (the rest was resumed or reused)
    train_seconds: Optional[float] = None  # cumulative over the rungs it continues
    seconds_per_epoch: Optional[float] = None
    inference_seconds: Optional[float] = None  # validation (sliding-window prediction) time
    resumed_from: Optional[str] = None
    #: The trial whose training already covered this one (same configuration): nothing was trained.
    reused_from: Optional[str] = None
    error: Optional[str] = None
    worker: Optional[str] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    attempts: int = 0
    model_dir: Optional[str] = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    #: Validations at rung epochs passed on the way to ``epochs`` (each: epochs, mean_dice,
    #: dice_per_class, train_seconds), the last one being this trial's own result.
    validations: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = trial_state(self.state).value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def split_trial_id(trial_id: str) -> tuple[int, Optional[int]]:
    """``"7_rung_2"`` -> (7, 2); random search ids (``"7"``) have no rung."""
    if "_rung_" in trial_id:
        config_id, rung = trial_id.split("_rung_")
        return int(config_id), int(rung)
    return int(trial_id), None


def read_trial_record(trial_dir: Path) -> dict[str, Any]:
    return read_json(Path(trial_dir) / TRIAL_RECORD_NAME) or {}


def write_trial_record(trial_dir: Path, record: TrialRecord) -> None:
    atomic_write_json(Path(trial_dir) / TRIAL_RECORD_NAME, record.to_dict())


def update_trial_record(trial_dir: Path, **changes: Any) -> None:
    record = read_trial_record(trial_dir)
    record.update(changes)
    atomic_write_json(Path(trial_dir) / TRIAL_RECORD_NAME, record)


def read_attempts(trial_dir: Path) -> int:
    try:
        return int((Path(trial_dir) / ATTEMPTS_NAME).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def write_attempts(trial_dir: Path, attempts: int) -> None:
    (Path(trial_dir) / ATTEMPTS_NAME).write_text(str(max(0, attempts)))
