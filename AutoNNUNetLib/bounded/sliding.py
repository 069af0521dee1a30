"""nnU-Net's sliding-window inference on the network's grid, one tile at a time, with progress and cancel.

The operations and their order are nnU-Net's (``nnUNetPredictor.predict_sliding_window_return_logits``
and ``_internal_maybe_mirror_and_predict``, 2.8.1): pad the image to at least one patch, visit the
tiles in nnU-Net's order, average the mirrored predictions of a tile (the unmirrored one first, then
each combination of the allowed axes), weight it by the Gaussian importance map, add it into float16
logit and weight sums, divide, crop the padding off. Several folds are predicted one after the other
and their float16 logits averaged, as ``predict_logits_from_preprocessed_data`` does. With the torch
engine the logits are therefore nnU-Net's bit for bit.

What differs is bookkeeping only: the sums are numpy-allocated (so ``tracemalloc`` sees them), a
``cancel`` callable is checked before every tile, and a callback hears of every finished tile.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import AutoNNUNetError

#: Called after each tile with (tiles done, tiles in total, seconds since the first tile).
TileCallback = Callable[[int, int, float], None]


class PredictionCancelled(AutoNNUNetError):
    """The caller's cancel check asked to stop; no label map was produced."""


def tile_count(predictor, network_shape: Sequence[int]) -> int:
    """How many tiles nnU-Net visits on a (preprocessed) image of ``network_shape``, per fold.

    A 2d model's patch has one axis less than the volume: it covers the last two axes, slice by
    slice along the first (as nnU-Net's sliding window), so only those are padded to the patch.
    """
    patch = [int(v) for v in predictor.configuration_manager.patch_size]
    shape = [int(s) for s in network_shape]
    lead = len(shape) - len(patch)
    padded = shape[:lead] + [max(s, p) for s, p in zip(shape[lead:], patch)]
    return len(predictor._internal_get_sliding_window_slicers(tuple(padded)))


def mirror_combinations(predictor, ndim: int) -> list[tuple[int, ...]]:
    """The flipped tensor axes nnU-Net averages over, in its order (empty without mirroring)."""
    if not predictor.use_mirroring or predictor.allowed_mirroring_axes is None:
        return []
    axes = [int(a) + 2 for a in predictor.allowed_mirroring_axes]
    if max(axes) > ndim - 1:
        raise AutoNNUNetError(f"mirroring axes {tuple(predictor.allowed_mirroring_axes)} do not fit a {ndim - 2}D tile")
    return [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def _predict_tile(engine, tile, combinations):
    import torch

    prediction = engine(tile)
    for axes in combinations:
        prediction += torch.flip(engine(torch.flip(tile, axes)), axes)
    if combinations:
        prediction /= len(combinations) + 1
    return prediction


def _one_fold(predictor, engine, data, slicers, gaussian, combinations, check_cancel, on_tile):
    import torch

    heads = predictor.label_manager.num_segmentation_heads
    # numpy-allocated so that the process's traced memory accounts for the two big sums.
    logits = torch.from_numpy(np.zeros((heads, *data.shape[1:]), dtype=np.float16))
    weights = torch.from_numpy(np.zeros(data.shape[1:], dtype=np.float16))
    for slicer in slicers:
        check_cancel()
        tile = torch.clone(data[slicer][None], memory_format=torch.contiguous_format).to(predictor.device)
        prediction = _predict_tile(engine, tile, combinations)[0].to("cpu")
        del tile
        if predictor.use_gaussian:
            prediction *= gaussian
        logits[slicer] += prediction
        weights[slicer[1:]] += gaussian
        del prediction
        on_tile()
    torch.div(logits, weights, out=logits)
    del weights
    for head in range(heads):  # nnU-Net checks the whole array at once; per class keeps the mask small
        if torch.any(torch.isinf(logits[head])):
            raise AutoNNUNetError("infinite logits in the float16 sums (nnU-Net's own limit); "
                                  "this model cannot be predicted with float16 accumulation")
    return logits


def predict_network_logits(predictor, engine, data, cancel: Optional[Callable[[], bool]] = None,
                           on_tile: Optional[TileCallback] = None):
    """Float16 logits ``(heads, *data.shape[1:])`` of a preprocessed image ``data`` (a CPU tensor).

    ``engine(tile) -> logits`` runs the network on one ``(1, channels, *patch)`` tile; it must have
    the weights of ``predictor.list_of_parameters[i]`` loaded by ``engine.load_fold(i)``.
    """
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    patch = tuple(int(v) for v in predictor.configuration_manager.patch_size)
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
    gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu")) \
        if predictor.use_gaussian else 1
    combinations = mirror_combinations(predictor, padded.ndim + 1)
    folds = len(predictor.list_of_parameters)
    total = len(slicers) * folds
    done = 0
    start = time.perf_counter()

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise PredictionCancelled(f"prediction cancelled after {done} of {total} tiles")

    def tile_done() -> None:
        nonlocal done
        done += 1
        if on_tile is not None:
            on_tile(done, total, time.perf_counter() - start)

    # nnU-Net autocasts on CUDA only (it is slow or missing elsewhere); do the same.
    autocast = torch.autocast("cuda", enabled=True) if predictor.device.type == "cuda" else contextlib.nullcontext()
    summed = None
    with torch.inference_mode(), autocast:
        for fold in range(folds):
            engine.load_fold(fold)
            logits = _one_fold(predictor, engine, padded, slicers, gaussian, combinations, check_cancel, tile_done)
            logits = logits[(slice(None), *revert[1:])]
            if summed is None:
                summed = logits
            else:
                summed += logits
            del logits
        if folds > 1:
            summed /= folds
    return summed
