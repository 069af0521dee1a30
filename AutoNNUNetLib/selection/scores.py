"""Dice as nnU-Net's evaluation computes it, so our decisions are the ones nnU-Net would take.

Per case and label: ``2 TP / (2 TP + FP + FN)``, NaN when the label is absent from both the
prediction and the reference. Per label: the mean over cases ignoring NaN. Foreground mean: the
plain mean of the per-label means (``compute_metrics_on_folder``'s ``foreground_mean``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label on one case (NaN where the label is in neither map)."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from the reference's {reference.shape}")
    scores: dict[int, float] = {}
    for label in labels:
        p = prediction == label
        r = reference == label
        tp = int(np.count_nonzero(p & r))
        fp = int(np.count_nonzero(p)) - tp
        fn = int(np.count_nonzero(r)) - tp
        scores[int(label)] = float("nan") if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)
    return scores


@dataclass
class CVScore:
    """Cross-validation Dice of one model or ensemble over a set of cases."""

    per_label: dict[int, float]
    foreground_mean: float
    per_case: dict[str, dict[int, float]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_cases(cls, per_case: Mapping[str, Mapping[int, float]], labels: Sequence[int]) -> "CVScore":
        per_label = {}
        for label in labels:
            values = [case[label] for case in per_case.values() if not math.isnan(case[label])]
            per_label[int(label)] = float(np.mean(values)) if values else float("nan")
        foreground = float(np.mean(list(per_label.values()))) if per_label else float("nan")
        return cls(per_label, foreground, {k: dict(v) for k, v in per_case.items()})

    def to_dict(self) -> dict:
        return {"per_label": {str(k): v for k, v in self.per_label.items()}, "foreground_mean": self.foreground_mean}


def score_cases(predictions: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray],
                labels: Sequence[int]) -> CVScore:
    """Score every case of ``references`` (each must have a prediction)."""
    missing = sorted(set(references) - set(predictions))
    if missing:
        raise ValueError(f"no prediction for case(s) {', '.join(missing[:5])}")
    per_case = {case: dice_per_label(predictions[case], references[case], labels) for case in sorted(references)}
    return CVScore.from_cases(per_case, labels)
