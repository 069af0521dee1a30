"""Softmax averaging of ensemble members, in the order and precision ``nnUNetv2_ensemble`` uses.

``nnUNetv2_ensemble`` loads each member's ``probabilities`` (float32 as ``nnUNetv2_predict
--save_probabilities`` writes them), adds them in member order and divides by the count, then
takes the arg max over classes. Doing exactly that in memory makes our ensemble's label maps
equal to the stock tool's, voxel for voxel.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


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
