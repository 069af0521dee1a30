"""Cross-validation predictions: each fold's validation cases, predicted by that fold's checkpoint.

nnU-Net keeps these as ``fold_K/validation/<case>.npz`` (``--npz``: class probabilities on the
original image grid), ``<case>.pkl`` (the image properties) and ``<case>.nii.gz`` (the label map);
``nnUNetv2_find_best_configuration`` ensembles and evaluates them. The trainer of this project
validates in preprocessed space and keeps no probabilities, so this module predicts the validation
cases again from the raw images, through nnU-Net's predictor with the fold's checkpoint, and
writes the same three files. Predicting from the raw images is also what inference does, so the
cross-validation scores the exact path a user's volumes take.

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


def predict_probabilities(nnunet_predictor: Any, image: np.ndarray, properties: dict,
                          probabilities: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Label map and class probabilities of one image on its own grid (nnU-Net's in-memory path).

    ``image`` is ``(channels, z, y, x)`` as nnU-Net's SimpleITK reader returns it; ``properties``
    needs ``spacing`` in that array order. The folds loaded into the predictor are averaged (on
    logits, as ``nnUNetv2_predict`` does), then softmax, resampling and un-cropping follow. These
    are the steps of nnU-Net's ``predict_single_npy_array``, except that the export keeps the
    process's thread count (nnU-Net's default of 8 threads oversubscribes small machines).
    With ``probabilities=False`` the label map comes from the logits, as without
    ``--save_probabilities``.
    """
    import copy

    import torch
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    p = nnunet_predictor
    adapter = PreprocessAdapterFromNpy([image], [None], [copy.deepcopy(properties)], [None], p.plans_manager,
                                       p.dataset_json, p.configuration_manager, num_threads_in_multithreaded=1,
                                       verbose=False)
    item = next(adapter)
    logits = p.predict_logits_from_preprocessed_data(item["data"]).cpu()
    result = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, p.plans_manager, p.configuration_manager, p.label_manager, item["data_properties"],
        return_probabilities=probabilities, num_threads_torch=torch.get_num_threads())
    if probabilities:
        return np.asarray(result[0]), np.asarray(result[1], dtype=np.float32)
    return np.asarray(result), None


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
    nnunet = predictor.nnunet_predictor
    reader = nnunet.plans_manager.image_reader_writer_class()
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
        segmentation, probabilities = predict_probabilities(nnunet, image, properties)
        seconds.append(time.perf_counter() - start)
        np.savez_compressed(out / f"{case}.npz", probabilities=probabilities)
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
