"""One bounded-memory prediction: plan, preprocess, tiles, slab-wise export.

:func:`predict_bounded` takes what nnU-Net's ``predict_single_npy_array`` takes (a loaded
``nnUNetPredictor``, the image as ``(channels, *spatial)`` in the reader's axis order - float32, or
any real dtype, converted slab by slab - and ``{"spacing": [...]}`` in the same order) and returns
the same label map, while its peak memory follows the tile, the network grid in float16, the output
label map and one slab of the input, rather than classes x voxels x float32 on the original grid and
several float copies of the input. See :mod:`AutoNNUNetLib.bounded.budget`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ..events import ProgressCallback, ProgressEvent
from .budget import MemoryPlan, network_shape, plan_memory
from .export import export_labels
from .preprocess import preprocess
from .sliding import PredictionCancelled, predict_network_logits

logger = logging.getLogger(__name__)


def plan_prediction(nnunet_predictor, data_shape, properties: dict, max_memory_gb: Optional[float] = None,
                    save_probabilities: bool = False) -> MemoryPlan:
    """The memory plan of :func:`predict_bounded` for an image of ``data_shape`` (no work done).

    Raises :class:`~AutoNNUNetLib.bounded.budget.MemoryBudgetError` for a budget that cannot hold it.
    """
    return plan_memory(nnunet_predictor, tuple(data_shape)[1:], properties["spacing"], max_memory_gb,
                       probabilities=save_probabilities)


def predict_bounded(
    nnunet_predictor,
    data: np.ndarray,
    properties: dict,
    max_memory_gb: Optional[float] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[Callable[[], bool]] = None,
    save_probabilities: Optional[Union[str, Path]] = None,
    engine=None,
) -> np.ndarray:
    """Segment one image with bounded memory; the label map nnU-Net's in-memory path returns.

    Args:
        nnunet_predictor: an initialised ``nnUNetPredictor`` (``initialize_from_trained_model_folder``).
        data: ``(channels, *spatial)`` image in the array order nnU-Net's reader gives (float32, or any
            real dtype: nnU-Net's float32 conversion happens slab by slab; not modified).
        properties: ``{"spacing": [...]}`` in the same axis order (not modified).
        max_memory_gb: most memory the prediction may add (input and model not counted); ``None``
            plans slabs of about 512 MB. Refused before any work if it cannot hold one tile.
        progress: receives ``ProgressEvent("progress", {fraction, tiles_done, tiles_total,
            eta_seconds, message, phase})`` after every tile and every export slab.
        cancel: checked before every tile and slab; returning True raises
            :class:`~AutoNNUNetLib.bounded.sliding.PredictionCancelled`.
        save_probabilities: a ``.npy`` path to write the class probabilities to (float32,
            ``(classes, *spatial)``), slab by slab.
        engine: the tile engine (:func:`AutoNNUNetLib.engines.make_engine`); default torch.

    Returns:
        the label map, shape ``data.shape[1:]``, uint8 (uint16 beyond 254 foreground classes).
    """
    import torch

    from ..engines import make_engine

    if data.ndim != 4:
        raise ValueError(f"data must be (channels, x, y, z), got shape {data.shape}")
    probabilities_path = None if save_probabilities is None else Path(save_probabilities)
    # The whole plan, and a refusal, come before any work.
    plan = plan_prediction(nnunet_predictor, data.shape, properties, max_memory_gb, probabilities_path is not None)
    emit = progress or (lambda event: None)
    emit(ProgressEvent("stage", {"name": "predict", "message": plan.summary(), "planned_peak_bytes": plan.peak_bytes}))
    if cancel is not None and cancel():
        raise PredictionCancelled("prediction cancelled before it started")

    predictor = nnunet_predictor
    network_input, props = preprocess(predictor, data, properties, plan.preprocessing_rows)
    network_input = torch.from_numpy(network_input).to(dtype=torch.float32, memory_format=torch.contiguous_format)
    # The real shapes (after cropping) give the export's slab size.
    plan = plan_memory(predictor, data.shape[1:], properties["spacing"], max_memory_gb,
                       probabilities=probabilities_path is not None, network_grid=network_input.shape[1:],
                       cropped_shape=props["shape_after_cropping_and_before_resampling"])

    def on_tile(done: int, total: int, seconds: float) -> None:
        eta = seconds / done * (total - done)
        emit(ProgressEvent("progress", {
            "fraction": done / total, "tiles_done": done, "tiles_total": total, "eta_seconds": eta,
            "phase": "tiles", "message": f"tile {done}/{total}",
        }))

    def on_slab(done: int, total: int) -> None:
        emit(ProgressEvent("progress", {
            "fraction": 1.0, "slabs_done": done, "slabs_total": total, "eta_seconds": 0.0,
            "phase": "export", "message": f"export slab {done}/{total}",
        }))

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise PredictionCancelled("prediction cancelled during the export")

    if engine is None:
        engine = make_engine("torch", predictor)
    logits = predict_network_logits(predictor, engine, network_input, cancel=cancel, on_tile=on_tile)
    del network_input
    labels = export_labels(predictor, logits, props, plan.slab_rows, probabilities_path, check_cancel, on_slab)
    return labels


__all__ = ["predict_bounded", "plan_prediction", "network_shape"]
