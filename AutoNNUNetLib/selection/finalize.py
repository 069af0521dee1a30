"""Finalize: train every candidate on all folds to the final length F, resumably.

For each candidate and fold, in this order of preference:

1. ``kept``: the fold's checkpoint in the selection root already holds F epochs of this
   configuration (a re-run after a kill lands here for every fold that had finished);
2. ``reused``: the candidate's source model folder (the search's trial, a given model) has the
   fold at F epochs of the same configuration and iterations per epoch: the checkpoint is copied;
3. ``resumed``: the source has the fold at fewer epochs of an F-epoch schedule: training
   continues from it (the learning-rate schedule makes that exact);
4. ``trained``: trained from scratch.

The trainer writes a checkpoint only when a fold is complete, so a fold killed half-way has no
checkpoint and is trained again; the others are not. After its checkpoint, each fold's validation
cases are predicted with it (:mod:`.crossval`), which is what the selection is decided on.
``finalize.json`` records the request and what each fold did; a re-run with another F or another
number of iterations per epoch is refused (it would mix trainings of different lengths).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..events import ProgressCallback, ProgressEvent
from ..files import atomic_write_json, file_lock, read_json
from ..folds import ALL_FOLDS
from ..model import CHECKPOINT_NAME, RECORD_NAME
from ..workspace import Workspace
from .candidates import Candidate
from .crossval import predict_fold_validation
from .layout import FINALIZE_RECORD, SelectionError, dataset_results

#: Key of our metadata inside checkpoints (see trainer.py).
CHECKPOINT_META_KEY = "autonnunet"
MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")


@dataclass
class FinalizedCandidate:
    candidate: Candidate
    model_dir: Path
    folds: dict[int, dict[str, Any]] = field(default_factory=dict)  # fold -> action, epochs, seconds


@dataclass
class FinalizeResult:
    root: Path
    dataset: str
    epochs: int
    iterations_per_epoch: int
    folds: list[int]
    use_mirroring: bool
    candidates: list[FinalizedCandidate]
    #: (candidate name, fold) -> action of this call: kept / reused / resumed / trained
    actions: dict[tuple[str, int], str] = field(default_factory=dict)

    def trained(self) -> list[tuple[str, int]]:
        """Folds this call trained (from scratch or resumed)."""
        return [key for key, action in self.actions.items() if action in ("trained", "resumed")]


def checkpoint_meta(path: Path) -> Optional[dict]:
    """Epochs, schedule length, config and iterations of a checkpoint; None if it is not ours."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    meta = checkpoint.get(CHECKPOINT_META_KEY) if isinstance(checkpoint, dict) else None
    if meta is None:
        return None
    config = dict(meta.get("config") or {})
    # Checkpoints from before the configuration was a TrialConfig field: nnU-Net's own record of it.
    config.setdefault("configuration", (checkpoint.get("init_args") or {}).get("configuration") or "3d_fullres")
    return {**meta, "config": config, "epoch": int(checkpoint.get("current_epoch", 0))}


def _matches(meta: Optional[dict], candidate: Candidate, epochs: int, iterations: int) -> str:
    """How a checkpoint relates to the wanted training: done / prefix / other."""
    from ..config import TrialConfig

    if meta is None:
        return "other"
    same = (TrialConfig.from_dict(meta["config"]) == candidate.config
            and int(meta.get("iterations_per_epoch", -1)) == iterations and int(meta["max_epochs"]) == epochs)
    if not same:
        return "other"
    return "done" if meta["epoch"] >= epochs else "prefix"


def _check_request(root: Path, record: Optional[dict], epochs: int, iterations: int, dataset: str) -> None:
    if not record:
        return
    previous = (record.get("epochs"), record.get("iterations_per_epoch"), record.get("dataset"))
    if previous != (epochs, iterations, dataset):
        raise SelectionError(
            f"{root / FINALIZE_RECORD}: finalized with {previous[0]} epochs x {previous[1]} iterations on "
            f"{previous[2]}; this run asks {epochs} x {iterations} on {dataset} (use another --output)")


def _merge_candidates(record: Optional[dict], candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates of earlier runs plus new ones; a name may not change its meaning."""
    known = {c["name"]: Candidate.from_dict(c) for c in (record or {}).get("candidates", [])}
    for candidate in candidates:
        old = known.get(candidate.name)
        if old is not None and (old.config != candidate.config or old.configuration != candidate.configuration):
            raise SelectionError(f"candidate {candidate.name!r} was finalized with another configuration; "
                                 f"rename it or use another --output")
        known[candidate.name] = candidate
    return list(known.values())


def _copy_model_files(source: Path, model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (source / name).is_file() and not (model_dir / name).is_file():
            shutil.copy2(source / name, model_dir / name)


def _finalize_fold(workspace: Workspace, candidate: Candidate, model_dir: Path, fold: int, *, epochs: int,
                   iterations: int, device: Any, seed: Optional[int], progress: Optional[ProgressCallback],
                   max_validation_cases: Optional[int]) -> dict[str, Any]:
    from ..trainer import train

    target = model_dir / f"fold_{fold}" / CHECKPOINT_NAME
    if target.is_file():
        if _matches(checkpoint_meta(target), candidate, epochs, iterations) == "done":
            return {"action": "kept", "epochs": epochs}
        shutil.rmtree(target.parent)  # another length or configuration: not ours to continue
    resume_from = None
    source = candidate.source_dir
    source_checkpoint = source / f"fold_{fold}" / CHECKPOINT_NAME if source else None
    if source_checkpoint is not None and source_checkpoint.is_file():
        meta = checkpoint_meta(source_checkpoint)
        relation = _matches(meta, candidate, epochs, iterations)
        if relation == "done" or (meta is None and candidate.origin == "model"):
            # A stock nnU-Net model carries no metadata: a given model folder is taken as it is.
            _copy_model_files(source, model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source_checkpoint, target.with_suffix(".tmp"))
            target.with_suffix(".tmp").replace(target)
            return {"action": "reused", "epochs": meta["epoch"] if meta else None, "source": str(source)}
        if relation == "prefix":
            resume_from = source
    start = time.perf_counter()
    result = train(workspace, candidate.config, model_dir, folds=[fold], epochs=epochs, max_epochs=epochs,
                   iterations_per_epoch=iterations, resume_from=resume_from, device=device, seed=seed,
                   progress=progress, configuration=candidate.configuration,
                   max_validation_cases=max_validation_cases)
    return {"action": "resumed" if resume_from else "trained", "epochs": result.epochs,
            "train_seconds": result.train_seconds, "seconds": time.perf_counter() - start}


def _write_model_record(workspace: Workspace, finalized: FinalizedCandidate, epochs: int, iterations: int) -> None:
    """Our record of the model folder, over all its folds (``train`` writes one per call)."""
    candidate = finalized.candidate
    atomic_write_json(finalized.model_dir / RECORD_NAME, {
        "kind": "autonnunet-model", "dataset": workspace.require_dataset(), "configuration": candidate.configuration,
        "config": candidate.config.to_dict(), "epochs": epochs, "max_epochs": epochs,
        "iterations_per_epoch": iterations, "folds": [{"fold": f, **v} for f, v in sorted(finalized.folds.items())],
        "train_seconds": sum(v.get("train_seconds") or 0.0 for v in finalized.folds.values()),
        "model_dir": str(finalized.model_dir), "candidate": candidate.name})


def finalize(workspace: Workspace, candidates: Sequence[Candidate], root: Path, *, epochs: int,
             iterations_per_epoch: int = 250, folds: Sequence[int] = ALL_FOLDS, device: Any = "auto",
             seed: Optional[int] = 0, use_mirroring: bool = False, progress: Optional[ProgressCallback] = None,
             max_validation_cases: Optional[int] = 1) -> FinalizeResult:
    """Train ``candidates`` on ``folds`` to ``epochs`` under ``root`` and predict their validation cases.

    Args:
        max_validation_cases: cases the trainer's own quick validation looks at; the real
            cross-validation is predicted afterwards on every validation case.
        use_mirroring: test-time mirroring for the cross-validation predictions (nnU-Net's
            default; the selection then predicts with it too). Off is 2**axes times faster.
    """
    from filelock import Timeout

    if not candidates:
        raise SelectionError("no candidates to finalize")
    if epochs < 1 or iterations_per_epoch < 1:
        raise SelectionError(f"epochs and iterations per epoch must be >= 1, got {epochs} and {iterations_per_epoch}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dataset = workspace.require_dataset()
    folds = sorted({int(f) for f in folds})
    emit = progress or (lambda event: None)
    try:
        with file_lock(root / ".finalize.lock", timeout=0):
            record = read_json(root / FINALIZE_RECORD)
            _check_request(root, record, epochs, iterations_per_epoch, dataset)
            all_candidates = _merge_candidates(record, candidates)
            old_folds = {c["name"]: {int(k): v for k, v in c.get("folds", {}).items()}
                         for c in (record or {}).get("candidates", [])}
            result = FinalizeResult(root, dataset, epochs, iterations_per_epoch, folds, use_mirroring, [
                FinalizedCandidate(c, dataset_results(root, dataset) / c.folder_name, dict(old_folds.get(c.name, {})))
                for c in all_candidates])

            def save() -> None:
                atomic_write_json(root / FINALIZE_RECORD, {
                    "dataset": dataset, "epochs": epochs, "iterations_per_epoch": iterations_per_epoch,
                    "folds": sorted(set(folds) | set((record or {}).get("folds", []))),
                    "use_mirroring": use_mirroring, "workspace": str(workspace.root),
                    "candidates": [{**f.candidate.to_dict(), "folds": {str(k): v for k, v in f.folds.items()}}
                                   for f in result.candidates]})

            wanted = {c.name for c in candidates}
            total = len(wanted) * len(folds)
            done = 0
            for finalized in result.candidates:
                if finalized.candidate.name not in wanted:
                    continue
                for fold in folds:
                    emit(ProgressEvent("stage", {"name": "finalize", "message":
                                                 f"{finalized.candidate.name} fold {fold}"}))
                    entry = _finalize_fold(workspace, finalized.candidate, finalized.model_dir, fold, epochs=epochs,
                                           iterations=iterations_per_epoch, device=device, seed=seed,
                                           progress=progress, max_validation_cases=max_validation_cases)
                    if entry["action"] == "kept" and fold in finalized.folds:
                        entry = {**finalized.folds[fold], "action": "kept"}
                    cv = predict_fold_validation(workspace, finalized.model_dir, fold, device=device,
                                                 use_mirroring=use_mirroring)
                    entry["cv_seconds_per_case"] = cv.seconds_per_case
                    entry["cv_cases"] = len(cv.cases)
                    finalized.folds[fold] = entry
                    result.actions[(finalized.candidate.name, fold)] = entry["action"]
                    save()
                    done += 1
                    emit(ProgressEvent("progress", {"fraction": done / total, "message":
                                                    f"{finalized.candidate.name} fold {fold}: {entry['action']}"}))
                _write_model_record(workspace, finalized, epochs, iterations_per_epoch)
            save()
            return result
    except Timeout:
        raise SelectionError(f"{root}: another finalize is running on this folder") from None


def load_finalized(root: Path) -> FinalizeResult:
    """The state of a selection root as ``finalize.json`` records it."""
    root = Path(root)
    record = read_json(root / FINALIZE_RECORD)
    if not record:
        raise SelectionError(f"{root / FINALIZE_RECORD}: missing; run `autonnunet finalize` first")
    candidates = []
    for data in record["candidates"]:
        candidate = Candidate.from_dict(data)
        candidates.append(FinalizedCandidate(candidate, dataset_results(root, record["dataset"]) / candidate.folder_name,
                                             {int(k): v for k, v in data.get("folds", {}).items()}))
    return FinalizeResult(root, record["dataset"], int(record["epochs"]), int(record["iterations_per_epoch"]),
                          [int(f) for f in record["folds"]], bool(record.get("use_mirroring", False)), candidates)
