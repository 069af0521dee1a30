"""The selection: best single model or pairwise ensemble on the cross-validation, then postprocessing.

As ``nnUNetv2_find_best_configuration``: every finalized candidate is scored on its 5-fold
cross-validation predictions (each case predicted by the fold that did not train on it), every
pair of candidates as an ensemble of their averaged probabilities, and the highest foreground-mean
Dice wins (ties go to the earlier entry; single models come first, being the simpler choice).
Postprocessing is then decided on the winner's cross-validation predictions
(:mod:`.postprocessing`). The decision is written as nnU-Net's files (:func:`write_selection`)
and as ``selection.json``, which :class:`~AutoNNUNetLib.selection.predictor.Selection` loads.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..files import atomic_write_json, read_json
from ..workspace import Workspace
from .crossval import fold_predictions_current, read_label_map, read_probabilities
from .ensemble import average_probabilities, labels_from_probabilities
from .finalize import FinalizedCandidate, FinalizeResult, load_finalized
from .instructions import write_inference_files
from .layout import (FINALIZE_RECORD, SELECTION_RECORD, VALIDATION_DIR, SelectionError, crossval_folder, dataset_results,
                     ensemble_folder)
from .postprocessing import PostprocessingPlan, decide_postprocessing
from .scores import CVScore, score_cases


@dataclass
class ModelScore:
    """Cross-validation Dice of one candidate or one ensemble of candidates."""

    key: str  # nnU-Net's identifier: the model folder name, or ensemble___<a>___<b>___<folds>
    members: list[str]  # candidate names
    score: CVScore

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "members": self.members, **self.score.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelScore":
        return cls(data["key"], list(data["members"]), CVScore({int(k): v for k, v in data["per_label"].items()},
                                                               float(data["foreground_mean"])))


@dataclass
class SelectionResult:
    """What ``selection.json`` holds."""

    root: Path
    dataset: str
    folds: list[int]
    use_mirroring: bool
    labels: dict[int, str]  # foreground label -> class name
    members: list[dict[str, Any]]  # name, folder_name, configuration, plans_identifier, model_dir (relative)
    scores: list[ModelScore]
    best: str
    postprocessing: PostprocessingPlan
    postprocessing_file: str  # relative to root
    seconds_per_case: dict[str, float] = field(default_factory=dict)  # candidate -> one fold, one case
    notes: list[str] = field(default_factory=list)

    def score(self, key: str) -> Optional[ModelScore]:
        return next((s for s in self.scores if s.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "folds": self.folds, "use_mirroring": self.use_mirroring,
                "labels": {str(k): v for k, v in self.labels.items()}, "members": self.members,
                "scores": [s.to_dict() for s in self.scores], "best": self.best,
                "postprocessing": self.postprocessing.to_dict(), "postprocessing_file": self.postprocessing_file,
                "seconds_per_case": self.seconds_per_case, "notes": self.notes}

    @classmethod
    def load(cls, root: Path) -> "SelectionResult":
        root = Path(root)
        data = read_json(root / SELECTION_RECORD)
        if not data:
            raise SelectionError(f"{root / SELECTION_RECORD}: missing; run `autonnunet select {root}` first")
        return cls(root, data["dataset"], [int(f) for f in data["folds"]], bool(data["use_mirroring"]),
                   {int(k): v for k, v in data["labels"].items()}, list(data["members"]),
                   [ModelScore.from_dict(s) for s in data["scores"]], data["best"],
                   PostprocessingPlan.from_dict(data.get("postprocessing")), data["postprocessing_file"],
                   dict(data.get("seconds_per_case", {})), list(data.get("notes", [])))


def foreground_labels(dataset_json: dict) -> dict[int, str]:
    """Foreground label value -> class name (regions and the ignore label are not supported)."""
    labels = {}
    for name, value in dataset_json["labels"].items():
        if isinstance(value, (list, tuple)):
            raise SelectionError("region-based datasets are not supported by the selection")
        if int(value) != 0 and name != "ignore":
            labels[int(value)] = name
    return labels


def _cases_by_fold(finalized: FinalizedCandidate, folds: Sequence[int], use_mirroring: bool) -> Optional[dict[str, int]]:
    """case -> fold of the candidate's cross-validation predictions; None if a fold is missing."""
    cases = {}
    for fold in folds:
        marker = fold_predictions_current(finalized.model_dir, fold, use_mirroring)
        if marker is None:
            return None
        cases.update({case: fold for case in marker["cases"]})
    return cases


def _validation_file(finalized: FinalizedCandidate, fold: int, case: str, suffix: str) -> Path:
    return finalized.model_dir / f"fold_{fold}" / VALIDATION_DIR / f"{case}{suffix}"


def _ensemble_segmentations(members: Sequence[FinalizedCandidate], cases: dict[str, int]) -> dict[str, np.ndarray]:
    return {case: labels_from_probabilities(average_probabilities(
        read_probabilities(_validation_file(m, fold, case, ".npz")) for m in members)) for case, fold in cases.items()}


def select(root: Path, allow_ensembles: bool = True, write: bool = True) -> SelectionResult:
    """Score the candidates and pairwise ensembles of a finalized root; choose; decide postprocessing."""
    finalized = load_finalized(root)
    record = read_json(Path(root) / FINALIZE_RECORD) or {}
    workspace = Workspace(Path(record["workspace"]), finalized.dataset)
    folds = finalized.folds
    notes = []
    complete, case_folds = [], None
    for entry in finalized.candidates:
        cases = _cases_by_fold(entry, folds, finalized.use_mirroring)
        if cases is None:
            notes.append(f"{entry.candidate.name}: not all of folds {folds} are finalized; left out")
            continue
        if case_folds is not None and set(cases) != set(case_folds):
            notes.append(f"{entry.candidate.name}: validation cases differ from the others; left out")
            continue
        case_folds = case_folds or cases
        complete.append(entry)
    if not complete:
        raise SelectionError(f"{root}: no candidate has cross-validation predictions on all folds {folds}")

    dataset_json = read_json(complete[0].model_dir / "dataset.json") or workspace.load_dataset_json()
    labels = foreground_labels(dataset_json)
    ending = str(dataset_json.get("file_ending", ".nii.gz"))
    gt = workspace.preprocessed_dataset / "gt_segmentations"
    references = {case: read_label_map(gt / f"{case}{ending}") for case in case_folds}

    scores: list[ModelScore] = []
    for entry in complete:
        predictions = {case: read_label_map(_validation_file(entry, fold, case, ending))
                       for case, fold in case_folds.items()}
        scores.append(ModelScore(entry.candidate.folder_name, [entry.candidate.name],
                                 score_cases(predictions, references, list(labels))))
    if allow_ensembles:
        for a, b in itertools.combinations(complete, 2):
            segmentations = _ensemble_segmentations([a, b], case_folds)
            key = ensemble_folder(Path(), [a.candidate.folder_name, b.candidate.folder_name], folds).name
            scores.append(ModelScore(key, [a.candidate.name, b.candidate.name],
                                     score_cases(segmentations, references, list(labels))))
    best = max(scores, key=lambda s: s.score.foreground_mean)  # max keeps the first of equals
    by_name = {e.candidate.name: e for e in complete}
    members = [by_name[name] for name in best.members]
    if len(members) == 1:
        best_predictions = {case: read_label_map(_validation_file(members[0], fold, case, ending))
                            for case, fold in case_folds.items()}
    else:
        best_predictions = _ensemble_segmentations(members, case_folds)
    plan = decide_postprocessing(best_predictions, references, list(labels), best.score)
    seconds = {e.candidate.name: float(np.nanmean([e.folds.get(f, {}).get("cv_seconds_per_case", np.nan)
                                                   for f in folds])) for e in complete}
    return write_selection(finalized, [m.candidate.name for m in members], plan, scores=scores, labels=labels,
                           seconds_per_case=seconds, notes=notes, write=write)


def write_selection(finalized: FinalizeResult, member_names: Sequence[str], postprocessing: PostprocessingPlan, *,
                    scores: Sequence[ModelScore] = (), labels: Optional[dict[int, str]] = None,
                    seconds_per_case: Optional[dict[str, float]] = None, notes: Sequence[str] = (),
                    write: bool = True) -> SelectionResult:
    """Write nnU-Net's files and ``selection.json`` for a chosen set of members and postprocessing.

    :func:`select` calls this with its decision; tests call it with a forced ensemble.
    """
    root = Path(finalized.root)
    results = dataset_results(root, finalized.dataset)
    by_name = {e.candidate.name: e for e in finalized.candidates}
    unknown = [n for n in member_names if n not in by_name]
    if unknown or not member_names:
        raise SelectionError(f"unknown ensemble member(s) {unknown or member_names}; candidates: {', '.join(by_name)}")
    entries = [by_name[n] for n in member_names]
    members = [{"name": e.candidate.name, "folder_name": e.candidate.folder_name,
                "configuration": e.candidate.configuration, "plans_identifier": e.candidate.plans_identifier,
                "model_dir": str(e.model_dir.relative_to(root))} for e in entries]
    if len(entries) == 1:
        source = crossval_folder(entries[0].model_dir, finalized.folds)
        key = entries[0].candidate.folder_name
    else:
        source = ensemble_folder(results, [e.candidate.folder_name for e in entries], finalized.folds)
        key = source.name
    if labels is None:
        labels = foreground_labels(read_json(entries[0].model_dir / "dataset.json"))
    if write:
        source.mkdir(parents=True, exist_ok=True)
        for name in ("plans.json", "dataset.json"):
            shutil.copy2(entries[0].model_dir / name, source / name)
        pkl = postprocessing.write(source)
        considered = [{"configuration": e.candidate.configuration, "plans_identifier": e.candidate.plans_identifier}
                      for e in finalized.candidates]
        write_inference_files(results, finalized.dataset, members, finalized.folds, considered,
                              {s.key: s.score.foreground_mean for s in scores}, postprocessing.dice_before,
                              postprocessing.dice_after, pkl.resolve(), (source / "plans.json").resolve(),
                              finalized.use_mirroring)
    result = SelectionResult(root, finalized.dataset, list(finalized.folds), finalized.use_mirroring, labels, members,
                             list(scores), key, postprocessing,
                             str((source / "postprocessing.pkl").relative_to(root)),
                             dict(seconds_per_case or {}), list(notes))
    if write:
        atomic_write_json(root / SELECTION_RECORD, result.to_dict())
    return result
