"""What the Inference panel offers for the chosen model: one model folder or a selection.

A *model folder* (nnU-Net results layout) offers its folds. A *selection* root (``autonnunet
select``: an ensemble of members plus postprocessing, see AutoNNUNetLib.selection) offers its
members, each checkable, the selection's folds, and test-time mirroring defaulting to what the
cross-validation used. Both are read from their JSON files alone (no torch), so the panel can
show them before any dependency is installed.

:func:`predict_choice` turns the panel's picks into the fields of the one request record
(:class:`AutoNNUNetLib.jobs.params.PredictParams`), refusing picks the model cannot run (a fold it
does not have, no member checked) before a job starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

Fold = Union[int, str]


@dataclass
class Member:
    """One model of a selection's ensemble."""

    name: str
    configuration: str
    model_dir: Path


@dataclass
class ModelDescription:
    """The chosen model as the Inference panel shows it."""

    path: Path
    selection: bool
    channel_names: list[str] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)  # class name -> label value (with background)
    folds: list[Fold] = field(default_factory=list)         # the folds a prediction may use
    members: list[Member] = field(default_factory=list)     # a selection's members (empty for a model)
    mirroring: Optional[bool] = None                          # a selection's TTA (None: the user's choice)
    dataset_json: dict = field(default_factory=dict)          # the (first member's) dataset.json

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def first_model_dir(self) -> Path:
        return self.members[0].model_dir if self.members else self.path

    def folds_text(self) -> str:
        """The placeholder of the folds field: the folds there are."""
        return "folds: all (" + " ".join(str(f) for f in self.folds) + ")"


def is_selection(path: Any) -> bool:
    from AutoNNUNetLib.selection.archive import is_selection_root

    return bool(path) and Path(path) != Path() and is_selection_root(path)


def describe_model(path: Any) -> ModelDescription:
    """Describe a model folder or a selection root from its JSON files (raises the library's
    ModelError / SelectionError, both ValueErrors naming the file, when it is neither)."""
    from AutoNNUNetLib.files import read_json
    from AutoNNUNetLib.model import read_model_info

    path = Path(path)
    if not is_selection(path):
        info = read_model_info(path)
        return ModelDescription(path=path, selection=False, channel_names=info.channel_names,
                                classes=_classes(info.labels, path), folds=list(info.folds),
                                dataset_json=read_json(path / "dataset.json") or {})
    from AutoNNUNetLib.selection.choose import SelectionResult

    result = SelectionResult.load(path)
    members = [Member(str(m["name"]), str(m.get("configuration", "")), path / str(m["model_dir"]))
               for m in result.members]
    info = read_model_info(members[0].model_dir, folds=result.folds)
    return ModelDescription(path=path, selection=True, channel_names=info.channel_names,
                            classes=_classes(info.labels, members[0].model_dir), folds=list(result.folds),
                            members=members, mirroring=bool(result.use_mirroring),
                            dataset_json=read_json(members[0].model_dir / "dataset.json") or {})


def _classes(labels: dict, where: Path) -> dict[str, int]:
    classes = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):  # region-based labels: not a plain label map
            raise ValueError(f"{where}: the model uses region-based labels ({name}); only label maps are supported")
        classes[str(name)] = int(value)
    return classes


def try_describe(path: Any) -> Optional[ModelDescription]:
    """:func:`describe_model`, or None for an unset or unreadable folder (the panel then shows
    one input row and no members)."""
    if not path or Path(path) == Path():
        return None
    try:
        return describe_model(path)
    except (ValueError, OSError, KeyError, TypeError):
        return None


@dataclass
class PredictChoice:
    """The panel's inference picks, checked against the model: PredictParams' fields."""

    folds: Optional[list[Fold]] = None   # None: every fold the model (or selection) has
    members: Optional[list[str]] = None  # None: every member (or not a selection)
    mirroring: bool = False
    device: str = "auto"

    def params_fields(self) -> dict[str, Any]:
        return {"folds": self.folds, "members": self.members, "mirroring": self.mirroring, "device": self.device}


def predict_choice(description: Optional[ModelDescription], folds: Optional[Sequence[Fold]],
                   checked_members: Optional[Sequence[str]], mirroring: bool, device: str = "auto") -> PredictChoice:
    """The request fields for the panel's picks; raises ValueError naming a pick the model cannot run."""
    if description is not None and folds is not None:
        missing = [f for f in folds if f not in description.folds]
        if missing:
            raise ValueError(f"the model has no fold {', '.join(map(str, missing))} "
                             f"(it has {' '.join(str(f) for f in description.folds)})")
    members = None
    if description is not None and description.selection:
        checked = [m for m in description.member_names if m in set(checked_members or ())]
        if not checked:
            raise ValueError("check at least one member of the selection")
        members = None if checked == description.member_names else checked
    return PredictChoice(folds=list(folds) if folds is not None else None, members=members,
                         mirroring=bool(mirroring), device=device or "auto")
