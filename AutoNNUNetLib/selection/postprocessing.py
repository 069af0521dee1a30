"""Largest-connected-component postprocessing, decided on the cross-validation as nnU-Net does.

Two kinds of step, tried in nnU-Net's order (``determine_postprocessing``):

1. All foreground together: the union of all foreground labels keeps only its largest component
   (everything else becomes background). Kept when the foreground-mean Dice improves and no
   single label gets worse.
2. Then, with more than one foreground label, each label on its own (on top of the steps kept so
   far): kept when that label's Dice improves.

"Improves" is strict, so a structure that really has two parts (the second part is lost) or
predictions without stray blobs (nothing changes) keep no step. Components are connected through
faces, edges and corners (full connectivity, as nnU-Net's ``remove_all_but_largest_component``);
when several components share the largest size, all of them are kept, as there.

The decision is written as nnU-Net's ``postprocessing.pkl``: a pickled ``(functions, kwargs)``
pair naming nnU-Net's own function, so ``nnUNetv2_apply_postprocessing`` applies it. In memory we
apply our own implementation (tests check both give the same label maps).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ..files import atomic_write_json
from .scores import CVScore, score_cases

Target = Union[int, tuple[int, ...]]  # one label, or several treated as one mask


def keep_largest_component(segmentation: np.ndarray, labels: Union[int, Sequence[int]],
                           background: int = 0) -> np.ndarray:
    """A copy of ``segmentation`` where the mask of ``labels`` keeps only its largest component(s)."""
    from scipy import ndimage

    wanted = [int(labels)] if np.isscalar(labels) else [int(v) for v in labels]
    mask = np.isin(segmentation, wanted)
    result = np.array(segmentation, copy=True)
    if not mask.any():
        return result
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    sizes = np.bincount(components.ravel())[1:]
    keep_ids = np.flatnonzero(sizes == sizes.max()) + 1
    result[mask & ~np.isin(components, keep_ids)] = background
    return result


@dataclass
class PostprocessingStep:
    """One tried step: which labels, the Dice it was judged on, and whether it was kept."""

    target: Target
    kind: str  # "all_foreground" or "label"
    before: dict[int, float]
    after: dict[int, float]
    foreground_before: float
    foreground_after: float
    kept: bool

    def to_dict(self) -> dict:
        return {"target": list(self.target) if isinstance(self.target, tuple) else self.target, "kind": self.kind,
                "before": {str(k): v for k, v in self.before.items()},
                "after": {str(k): v for k, v in self.after.items()},
                "foreground_before": self.foreground_before, "foreground_after": self.foreground_after,
                "kept": self.kept}

    @classmethod
    def from_dict(cls, data: dict) -> "PostprocessingStep":
        target = tuple(data["target"]) if isinstance(data["target"], list) else int(data["target"])
        return cls(target, data["kind"], {int(k): v for k, v in data["before"].items()},
                   {int(k): v for k, v in data["after"].items()}, data["foreground_before"],
                   data["foreground_after"], bool(data["kept"]))


@dataclass
class PostprocessingPlan:
    """The steps tried on the cross-validation; :attr:`kept` are applied at inference."""

    steps: list[PostprocessingStep] = field(default_factory=list)
    dice_before: float = float("nan")
    dice_after: float = float("nan")

    @property
    def kept(self) -> list[PostprocessingStep]:
        return [s for s in self.steps if s.kept]

    def apply(self, segmentation: np.ndarray) -> np.ndarray:
        for step in self.kept:
            segmentation = keep_largest_component(segmentation, step.target)
        return segmentation

    def nnunet_functions(self) -> tuple[list, list[dict]]:
        """The ``(pp_fns, pp_fn_kwargs)`` pair nnU-Net pickles, naming nnU-Net's own function."""
        from nnunetv2.postprocessing.remove_connected_components import (
            remove_all_but_largest_component_from_segmentation,
        )

        kwargs = [{"labels_or_regions": list(s.target) if isinstance(s.target, tuple) else int(s.target)}
                  for s in self.kept]
        return [remove_all_but_largest_component_from_segmentation] * len(kwargs), kwargs

    def write(self, folder: Path) -> Path:
        """Write ``postprocessing.pkl`` (for nnU-Net) and ``postprocessing.json`` (readable) into ``folder``."""
        from .layout import POSTPROCESSING_JSON, POSTPROCESSING_PKL

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / POSTPROCESSING_PKL
        tmp = path.with_suffix(".pkl.tmp")
        with open(tmp, "wb") as handle:
            pickle.dump(self.nnunet_functions(), handle)
        tmp.replace(path)
        fns, kwargs = self.nnunet_functions()
        atomic_write_json(folder / POSTPROCESSING_JSON, {
            "postprocessing_fns": [f.__name__ for f in fns], "postprocessing_kwargs": kwargs,
            "dice_before": self.dice_before, "dice_after": self.dice_after,
            "steps": [s.to_dict() for s in self.steps]})
        return path

    def to_dict(self) -> dict:
        return {"steps": [s.to_dict() for s in self.steps], "dice_before": self.dice_before,
                "dice_after": self.dice_after}

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "PostprocessingPlan":
        if not data:
            return cls()
        return cls([PostprocessingStep.from_dict(s) for s in data.get("steps", [])],
                   data.get("dice_before", float("nan")), data.get("dice_after", float("nan")))


def decide_postprocessing(predictions: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray],
                          labels: Sequence[int], baseline: Optional[CVScore] = None) -> PostprocessingPlan:
    """Try nnU-Net's steps on the cross-validation predictions; keep those that improve Dice."""
    labels = [int(l) for l in labels]
    current = dict(predictions)
    score = baseline or score_cases(current, references, labels)
    plan = PostprocessingPlan(dice_before=score.foreground_mean)

    candidate = {case: keep_largest_component(seg, labels) for case, seg in current.items()}
    after = score_cases(candidate, references, labels)
    kept = after.foreground_mean > score.foreground_mean and not any(
        after.per_label[l] < score.per_label[l] for l in labels)
    plan.steps.append(PostprocessingStep(tuple(labels), "all_foreground", score.per_label, after.per_label,
                                         score.foreground_mean, after.foreground_mean, kept))
    if kept:
        current, score = candidate, after

    if len(labels) > 1:
        for label in labels:
            candidate = {case: keep_largest_component(seg, label) for case, seg in current.items()}
            after = score_cases(candidate, references, labels)
            kept = after.per_label[label] > score.per_label[label]
            plan.steps.append(PostprocessingStep(label, "label", score.per_label, after.per_label,
                                                 score.foreground_mean, after.foreground_mean, kept))
            if kept:
                current, score = candidate, after
    plan.dice_after = score.foreground_mean
    return plan
