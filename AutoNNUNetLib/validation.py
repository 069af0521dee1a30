"""In-process validation of a trained fold: sliding-window prediction and per-class Dice.

nnU-Net's own validation resamples and exports through a spawned process pool (about 40 s for two
tiny cases on 2 CPU cores), far too slow per trial; this predicts each validation case in
preprocessed space and scores it there.

Logits are summed in float32. nnU-Net sums the sliding-window tiles in float16 and refuses the
result when a sum overflows ("Encountered inf in predicted array"), which a searched
configuration with large logits reaches: the trial crashed and PriorBand lost the point. Here
such a network is scored normally; one whose logits are NaN or infinite even in float32 has
diverged, and :class:`Diverged` says so, so the caller records it as Dice 0 with its reason.

The fold's scores are also written as ``fold_N/validation/summary.json`` in the shape nnU-Net's
evaluation writes, which stock ``nnUNetv2_export_model_to_zip`` expects in a model folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .files import atomic_write_text
from .workspace import STOCK_TRAINER


class Diverged(Exception):
    """The network's output is NaN or infinite: the run diverged (``reason`` says where)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Validation:
    """Per-class Dice of a fold (mean over its validation cases) and each case's scores."""

    dice_per_class: dict[str, float]
    labels: dict[str, int]  # class name -> label value
    cases: list[dict[str, Any]] = field(default_factory=list)  # {"case", "dice": {name: value}}


def dice_score(prediction: np.ndarray, truth: np.ndarray, label: int) -> float:
    p = prediction == label
    t = truth == label
    denominator = p.sum() + t.sum()
    if denominator == 0:
        return float("nan")  # class absent in both: no information, left out of the mean
    return float(2.0 * np.logical_and(p, t).sum() / denominator)


def sliding_window_logits(predictor, data):
    """Logits of one preprocessed case ``(c, x, y, z)`` by ``predictor``'s network, summed in float32.

    The same tiles, Gaussian weighting and mirroring as nnU-Net's
    ``predict_sliding_window_return_logits``; only the accumulation dtype differs.
    """
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    network = predictor.network.to(predictor.device).eval()
    patch = tuple(int(p) for p in predictor.configuration_manager.patch_size)
    with torch.inference_mode():
        padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
        slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
        out_device = predictor.device if predictor.perform_everything_on_device else torch.device("cpu")
        logits = torch.zeros((predictor.label_manager.num_segmentation_heads, *padded.shape[1:]),
                             dtype=torch.float32, device=out_device)
        weights = torch.zeros(padded.shape[1:], dtype=torch.float32, device=out_device)
        gaussian = (compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32,
                                     device=out_device) if predictor.use_gaussian else 1.0)
        for slicer in slicers:
            tile = padded[slicer][None].to(predictor.device)
            if predictor.device.type == "cuda":  # as nnU-Net: mixed precision inside the network
                with torch.autocast("cuda"):
                    prediction = network(tile)[0]
            else:
                prediction = network(tile)[0]
            prediction = prediction.to(out_device, torch.float32)
            logits[slicer] += prediction * gaussian
            weights[slicer[1:]] += gaussian
        logits /= weights
        del network
        return logits[(slice(None), *revert[1:])]


def validate_fold(trainer, max_cases: Optional[int] = None) -> Validation:
    """Score the fold's validation cases, predicted in-process in preprocessed space.

    Raises :class:`Diverged` when the network's logits are NaN or infinite.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    _, val_keys = trainer.do_split()
    val_keys = sorted(val_keys)[:max_cases] if max_cases else sorted(val_keys)
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys)
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=trainer.device.type == "cuda", device=trainer.device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, STOCK_TRAINER, trainer.inference_allowed_mirroring_axes)
    labels = trainer.label_manager.foreground_labels
    names = {int(v): k for k, v in trainer.dataset_json["labels"].items() if isinstance(v, int)}
    per_class: dict[str, list[float]] = {names.get(l, str(l)): [] for l in labels}
    cases = []
    try:
        with torch.no_grad():
            for key in val_keys:
                data, seg, _, _ = dataset.load_case(key)
                logits = sliding_window_logits(predictor, torch.from_numpy(np.asarray(data)))
                if not bool(torch.isfinite(logits).all()):
                    raise Diverged(f"the network's output is NaN or infinite on validation case {key}")
                prediction = logits.argmax(0).cpu().numpy()
                truth = np.asarray(seg)[0]
                scores = {}
                for label in labels:
                    name = names.get(label, str(label))
                    scores[name] = dice_score(prediction, truth, label)
                    if not math.isnan(scores[name]):
                        per_class[name].append(scores[name])
                cases.append({"case": key, "dice": scores})
    finally:
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    return Validation({name: (float(np.mean(s)) if s else float("nan")) for name, s in per_class.items()},
                      {names.get(l, str(l)): int(l) for l in labels}, cases)


def _number(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


def write_summary(fold_dir: Path, validation: Validation, diverged: Optional[str] = None) -> Path:
    """``fold_dir/validation/summary.json`` in the shape of nnU-Net's evaluation summary
    (``mean``/``metric_per_case`` keyed by label value, ``foreground_mean``), Dice only."""
    by_value = {str(validation.labels[name]): {"Dice": _number(score)}
                for name, score in validation.dice_per_class.items()}
    scores = [s for s in validation.dice_per_class.values() if math.isfinite(s)]
    summary = {
        "foreground_mean": {"Dice": float(np.mean(scores)) if scores else None},
        "mean": by_value,
        "metric_per_case": [
            {"reference_file": case["case"],
             "metrics": {str(validation.labels[n]): {"Dice": _number(v)} for n, v in case["dice"].items()}}
            for case in validation.cases
        ],
        "note": "AutoNNUNet in-process validation in preprocessed space (Dice only)",
    }
    if diverged:
        summary["diverged"] = diverged
    path = Path(fold_dir) / "validation" / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(summary, indent=2))
