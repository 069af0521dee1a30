"""Softmax averaging of ensemble members, in the order and precision ``nnUNetv2_ensemble`` uses.

``nnUNetv2_ensemble`` loads each member's ``probabilities`` (float32 as ``nnUNetv2_predict
--save_probabilities`` writes them), adds them in member order and divides by the count, then
takes the arg max over classes. Doing exactly that in memory makes our ensemble's label maps
equal to the stock tool's, voxel for voxel. The operations are element-wise, so doing them on
slabs of rows of memory-mapped files (:func:`ensemble_labels_from_files`) gives the same values
as on whole arrays while holding one slab.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..bounded.budget import DEFAULT_SLAB_BYTES


def average_probabilities(members: Iterable[np.ndarray]) -> np.ndarray:
    """Mean of per-member class probabilities (each ``(classes, *spatial)``), in float32."""
    total = None
    count = 0
    for probabilities in members:
        if total is None:
            total = np.array(probabilities, dtype=np.float32, copy=True)
        else:
            if probabilities.shape != total.shape:
                raise ValueError(f"ensemble members disagree in shape: {probabilities.shape} vs {total.shape}")
            total += probabilities
        count += 1
    if total is None:
        raise ValueError("an ensemble needs at least one member")
    if count > 1:
        total /= count
    return total


def labels_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """The label map of class probabilities (labels are the class indices, as in nnU-Net)."""
    labels = probabilities.argmax(0)
    return labels.astype(np.uint8 if probabilities.shape[0] <= 255 else np.uint16)


def ensemble_slab_rows(shape: Sequence[int], slab_bytes: int = DEFAULT_SLAB_BYTES) -> int:
    """Rows of the first spatial axis per slab for probabilities of ``shape`` = (classes, *spatial).

    A row costs the float32 sum of every class, the copy numpy's arg max over the first axis makes
    of it (it moves that axis last), the int64 arg max and its uint8 label map (measured with
    ``benchmarks/bench_ensemble_memory.py``).
    """
    classes, rows, *plane = (int(v) for v in shape)
    row_bytes = int(np.prod(plane, dtype=np.int64)) * (classes * 4 * 2 + 8 + 1)
    return max(1, min(rows, int(slab_bytes) // max(row_bytes, 1)))


def ensemble_labels_from_files(paths: Sequence[Path], slab_bytes: int = DEFAULT_SLAB_BYTES) -> np.ndarray:
    """The ensemble's label map from members' ``.npy`` probability files, slab by slab.

    The files are memory-mapped; what is held is one slab of the sum and the label map.
    """
    if not paths:
        raise ValueError("an ensemble needs at least one member")
    members = [np.load(Path(p), mmap_mode="r") for p in paths]
    shape = members[0].shape
    for path, member in zip(paths, members):
        if member.shape != shape:
            raise ValueError(f"ensemble members disagree in shape: {member.shape} ({path}) vs {shape}")
    labels = np.empty(shape[1:], dtype=np.uint8 if shape[0] <= 255 else np.uint16)
    rows = ensemble_slab_rows(shape, slab_bytes)
    for start in range(0, shape[1], rows):
        stop = min(start + rows, shape[1])
        labels[start:stop] = labels_from_probabilities(average_probabilities(m[:, start:stop] for m in members))
    return labels  # the maps (and their files) close with this frame, so the caller can delete them
