"""Cross-validation predictions: each fold's validation cases, predicted by that fold's checkpoint.

nnU-Net keeps these as ``fold_K/validation/<case>.npz`` (``--npz``: class probabilities on the
original image grid), ``<case>.pkl`` (the image properties) and ``<case>.nii.gz`` (the label map);
``nnUNetv2_find_best_configuration`` ensembles and evaluates them. The trainer of this project
validates in preprocessed space and keeps no probabilities, so this module predicts the validation
cases again from the raw images with the fold's checkpoint, through the project's
:class:`~AutoNNUNetLib.inference.Predictor` (the bounded path, whose labels are nnU-Net's), and
writes the same three files. That is the path a user's volumes take, so the cross-validation
scores exactly what inference does.

A fold is done when ``fold_K/validation/autonnunet_cv.json`` exists and names the current
checkpoint (its size and modification time) and TTA setting; a retrained fold is predicted again.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..files import atomic_write_json, read_json
from ..model import CHECKPOINT_NAME
from ..workspace import Workspace
from .layout import CV_MARKER, VALIDATION_DIR, SelectionError


@dataclass
class FoldPredictions:
    """What :func:`predict_fold_validation` did for one fold."""

    fold: int
    cases: list[str]
    seconds_per_case: float
    predicted: bool  # False: the marker was current, nothing was predicted


def validation_cases(workspace: Workspace, fold: int) -> list[str]:
    """The validation case ids of ``fold`` in the workspace's ``splits_final.json``."""
    path = workspace.preprocessed_dataset / "splits_final.json"
    if not path.is_file():
        raise SelectionError(f"{path}: missing (nnU-Net writes it when the first fold is trained)")
    splits = json.loads(path.read_text())
    if not 0 <= fold < len(splits):
        raise SelectionError(f"{path}: has {len(splits)} folds, fold {fold} requested")
    return sorted(splits[fold]["val"])


def _checkpoint_stamp(model_dir: Path, fold: int) -> dict[str, int]:
    stat = (Path(model_dir) / f"fold_{fold}" / CHECKPOINT_NAME).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fold_predictions_current(model_dir: Path, fold: int, use_mirroring: bool) -> Optional[dict]:
    """The fold's marker when its predictions match the current checkpoint, else None."""
    marker = Path(model_dir) / f"fold_{fold}" / VALIDATION_DIR / CV_MARKER
    if not marker.is_file() or not (Path(model_dir) / f"fold_{fold}" / CHECKPOINT_NAME).is_file():
        return None
    data = read_json(marker)
    if data.get("checkpoint") != _checkpoint_stamp(model_dir, fold) or data.get("use_mirroring") != use_mirroring:
        return None
    return data


def predict_fold_validation(workspace: Workspace, model_dir: Path, fold: int, *, device: Any = "cpu",
                            use_mirroring: bool = False, overwrite: bool = False) -> FoldPredictions:
    """Write ``fold_K/validation/<case>.npz|.pkl|<ending>`` for every validation case of ``fold``."""
    model_dir = Path(model_dir)
    cases = validation_cases(workspace, fold)
    current = None if overwrite else fold_predictions_current(model_dir, fold, use_mirroring)
    if current is not None and current.get("cases") == cases:
        return FoldPredictions(fold, cases, float(current.get("seconds_per_case", float("nan"))), False)

    from ..inference import Predictor

    predictor = Predictor(model_dir, folds=[fold], device=device, use_mirroring=use_mirroring)
    reader = predictor.nnunet_predictor.plans_manager.image_reader_writer_class()
    dataset_json = predictor.dataset_json
    ending = str(dataset_json.get("file_ending", ".nii.gz"))
    channels = len(dataset_json["channel_names"])
    images = workspace.raw_dataset / "imagesTr"
    out = model_dir / f"fold_{fold}" / VALIDATION_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / CV_MARKER).unlink(missing_ok=True)

    seconds = []
    for case in cases:
        files = [str(images / f"{case}_{c:04d}{ending}") for c in range(channels)]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise SelectionError(f"validation case {case}: {missing[0]} is missing")
        start = time.perf_counter()
        image, properties = reader.read_images(files)
        # The path inference takes (bounded memory); the probabilities stream from a memory map
        # into the compressed .npz, so a CT-sized case never holds classes x voxels in memory.
        scratch = out / f".{case}.probabilities.npy"
        try:
            segmentation = predictor.segment_array(image, properties, save_probabilities=scratch)
            seconds.append(time.perf_counter() - start)
            np.savez_compressed(out / f"{case}.npz", probabilities=np.load(scratch, mmap_mode="r"))
        finally:
            scratch.unlink(missing_ok=True)
        with open(out / f"{case}.pkl", "wb") as handle:
            pickle.dump(properties, handle)
        reader.write_seg(segmentation, str(out / f"{case}{ending}"), properties)

    per_case = float(np.mean(seconds)) if seconds else float("nan")
    atomic_write_json(out / CV_MARKER, {"fold": fold, "cases": cases, "use_mirroring": use_mirroring,
                                        "checkpoint": _checkpoint_stamp(model_dir, fold),
                                        "seconds_per_case": per_case, "written": time.time()})
    return FoldPredictions(fold, cases, per_case, True)


def read_label_map(path: Path) -> np.ndarray:
    """A label map as an integer array in SimpleITK order (z, y, x)."""
    import SimpleITK as sitk

    if not Path(path).is_file():
        raise SelectionError(f"{path}: missing")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def read_probabilities(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["probabilities"]
