"""Predict with a selection in memory: one model or an ensemble, its folds, its postprocessing.

:class:`Selection` loads ``selection.json`` and builds one
:class:`~AutoNNUNetLib.inference.Predictor` per member (the folds of a member are averaged by
nnU-Net's predictor, on logits, as ``nnUNetv2_predict`` does). One member: its label map. Several:
their class probabilities (as ``nnUNetv2_predict --save_probabilities`` computes them) averaged
in member order, arg max (as ``nnUNetv2_ensemble``). Then the kept postprocessing steps. The
label maps are the ones the stock commands of ``inference_instructions.txt`` write (tested).

The per-member probabilities go through nnU-Net's predictor directly
(``predict_single_npy_array``): the project's Predictor returns label maps only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..imaging import Volume
from .choose import SelectionResult
from .crossval import predict_probabilities
from .ensemble import average_probabilities, labels_from_probabilities
from .layout import SelectionError


class Selection:
    """A finalized selection, loaded once, ready to segment many volumes.

    Args:
        root: the selection root (``autonnunet finalize --output``, after ``autonnunet select``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        folds: folds of every member to use (default: the selection's folds).
        members: a subset of the ensemble members by name (default: all).
        use_mirroring: test-time mirroring (default: what the cross-validation used).
        postprocess: apply the selected postprocessing (default True).
        result: a decision in memory instead of ``selection.json`` (e.g. from
            :func:`~AutoNNUNetLib.selection.choose.write_selection` with ``write=False``).
    """

    def __init__(self, root: Union[str, Path], device: Any = "auto", folds: Optional[Sequence[int]] = None,
                 members: Optional[Sequence[str]] = None, use_mirroring: Optional[bool] = None,
                 postprocess: bool = True, result: Optional[SelectionResult] = None) -> None:
        from ..inference import Predictor

        self.root = Path(root)
        self.result = result if result is not None else SelectionResult.load(self.root)
        self.folds = list(folds) if folds is not None else list(self.result.folds)
        chosen = [m for m in self.result.members if members is None or m["name"] in members]
        if not chosen:
            names = ", ".join(m["name"] for m in self.result.members)
            raise SelectionError(f"none of {list(members or [])} is a member of this selection ({names})")
        self.members = chosen
        self.use_mirroring = self.result.use_mirroring if use_mirroring is None else bool(use_mirroring)
        self.postprocessing = self.result.postprocessing if postprocess else None
        self.predictors = [Predictor(self.root / m["model_dir"], folds=self.folds, device=device,
                                     use_mirroring=self.use_mirroring) for m in chosen]
        self.last_seconds = float("nan")

    @property
    def is_ensemble(self) -> bool:
        return len(self.predictors) > 1

    def _image(self, channels: Sequence[Volume]) -> tuple[np.ndarray, dict]:
        expected = len(self.predictors[0].channel_names)
        if len(channels) != expected:
            raise SelectionError(f"the selection expects {expected} channel(s), got {len(channels)}")
        first = channels[0]
        if first.array.ndim != 3 or any(c.array.shape != first.array.shape for c in channels):
            raise SelectionError("give one 3D volume per channel, all of the same shape")
        image = np.stack([np.asarray(c.array) for c in channels]).astype(np.float32, copy=False)
        if not np.all(np.isfinite(image)):
            raise SelectionError("the input contains NaN or infinite values")
        return image, {"spacing": [abs(float(s)) for s in first.geometry.spacing[::-1]]}

    def predict_labels(self, channels: Sequence[Volume]) -> np.ndarray:
        """The label map (array in the input's order) before postprocessing."""
        image, properties = self._image(channels)
        if not self.is_ensemble:
            return predict_probabilities(self.predictors[0].nnunet_predictor, image, properties, probabilities=False)[0]
        probabilities = average_probabilities(
            predict_probabilities(p.nnunet_predictor, image, properties)[1] for p in self.predictors)
        return labels_from_probabilities(probabilities)

    def predict(self, channels: Sequence[Volume]) -> Volume:
        """Segment one case (one :class:`Volume` per channel) with the whole selection."""
        start = time.perf_counter()
        labels = self.predict_labels(channels)
        if self.postprocessing is not None:
            labels = self.postprocessing.apply(labels)
        self.last_seconds = time.perf_counter() - start
        return Volume(labels.astype(np.uint8 if labels.max(initial=0) < 255 else np.uint16), channels[0].geometry)

    def predict_file(self, inputs: Sequence[Union[str, Path]], output: Union[str, Path]) -> Path:
        volumes = [Volume.read(Path(p)) for p in inputs]
        return self.predict(volumes).write(Path(output))

    def predict_folder(self, input_dir: Union[str, Path], output_dir: Union[str, Path]) -> list[Path]:
        """Every ``<case>_0000<ending>`` case of a folder -> ``output_dir/<case><ending>``."""
        from ..inference import find_cases

        ending = str(self.predictors[0].dataset_json.get("file_ending", ".nii.gz"))
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        cases = find_cases(input_dir, ending, len(self.predictors[0].channel_names))
        return [self.predict_file(files, output_dir / f"{case}{ending}") for case, files in cases.items()]
