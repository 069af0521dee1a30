"""Logits on the network's grid -> label map on the original grid, slab by slab of output rows.

The steps are nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape``: resample
the float16 logits to the cropped original shape (the plans' probability resampling), turn them into
labels with the label manager (argmax, or the region thresholds), put them into the uncropped volume
(background outside the crop box), undo the transpose. Here each step runs on a slab of rows along
the first (transposed) axis, written straight into a uint8/uint16 label map, so no classes x voxels
array of the original grid ever exists. Probabilities, on request, are written to a ``.npy`` file
slab by slab (float32, shape ``(classes, *input shape)``, nnU-Net's values and layout).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .resample import slab_resampler

logger = logging.getLogger(__name__)

#: Called after each slab with (slabs done, slabs in total).
SlabCallback = Callable[[int, int], None]


def label_dtype(label_manager) -> type:
    """nnU-Net's label map dtype: uint8 below 255 foreground labels, uint16 above."""
    return np.uint8 if len(label_manager.foreground_labels) < 255 else np.uint16


def _spacings(predictor, properties: dict) -> tuple[list, list]:
    """nnU-Net's (current, new) spacing pair for the export's resampling."""
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    new = [properties["spacing"][i] for i in pm.transpose_forward]
    cropped = properties["shape_after_cropping_and_before_resampling"]
    current = cm.spacing if len(cm.spacing) == len(cropped) else [new[0], *cm.spacing]
    return list(current), new


class _ProbabilityFile:
    """A float32 ``.npy`` of shape ``(classes, *input shape)`` filled slab by slab."""

    def __init__(self, path: Path, heads: int, shape_transposed: tuple, transpose_backward, background_one: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        final_shape = tuple(shape_transposed[i] for i in transpose_backward)
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(heads, *final_shape))
        # Writes go through the transposed view, so slab rows land where nnU-Net's transpose puts them.
        self.view = self.array.transpose([0, *[int(np.argsort(transpose_backward)[i]) + 1 for i in range(3)]])
        self.background_one = background_one

    def write_rows(self, start: int, stop: int, bbox, probabilities: Optional[np.ndarray]) -> None:
        """Rows ``[start, stop)`` of the transposed volume; ``probabilities`` covers the crop box part."""
        rows = self.view[:, start:stop]
        rows[...] = 0
        if self.background_one:
            rows[0] = 1  # outside the crop box nnU-Net's probabilities say background
        if probabilities is not None:
            rows[(slice(None), slice(None), *[slice(lo, hi) for lo, hi in bbox[1:]])] = probabilities
        self.array.flush()

    def close(self) -> None:
        self.array.flush()
        del self.view, self.array


def export_labels(
    predictor,
    logits,
    properties: dict,
    slab_rows: int,
    probabilities_path: Optional[Path] = None,
    check_cancel: Optional[Callable[[], None]] = None,
    on_slab: Optional[SlabCallback] = None,
) -> np.ndarray:
    """The label map on the input's grid (array order of the input) from float16 ``logits``."""
    pm, cm, lm = predictor.plans_manager, predictor.configuration_manager, predictor.label_manager
    cropped = tuple(int(v) for v in properties["shape_after_cropping_and_before_resampling"])
    before = tuple(int(v) for v in properties["shape_before_cropping"])
    bbox = [[int(lo), int(hi)] for lo, hi in properties["bbox_used_for_cropping"]]
    current, new = _spacings(predictor, properties)
    source = logits.numpy() if hasattr(logits, "numpy") else np.asarray(logits)
    resampler = slab_resampler(cm, source.shape[1:], cropped, current, new)
    if resampler is None:
        return _export_whole(predictor, logits, properties, probabilities_path)

    labels = np.zeros(before, dtype=label_dtype(lm))
    probability_file = None
    if probabilities_path is not None:
        probability_file = _ProbabilityFile(probabilities_path, source.shape[0], before, pm.transpose_backward,
                                            background_one=not lm.has_regions)
        for lo, hi in ((0, bbox[0][0]), (bbox[0][1], before[0])):  # rows outside the crop box
            for start in range(lo, hi, max(1, slab_rows)):
                probability_file.write_rows(start, min(start + slab_rows, hi), bbox, None)
    inner = tuple(slice(lo, hi) for lo, hi in bbox[1:])
    slabs = range(0, cropped[0], max(1, int(slab_rows)))
    started = time.perf_counter()
    for index, start in enumerate(slabs):
        if check_cancel is not None:
            check_cancel()
        stop = min(start + slab_rows, cropped[0])
        slab = resampler.slab(source, start, stop)
        row0 = bbox[0][0] + start
        if probability_file is None:
            segmentation = lm.convert_logits_to_segmentation(slab)
        else:
            probabilities = lm.apply_inference_nonlin(slab)
            segmentation = lm.convert_probabilities_to_segmentation(probabilities)
            probability_file.write_rows(row0, row0 + stop - start, bbox, probabilities.numpy())
            del probabilities
        labels[(slice(row0, row0 + stop - start), *inner)] = np.asarray(segmentation)
        del slab, segmentation
        if on_slab is not None:
            on_slab(index + 1, len(slabs))
    if probability_file is not None:
        probability_file.close()
    logger.debug("exported %d slab(s) in %.1f s", len(slabs), time.perf_counter() - started)
    return labels.transpose(pm.transpose_backward)


def _export_whole(predictor, logits, properties: dict, probabilities_path: Optional[Path]) -> np.ndarray:
    """Plans whose resampling the slab path does not reproduce: nnU-Net's export on the whole volume."""
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    logger.warning("%s: resampling %s is not slab-wise reproducible; exporting the whole volume at once "
                   "(memory is not bounded in this phase)", predictor.configuration_manager.configuration.get(
                       "resampling_fn_probabilities"), predictor.configuration_manager.configuration.get(
                       "resampling_fn_probabilities_kwargs"))
    result = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, properties,
        return_probabilities=probabilities_path is not None, num_threads_torch=torch.get_num_threads(),
    )
    if probabilities_path is None:
        return result
    segmentation, probabilities = result
    Path(probabilities_path).parent.mkdir(parents=True, exist_ok=True)
    np.save(probabilities_path, probabilities.astype(np.float32, copy=False))
    return segmentation
