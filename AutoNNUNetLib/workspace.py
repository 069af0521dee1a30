"""A workspace: one folder holding nnU-Net's raw, preprocessed and results trees for a project.

nnU-Net finds its folders through the ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results``
environment variables, read each time a path is used (nnunetv2 2.8.1 ``paths._EnvPath``). The
library points them at a workspace for the duration of a call with :meth:`Workspace.activate`
instead of asking users to export them.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import json

from .devices import resolve_device  # noqa: F401  (kept importable from here for callers)
from .errors import AutoNNUNetError

DATASET_NAME_RE = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9_\-]+)$")
PLANS_NAME = "nnUNetPlans"
#: Model folders use nnU-Net's stock trainer name so stock tools can load them (DESIGN.md section 2).
STOCK_TRAINER = "nnUNetTrainer"


class WorkspaceError(AutoNNUNetError):
    """The workspace folder does not hold what the requested step needs."""


@dataclass
class Workspace:
    """Folder layout ``root/{nnUNet_raw,nnUNet_preprocessed,nnUNet_results}/DatasetNNN_Name``."""

    root: Path
    dataset_name: Optional[str] = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser().resolve()

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results"

    @property
    def dataset_id(self) -> int:
        match = DATASET_NAME_RE.match(self.require_dataset())
        assert match is not None
        return int(match.group(1))

    def require_dataset(self) -> str:
        """The dataset name; found automatically when the workspace holds exactly one."""
        if self.dataset_name:
            return self.dataset_name
        found = sorted(p.name for p in self.raw.glob("Dataset*") if DATASET_NAME_RE.match(p.name))
        if not found:
            found = sorted(p.name for p in self.preprocessed.glob("Dataset*") if DATASET_NAME_RE.match(p.name))
        if len(found) != 1:
            what = "no dataset" if not found else f"several datasets ({', '.join(found)})"
            raise WorkspaceError(f"workspace {self.root} holds {what}; name one with dataset_name / --dataset")
        self.dataset_name = found[0]
        return self.dataset_name

    @property
    def raw_dataset(self) -> Path:
        return self.raw / self.require_dataset()

    @property
    def preprocessed_dataset(self) -> Path:
        return self.preprocessed / self.require_dataset()

    @property
    def plans_file(self) -> Path:
        return self.preprocessed_dataset / f"{PLANS_NAME}.json"

    def load_plans(self) -> dict:
        if not self.plans_file.is_file():
            raise WorkspaceError(
                f"no plans in {self.preprocessed_dataset}: run `autonnunet fingerprint --workdir {self.root}` first"
            )
        return json.loads(self.plans_file.read_text())

    def load_dataset_json(self) -> dict:
        for candidate in (self.preprocessed_dataset / "dataset.json", self.raw_dataset / "dataset.json"):
            if candidate.is_file():
                return json.loads(candidate.read_text())
        raise WorkspaceError(f"no dataset.json for {self.require_dataset()} in {self.root}")

    @contextlib.contextmanager
    def activate(self) -> Iterator["Workspace"]:
        """Point nnU-Net's path variables at this workspace for the duration of the block."""
        names = {"nnUNet_raw": self.raw, "nnUNet_preprocessed": self.preprocessed, "nnUNet_results": self.results}
        saved = {name: os.environ.get(name) for name in names}
        for name, path in names.items():
            path.mkdir(parents=True, exist_ok=True)
            os.environ[name] = str(path)
        try:
            yield self
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's ``DatasetNNN_Name`` with the name reduced to safe characters."""
    if not 1 <= dataset_id <= 999:
        raise WorkspaceError(f"dataset id must be in 1..999, got {dataset_id}")
    safe = re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_") or "Dataset"
    return f"Dataset{dataset_id:03d}_{safe}"
