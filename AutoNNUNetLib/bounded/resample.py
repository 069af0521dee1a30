"""Resampling logits from the network's grid to the original grid, one slab of output rows at a time.

nnU-Net's export (``resample_data_or_seg_to_shape`` with the plans' probability kwargs, usually
``order=1, order_z=0``) converts the logits of every class to float64 and resizes the whole volume
with ``skimage.transform.resize`` (``scipy.ndimage.zoom`` with ``grid_mode=True``), or, for
anisotropic spacings, resizes each slice in-plane and then picks the nearest slice along the
low-resolution axis. The result is stored as float16 (the logits' dtype) before the argmax.

Here the same mapping is computed for a slab of output rows along axis 0 from only the input rows it
needs: ``scipy.ndimage.map_coordinates`` on that sub-block, at zoom's own coordinates
``(o + 0.5) * n_in / n_out - 0.5`` computed with the same float64 operations and shifted by the
sub-block's integer offset (an exact subtraction), with ``mode='nearest'`` (skimage's ``edge``).
Zoom and map_coordinates share scipy's interpolation kernel, so each slab is bit-equal to nnU-Net's
result (the tests compare them with nnU-Net's function). The anisotropic path resamples each slice
in-plane the same way, then takes the nearest (``order_z=0``) or linear slice along its axis.

Plans this module cannot reproduce (another resampling function, spline orders above 1) are reported
by :func:`slab_resampler` returning None; the caller then resamples the whole volume with nnU-Net.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

_SUPPORTED_FUNCTION = "resample_data_or_seg_to_shape"


@dataclass(frozen=True)
class AxisSampling:
    """Where each output index of one axis reads the input: two rows and a weight, or one row."""

    low: np.ndarray  # int64, first input index per output index
    high: np.ndarray  # int64, second input index (== low for nearest sampling)
    weight: Optional[np.ndarray]  # float64 weight of ``high``; None for nearest / identity
    n_in: int
    n_out: int

    @property
    def identity(self) -> bool:
        return self.n_in == self.n_out

    def rows_for(self, start: int, stop: int) -> tuple[int, int]:
        """The input rows ``[first, last)`` that output rows ``[start, stop)`` read."""
        if self.identity:
            return start, stop
        return int(self.low[start:stop].min()), int(self.high[start:stop].max()) + 1


def axis_sampling(n_in: int, n_out: int, order: int) -> AxisSampling:
    """Per-axis sampling positions of ``scipy.ndimage.zoom(grid_mode=True, mode='nearest')``."""
    if n_in == n_out:
        index = np.arange(n_out, dtype=np.int64)
        return AxisSampling(index, index, None, n_in, n_out)
    coordinate = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    coordinate = np.clip(coordinate, 0.0, n_in - 1)
    if order == 0:
        index = np.minimum(np.floor(coordinate + 0.5).astype(np.int64), n_in - 1)
        return AxisSampling(index, index, None, n_in, n_out)
    low = np.floor(coordinate).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    return AxisSampling(low, high, coordinate - low, n_in, n_out)


def _coordinates(sampling: AxisSampling, start: int = 0, stop: Optional[int] = None, offset: int = 0) -> np.ndarray:
    """Zoom's input coordinates ``(o + 0.5) * n_in / n_out - 0.5`` of outputs ``[start, stop)``, unclamped.

    Computed with the same float64 operations as scipy's zoom, so that ``map_coordinates`` on a
    sub-block (shifted by the integer ``offset``, an exact subtraction) reads the same weights.
    """
    stop = sampling.n_out if stop is None else stop
    if sampling.identity:
        return np.arange(start, stop, dtype=np.float64) - offset
    return (np.arange(start, stop, dtype=np.float64) + 0.5) * (sampling.n_in / sampling.n_out) - 0.5 - offset


def _grid(axes: list[np.ndarray]) -> np.ndarray:
    """A ``(len(axes), *sizes)`` coordinate array from per-axis coordinates (the slab's only big temporary)."""
    grid = np.empty((len(axes), *[len(a) for a in axes]), dtype=np.float64)
    for index, values in enumerate(axes):
        shape = [1] * len(axes)
        shape[index] = len(values)
        grid[index] = values.reshape(shape)
    return grid


class SlabResampler:
    """Resample a ``(classes, x, y, z)`` float16 logit volume to ``new_shape``, slab by slab along x.

    ``orders`` holds the interpolation order per axis; a separate low-resolution axis (nnU-Net's
    ``do_separate_z``) is given by ``separate_axis``: in-plane resampling of each of its slices first,
    then ``orders[separate_axis]`` along it, as nnU-Net does.
    """

    def __init__(self, source_shape: Sequence[int], new_shape: Sequence[int], orders: Sequence[int],
                 separate_axis: Optional[int] = None):
        self.source_shape = tuple(int(v) for v in source_shape)
        self.new_shape = tuple(int(v) for v in new_shape)
        self.orders = [int(o) for o in orders]
        self.separate_axis = separate_axis
        self.axes = [axis_sampling(n_in, n_out, order)
                     for n_in, n_out, order in zip(self.source_shape, self.new_shape, self.orders)]

    @property
    def identity(self) -> bool:
        return all(a.identity for a in self.axes)

    def input_rows(self, start: int, stop: int) -> tuple[int, int]:
        return self.axes[0].rows_for(start, stop)

    def max_input_rows(self, slab_rows: int) -> int:
        """The most input rows any slab of ``slab_rows`` output rows reads (for the memory plan)."""
        if self.axes[0].identity:
            return slab_rows
        n_out = self.new_shape[0]
        return max(np.subtract(*self.input_rows(s, min(s + slab_rows, n_out))[::-1])
                   for s in range(0, n_out, slab_rows))

    def slab(self, logits: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Output rows ``[start, stop)`` of every class, float16 like nnU-Net's stored result."""
        out = np.empty((logits.shape[0], stop - start, *self.new_shape[1:]), dtype=np.float16)
        if self.identity:
            out[:] = logits[:, start:stop]
            return out
        first, last = self.input_rows(start, stop)
        if self.separate_axis is None:
            grid = _grid([_coordinates(self.axes[0], start, stop, first), _coordinates(self.axes[1]),
                          _coordinates(self.axes[2])])
        for channel in range(logits.shape[0]):
            # One class at a time: the float64 temporaries are one slab of one class.
            block = np.asarray(logits[channel, first:last], dtype=np.float64)
            if self.separate_axis is None:
                out[channel] = _map(block, grid, self.orders[0])  # float64 -> float16, round to nearest
            else:
                out[channel] = self._separate(block, start, stop, first)
        return out

    def _separate(self, block: np.ndarray, start: int, stop: int, first: int) -> np.ndarray:
        """nnU-Net's anisotropic path: each slice along the low-resolution axis in-plane, then along it."""
        axis = self.separate_axis
        plane_axes = [a for a in range(3) if a != axis]
        plane = [_coordinates(self.axes[a], start, stop, first) if a == 0 else _coordinates(self.axes[a])
                 for a in plane_axes]
        grid = _grid(plane)
        in_plane_order = self.orders[plane_axes[0]]
        slices = [_map(np.take(block, k, axis=axis), grid, in_plane_order) for k in range(block.shape[axis])]
        stacked = np.stack(slices, axis=axis)
        del slices
        along = self.axes[axis]
        if along.identity:
            return stacked
        if axis == 0:
            low, high = along.low[start:stop] - first, along.high[start:stop] - first
            weight = None if along.weight is None else along.weight[start:stop]
        else:
            low, high, weight = along.low, along.high, along.weight
        result = np.take(stacked, low, axis=axis)
        if weight is not None:
            shape = [1, 1, 1]
            shape[axis] = len(weight)
            weight = weight.reshape(shape)
            result *= 1.0 - weight
            upper = np.take(stacked, high, axis=axis)
            upper *= weight
            result += upper
        return result


def _map(block: np.ndarray, grid: np.ndarray, order: int) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    return map_coordinates(block, grid, order=order, mode="nearest", prefilter=False)


def slab_resampler(configuration_manager, source_shape: Sequence[int], new_shape: Sequence[int],
                   current_spacing: Sequence[float], new_spacing: Sequence[float]) -> Optional[SlabResampler]:
    """A :class:`SlabResampler` reproducing the plans' probability resampling, or None if it cannot."""
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    configuration = configuration_manager.configuration
    name = str(configuration.get("resampling_fn_probabilities", ""))
    kwargs = dict(configuration.get("resampling_fn_probabilities_kwargs", {}))
    if name != _SUPPORTED_FUNCTION or kwargs.get("is_seg", False):
        return None
    order = int(kwargs.get("order", 3))
    order_z = int(kwargs.get("order_z", 0))
    do_separate_z, axis = determine_do_sep_z_and_axis(
        kwargs.get("force_separate_z", False), current_spacing, new_spacing,
        kwargs.get("separate_z_anisotropy_threshold", _anisotropy_threshold()),
    )
    orders = [order] * 3
    if do_separate_z:
        orders[int(axis)] = order_z
    if any(o not in (0, 1) for o in orders) or len(source_shape) != 3:
        return None
    return SlabResampler(source_shape, new_shape, orders, int(axis) if do_separate_z else None)


def _anisotropy_threshold() -> float:
    from nnunetv2.configuration import ANISO_THRESHOLD

    return float(ANISO_THRESHOLD)
