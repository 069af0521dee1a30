"""Which configurations compete in the selection.

- the search's incumbent (best Dice at the highest fidelity),
- the next best points of its Pareto front (Dice vs training time), ``top`` of them,
- the incumbent's hyperparameters in nnU-Net's other planned configurations (``2d``,
  ``3d_lowres``, and ``3d_fullres`` when the search chose another one) where the plans contain
  them and their data is preprocessed,
- or any model folders (each with its ``autonnunet.json`` record, or nnU-Net's default config).

Each candidate gets an nnU-Net plans identifier ``nnUNetPlans_<name>`` so that several searched
hyperparameter sets of the same configuration live side by side in one ``nnUNet_results`` tree
with the stock trainer name (``nnUNetTrainer__nnUNetPlans_incumbent__3d_fullres``, ...), which is
how ``nnUNetv2_predict -p`` tells them apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import TrialConfig
from ..workspace import PLANS_NAME, STOCK_TRAINER, Workspace
from .layout import NAME_RE, SelectionError

#: Configurations nnU-Net may plan besides 3d_fullres (the cascade needs the low-res stage first).
OTHER_CONFIGURATIONS = ("2d", "3d_lowres")


@dataclass
class Candidate:
    """One configuration to finalize: hyperparameters, nnU-Net configuration, where it came from."""

    name: str  # letters and digits; the plans identifier is nnUNetPlans_<base>
    config: TrialConfig
    #: nnU-Net's configuration; None: the config's own (a searched choice). Given, it is set in
    #: the config too, so the two never disagree.
    configuration: Optional[str] = None
    origin: str = "model"  # incumbent / pareto / configuration / model
    base: Optional[str] = None  # name of the hyperparameter set (defaults to name)
    source_dir: Optional[Path] = None  # an existing model folder whose folds may be reused
    search_dice: Optional[float] = None
    note: str = ""

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise SelectionError(f"candidate name {self.name!r}: use letters and digits only")
        self.base = self.base or self.name
        self.configuration = self.configuration or self.config.configuration
        if self.config.configuration != self.configuration:
            self.config = self.config.replace(configuration=self.configuration)
        self.source_dir = Path(self.source_dir) if self.source_dir else None

    @property
    def plans_identifier(self) -> str:
        return f"{PLANS_NAME}_{self.base}"

    @property
    def folder_name(self) -> str:
        """nnU-Net's model folder name ``<trainer>__<plans>__<configuration>``."""
        return f"{STOCK_TRAINER}__{self.plans_identifier}__{self.configuration}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.to_dict(), "configuration": self.configuration,
                "origin": self.origin, "base": self.base, "source_dir": str(self.source_dir) if self.source_dir else None,
                "search_dice": self.search_dice, "note": self.note, "folder_name": self.folder_name}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Candidate":
        return cls(name=data["name"], config=TrialConfig.from_dict(data["config"]),
                   configuration=data.get("configuration"), origin=data.get("origin", "model"),
                   base=data.get("base"), source_dir=data.get("source_dir"), search_dice=data.get("search_dice"),
                   note=data.get("note", ""))


def _read_results(root: Path) -> dict:
    path = Path(root) / "results.json"
    if not path.is_file():
        raise SelectionError(f"{path}: missing; is {root} a search root (`autonnunet search --root`)?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SelectionError(f"{path}: not valid JSON ({error})") from error


def candidates_from_search(root: Path, top: int = 0, workspace: Optional[Workspace] = None,
                           configurations: Sequence[str] = OTHER_CONFIGURATIONS) -> list[Candidate]:
    """The incumbent, the ``top`` next best Pareto points, and the incumbent in other configurations.

    Only ``trial_id``, ``config``, ``mean_dice``, ``epochs``, ``state`` and ``model_dir`` of the
    trials, ``incumbent`` and ``pareto_front`` of ``results.json`` are read.
    """
    results = _read_results(root)
    trials = {t["trial_id"]: t for t in results.get("trials", []) if isinstance(t, dict) and "trial_id" in t}
    incumbent = trials.get(results.get("incumbent") or "")
    if incumbent is None:
        raise SelectionError(f"{root}: the search has no incumbent yet (no successful trial)")

    def candidate(trial: dict, name: str, origin: str) -> Candidate:
        source = trial.get("model_dir")
        if source and not Path(source).is_absolute():
            source = str(Path(root) / source)
        return Candidate(name=name, config=TrialConfig.from_dict(trial["config"]), origin=origin,
                         source_dir=Path(source) if source and Path(source).is_dir() else None,
                         search_dice=trial.get("mean_dice"),
                         note=f"trial {trial['trial_id']} ({trial.get('epochs')} epochs)")

    chosen = [candidate(incumbent, "incumbent", "incumbent")]
    seen = [chosen[0].config]
    front = [trials[t] for t in results.get("pareto_front", []) if t in trials and trials[t].get("mean_dice") is not None]
    front.sort(key=lambda t: -float(t["mean_dice"]))
    for trial in front:
        if len(chosen) > top:
            break
        config = TrialConfig.from_dict(trial["config"])
        if config in seen:
            continue  # the same configuration at another rung
        seen.append(config)
        chosen.append(candidate(trial, f"pareto{len(chosen)}", "pareto"))
    if workspace is not None:
        wanted = list(configurations)
        if chosen[0].configuration != "3d_fullres" and "3d_fullres" not in wanted:
            wanted.insert(0, "3d_fullres")  # a searched 2d incumbent: nnU-Net's default configuration competes too
        others = other_configurations(chosen[0], workspace, wanted)
        chosen.extend(c for c in others if c.config not in seen)  # not a Pareto point already
    return chosen


def other_configurations(candidate: Candidate, workspace: Workspace,
                         configurations: Sequence[str] = OTHER_CONFIGURATIONS) -> list[Candidate]:
    """``candidate``'s hyperparameters in each configuration nnU-Net planned and preprocessed."""
    plans = workspace.load_plans()
    found = []
    for name in configurations:
        entry = plans.get("configurations", {}).get(name)
        if name == candidate.configuration or entry is None or "data_identifier" not in entry:
            continue  # not planned (e.g. no 3d_lowres for small images), or only inherits another
        if not (workspace.preprocessed_dataset / entry["data_identifier"]).is_dir():
            continue  # planned but not preprocessed: nothing to train on
        found.append(Candidate(name=f"{candidate.base}{name.replace('_', '')}",
                               config=candidate.config.replace(configuration=name), configuration=name, origin="configuration", base=candidate.base,
                               note=f"{candidate.name}'s hyperparameters, {name}"))
    return found


def skipped_configurations(workspace: Workspace, configurations: Sequence[str] = OTHER_CONFIGURATIONS) -> dict[str, str]:
    """Why each of ``configurations`` is not a candidate (for the report)."""
    plans = workspace.load_plans()
    reasons = {}
    for name in configurations:
        entry = plans.get("configurations", {}).get(name)
        if entry is None:
            reasons[name] = "not planned by nnU-Net for this dataset"
        elif not (workspace.preprocessed_dataset / entry.get("data_identifier", "?")).is_dir():
            reasons[name] = "planned but not preprocessed"
    return reasons


def candidates_from_models(model_dirs: Sequence[Path], names: Optional[Sequence[str]] = None) -> list[Candidate]:
    """One candidate per model folder (its record's config and configuration; folds reused)."""
    from ..model import load_record

    chosen = []
    for index, model_dir in enumerate(model_dirs):
        model_dir = Path(model_dir)
        if not (model_dir / "plans.json").is_file():
            raise SelectionError(f"{model_dir}: not a model folder (no plans.json)")
        record = load_record(model_dir)
        configuration = record.get("configuration") or model_dir.name.rsplit("__", 1)[-1]
        name = names[index] if names else f"model{index + 1}"
        chosen.append(Candidate(name=name, config=TrialConfig.from_dict(record.get("config") or {}),
                                configuration=configuration, origin="model", source_dir=model_dir,
                                search_dice=record.get("mean_dice"), note=str(model_dir)))
    return chosen
