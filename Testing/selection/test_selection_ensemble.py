"""The ensemble's slab-wise averaging of memory-mapped probability files equals the whole-array one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from AutoNNUNetLib.selection.ensemble import (
    average_probabilities,
    ensemble_labels_from_files,
    ensemble_slab_rows,
    labels_from_probabilities,
)


def _members(tmp_path: Path, shape=(3, 17, 9, 8), count=3, seed=0) -> tuple[list[Path], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    arrays, paths = [], []
    for index in range(count):
        logits = rng.standard_normal(shape).astype(np.float32)
        probabilities = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
        # Near-ties between members: where the sum's last bit decides, order and precision matter.
        probabilities[:, :2] = np.float32(1 / 3) + np.float32(1e-8) * index
        path = tmp_path / f"{index}.npy"
        np.save(path, probabilities.astype(np.float32))
        arrays.append(probabilities.astype(np.float32))
        paths.append(path)
    return paths, arrays


@pytest.mark.parametrize("slab_bytes", [1, 5000, 10 ** 9])
def test_slab_wise_labels_equal_whole_array_labels(tmp_path, slab_bytes):
    paths, arrays = _members(tmp_path)
    expected = labels_from_probabilities(average_probabilities(arrays))
    labels = ensemble_labels_from_files(paths, slab_bytes)
    assert labels.dtype == np.uint8 and labels.shape == arrays[0].shape[1:]
    np.testing.assert_array_equal(labels, expected)
    assert len(np.unique(labels)) == 3


def test_slab_rows_follow_the_budget():
    shape = (3, 400, 512, 512)
    row = 512 * 512 * (3 * 4 * 2 + 8 + 1)
    assert ensemble_slab_rows(shape, 10 * row) == 10
    assert ensemble_slab_rows(shape, 1) == 1            # never zero rows
    assert ensemble_slab_rows(shape, 10 ** 12) == 400   # never more rows than the volume has


def test_files_are_released_and_shapes_checked(tmp_path):
    paths, _ = _members(tmp_path)
    ensemble_labels_from_files(paths, 1)
    if Path("/proc/self/fd").is_dir():  # the maps are closed when the call returns
        open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
        assert not open_files & {os.path.realpath(p) for p in paths}
    odd = tmp_path / "odd.npy"
    np.save(odd, np.zeros((3, 17, 9, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="odd.npy"):
        ensemble_labels_from_files([*paths, odd])
