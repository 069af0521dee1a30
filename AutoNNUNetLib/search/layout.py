"""Names of the files and folders inside one search root (the layout docs/search.md describes)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

SETTINGS_NAME = "search.json"
RESULTS_NAME = "results.json"
EVENTS_NAME = "events.jsonl"
SESSION_NAME = ".session.json"
TRIAL_RECORD_NAME = "trial.json"
HEARTBEAT_NAME = "heartbeat"
ATTEMPTS_NAME = "attempts"
INCUMBENT_DIR = "incumbent"
NEPS_DIR = "neps"
FINAL_DIR = "final"
CONFIRM_DIR = "confirm"
RESULTS_LOCK = ".results.lock"
RECOVERY_LOCK = ".recovery.lock"


def neps_root(root: Union[str, Path]) -> Path:
    """NePS's own root directory inside a search root (NePS treats an existing folder as a run)."""
    return Path(root) / NEPS_DIR


def has_neps_state(root: Union[str, Path]) -> bool:
    """Whether NePS has created its state in ``root`` (a search that sampled at least once)."""
    return (neps_root(root) / "optimizer_info.yaml").is_file()
