"""Predict with a selection: one model or an ensemble, its folds, its postprocessing.

:class:`Selection` loads ``selection.json`` and builds one
:class:`~AutoNNUNetLib.inference.Predictor` per member (the folds of a member are averaged by
nnU-Net's predictor, on logits, as ``nnUNetv2_predict`` does). Every member predicts on the
bounded path (:mod:`AutoNNUNetLib.bounded`), so a selection holds what one model holds:

- one member: the member's label map;
- several: each member writes its class probabilities (as ``nnUNetv2_predict --save_probabilities``
  computes them) slab by slab to a memory-mapped ``.npy`` in a scratch folder; they are averaged
  in member order and arg-maxed slab by slab (as ``nnUNetv2_ensemble``,
  :func:`~AutoNNUNetLib.selection.ensemble.ensemble_labels_from_files`); the scratch folder is
  deleted afterwards, also on failure or cancel.

Then the kept postprocessing steps. The label maps are the ones the stock commands of
``inference_instructions.txt`` write (tested on held-out cases).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..bounded.budget import DEFAULT_SLAB_BYTES, GIB
from ..events import ProgressCallback, ProgressEvent
from ..imaging import Volume
from .choose import SelectionResult
from .ensemble import ensemble_labels_from_files
from .layout import SelectionError


def _member_progress(progress: Optional[ProgressCallback], index: int, count: int,
                     name: str) -> Optional[ProgressCallback]:
    """A member's progress as a part of the whole ensemble's (member i of n covers [i/n, (i+1)/n]),
    its messages prefixed with the member's name."""
    if progress is None:
        return None

    def forward(event: ProgressEvent) -> None:
        data = dict(event.data)
        if "fraction" in data:
            data["fraction"] = (index + float(data["fraction"])) / count
        if "message" in data:
            data["message"] = f"{name} ({index + 1}/{count}): {data['message']}"
        progress(ProgressEvent(event.kind, data, event.time))

    return forward


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
        max_memory_gb: each member's prediction budget (see :class:`~AutoNNUNetLib.inference.Predictor`);
            it also sizes the ensemble's averaging slabs.
        engine: the tile engine of every member (``auto``, ``torch``, ``onnxruntime``, ``openvino``).
        original_labels: write the label values of the training files when intake renumbered them.
        scratch_dir: where an ensemble's probability files go (default: the system's temporary
            folder); they need classes x voxels x 4 bytes per member on disk.
    """

    def __init__(self, root: Union[str, Path], device: Any = "auto", folds: Optional[Sequence[int]] = None,
                 members: Optional[Sequence[str]] = None, use_mirroring: Optional[bool] = None,
                 postprocess: bool = True, result: Optional[SelectionResult] = None,
                 max_memory_gb: Optional[float] = None, engine: str = "auto", original_labels: bool = False,
                 scratch_dir: Optional[Union[str, Path]] = None) -> None:
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
        self.scratch_dir = None if scratch_dir is None else Path(scratch_dir)
        self.predictors = [Predictor(self.root / m["model_dir"], folds=self.folds, device=device,
                                     use_mirroring=self.use_mirroring, max_memory_gb=max_memory_gb, engine=engine,
                                     original_labels=original_labels) for m in chosen]
        self.last_seconds = float("nan")

    @property
    def is_ensemble(self) -> bool:
        return len(self.predictors) > 1

    @property
    def file_ending(self) -> str:
        return str(self.predictors[0].dataset_json.get("file_ending", ".nii.gz"))

    def predict_labels(self, channels: Sequence[Volume], progress: Optional[ProgressCallback] = None,
                       cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
        """The label map (array in the input's order, training label values) before postprocessing."""
        # Every member was trained on the same dataset, so the first one's input checks serve all.
        image, properties = self.predictors[0].prepare_array(channels)
        names = [m["name"] for m in self.members]
        if not self.is_ensemble:
            labels = self.predictors[0].segment_array(image, properties, progress, cancel)
        else:
            labels = self._ensemble(image, properties, names, progress, cancel)
        return labels[0] if channels[0].array.ndim == 2 else labels

    def _ensemble(self, image: np.ndarray, properties: dict, names: list[str],
                  progress: Optional[ProgressCallback], cancel: Optional[Callable[[], bool]]) -> np.ndarray:
        heads = self.predictors[0].nnunet_predictor.label_manager.num_segmentation_heads
        needed = heads * int(np.prod(image.shape[1:], dtype=np.int64)) * 4 * len(self.predictors)
        parent = self.scratch_dir or Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(parent).free
        if free < needed:
            raise SelectionError(
                f"the ensemble of {len(names)} members needs {needed / GIB:.1f} GB of scratch space for its "
                f"probabilities, {parent} has {free / GIB:.1f} GB free (choose another scratch folder)")
        scratch = Path(tempfile.mkdtemp(prefix=".autonnunet-ensemble-", dir=parent))
        try:
            paths = []
            for index, (name, predictor) in enumerate(zip(names, self.predictors)):
                path = scratch / f"{index}.npy"
                predictor.segment_array(image, properties, _member_progress(progress, index, len(names), name), cancel,
                                        save_probabilities=path)
                paths.append(path)
            budget = self.predictors[0].max_memory_gb  # the members' budget also sizes the averaging slabs
            return ensemble_labels_from_files(paths, DEFAULT_SLAB_BYTES if budget is None else int(budget * GIB))
        finally:
            # On Windows a map not yet released keeps its file; leave it to the temp cleaner, not over the error.
            shutil.rmtree(scratch, ignore_errors=os.name == "nt")

    def predict(self, channels: Sequence[Volume], progress: Optional[ProgressCallback] = None,
                cancel: Optional[Callable[[], bool]] = None) -> Volume:
        """Segment one case (one :class:`Volume` per channel) with the whole selection."""
        from ..dataset.classes import restore_original_labels

        start = time.perf_counter()
        labels = self.predict_labels(channels, progress, cancel)
        if self.postprocessing is not None:
            labels = self.postprocessing.apply(labels)
        original = self.predictors[0].original_values
        if original is not None:  # after postprocessing: its steps name the training label values
            labels = restore_original_labels(labels, original)  # picks the smallest dtype that holds them
        else:
            labels = labels.astype(np.uint8 if labels.max(initial=0) < 255 else np.uint16, copy=False)
        self.last_seconds = time.perf_counter() - start
        return Volume(labels, channels[0].geometry)

    def predict_file(self, inputs: Sequence[Union[str, Path]], output: Union[str, Path],
                     progress: Optional[ProgressCallback] = None,
                     cancel: Optional[Callable[[], bool]] = None) -> Path:
        """Segment one case from image files (one per channel, or one 4D file); checked before inference."""
        from ..inference_inputs import case_channels, check_output_file, read_case

        output = check_output_file(output)
        volumes = read_case(case_channels(inputs, len(self.predictors[0].channel_names)))
        return self.predict(volumes, progress, cancel).write(output)

    def predict_folder(self, input_dir: Union[str, Path], output_dir: Union[str, Path],
                       progress: Optional[ProgressCallback] = None) -> list[Path]:
        """Every ``<case>_0000<ending>`` case of a folder -> ``output_dir/<case><ending>`` (all checked first)."""
        from ..inference import check_folder_cases, segment_cases
        from ..inference_inputs import check_output_folder

        cases = check_folder_cases(input_dir, self.file_ending, len(self.predictors[0].channel_names))
        return segment_cases(self.predict, cases, check_output_folder(output_dir), self.file_ending, progress)
