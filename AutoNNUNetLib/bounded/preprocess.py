"""nnU-Net's preprocessing of one image for prediction, with a peak that follows the network grid and a slab.

nnU-Net's ``DefaultPreprocessor.run_case_npy`` (2.8.1) holds several copies of the whole input: a
float32 copy, the non-zero mask and the hole filling's temporaries, a float64 copy, its edge-padded
float64 copy and the spline coefficients of that (order 3), about 34 bytes per input voxel. Here the
same operations run in the same order, each on a slab of the input, and the result equals nnU-Net's
bit for bit (Testing/large/test_bounded_preprocess.py compares them):

1. transpose (a view of the caller's array);
2. crop to the non-zero bounding box. The box of the hole-filled mask is the box of the mask itself
   (a filled hole is enclosed by the mask), so it comes from per-axis projections of the mask, slab
   by slab. The filled mask is only built when a normalization reads it, and on the box only:
   filling holes inside the box gives the same voxels as filling them in the whole volume;
3. normalization per channel with the plan's scheme. Element-wise schemes (CT, none, RGB) run
   nnU-Net's own class on each slab of float32 rows. Schemes with statistics over the whole image
   (z-score, rescale, any other class) run nnU-Net's class on a float32 copy of that one channel,
   laid out like nnU-Net's copy, so numpy's float32 sums loop the same way and give the same mean
   and standard deviation (4 bytes per input voxel of one channel);
4. resampling to the network's spacing (``resample_data_or_seg_to_shape``, i.e. skimage's ``resize``
   and scipy's ``zoom``, order 3 by default). Output rows along the first axis are computed from the
   input rows they read plus a margin on each side, in which the spline pre-filter's recursion
   forgets the slab's edge (its largest pole is 0.27 for order 3; after :func:`margin_rows` rows the
   edge's effect is below float64's resolution): edge padding of 12 and ``spline_filter`` as zoom
   does, then ``map_coordinates`` at zoom's own coordinates ``((o + 0.5) * n_in / n_out - 0.5) + 12``
   shifted by the block's first row (an exact subtraction), then skimage's clip to the channel's
   range. Anisotropic spacings (nnU-Net's separate z) resize each slice along the low-resolution
   axis with nnU-Net's own ``resize`` call and take the nearest slice, one output slice at a time.

Plans this module does not reproduce (another preprocessor class or resampling function, ``order_z``
other than 0 on the anisotropic path, 2D data) are preprocessed by nnU-Net's ``run_case_npy`` whole,
with a warning; the memory plan then uses nnU-Net's per-voxel cost.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_RESAMPLING = "resample_data_or_seg_to_shape"
_RESAMPLING_KWARGS = {"is_seg", "order", "order_z", "force_separate_z", "separate_z_anisotropy_threshold"}
#: scipy pads by this many edge voxels before the spline pre-filter with mode 'nearest'.
_PAD = 12
#: Largest pole magnitude of scipy's spline pre-filter per order: its recursion decays by this per row.
_LARGEST_POLE = {2: 0.1715728752538099, 3: 0.2679491924311228, 4: 0.36134122590022, 5: 0.4305753470999738}
#: Normalizations computed voxel by voxel (so per slab); every other scheme sees the whole channel.
_ELEMENTWISE = ("CTNormalization", "NoNormalization", "RGBTo01Normalization")
#: Classes known not to read the mask unless ``use_mask_for_norm`` (any other class gets it).
_MASK_ONLY_IF_ASKED = ("ZScoreNormalization", "RescaleTo01Normalization", *_ELEMENTWISE)
#: Rows of float32 read at once when streaming over the input (mask, range, filling a block).
_CHUNK_BYTES = 32 * 1024 ** 2


def margin_rows(order: int) -> int:
    """Rows beyond a slab's support after which the pre-filter's recursion no longer sees the slab edge
    (the edge's weight falls below 2^-64; order 0 and 1 have no pre-filter)."""
    if order <= 1:
        return 0
    return math.ceil(-64 * math.log(2) / math.log(_LARGEST_POLE[order]))


# --------------------------------------------------------------------------------------------------
# What the plan asks for


@dataclass(frozen=True)
class DataResampling:
    """nnU-Net's data resampling for one image: spline order, and the separate (low-resolution) axis."""

    order: int
    separate_axis: Optional[int]
    order_z: int


def unsupported_reason(predictor) -> Optional[str]:
    """Why this module cannot reproduce the plan's preprocessing (None if it can)."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    cm = predictor.configuration_manager
    if cm.preprocessor_class is not DefaultPreprocessor:
        return f"preprocessor {cm.preprocessor_class.__name__}"
    name = str(cm.configuration.get("resampling_fn_data", ""))
    kwargs = dict(cm.configuration.get("resampling_fn_data_kwargs", {}))
    if name != _RESAMPLING or set(kwargs) - _RESAMPLING_KWARGS or kwargs.get("is_seg", False):
        return f"data resampling {name} {kwargs}"
    if int(kwargs.get("order", 3)) not in range(6):
        return f"spline order {kwargs.get('order')}"
    return None


def data_resampling(configuration_manager, current_spacing, new_spacing) -> Optional[DataResampling]:
    """The resampling nnU-Net's ``resample_data_or_seg_to_shape`` does for these spacings, or None if the
    slab path does not reproduce it."""
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    kwargs = dict(configuration_manager.configuration.get("resampling_fn_data_kwargs", {}))
    order = int(kwargs.get("order", 3))
    order_z = int(kwargs.get("order_z", 0))
    separate, axis = determine_do_sep_z_and_axis(kwargs.get("force_separate_z", False), current_spacing, new_spacing,
                                                 kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD))
    if separate and order_z != 0:
        return None
    return DataResampling(order, int(axis) if separate else None, order_z)


def _normalizer(configuration_manager, plans_manager, channel: int):
    """nnU-Net's normalization object of one channel, found the way ``DefaultPreprocessor._normalize`` finds it."""
    from os.path import join

    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    scheme = configuration_manager.normalization_schemes[channel]
    normalizer_class = recursive_find_python_class(join(nnunetv2.__path__[0], "preprocessing", "normalization"),
                                                   scheme, "nnunetv2.preprocessing.normalization")
    if normalizer_class is None:
        raise RuntimeError(f"Unable to locate class '{scheme}' for normalization")
    return normalizer_class(use_mask_for_norm=configuration_manager.use_mask_for_norm[channel],
                            intensityproperties=plans_manager.foreground_intensity_properties_per_channel[str(channel)])


def _is_elementwise(normalizer) -> bool:
    return type(normalizer).__name__ in _ELEMENTWISE and type(normalizer).__module__.startswith("nnunetv2.")


def _reads_mask(normalizer) -> bool:
    known = type(normalizer).__name__ in _MASK_ONLY_IF_ASKED and type(normalizer).__module__.startswith("nnunetv2.")
    return bool(normalizer.use_mask_for_norm) or not known


# --------------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class PreprocessingMemory:
    """Peak bytes of :func:`preprocess` as ``fixed + rows * per_row`` (``rows`` output rows per slab)."""

    fixed: int
    per_row: int
    output_rows: int
    bounded: bool = True

    def bytes_for(self, rows: int) -> int:
        return self.fixed + self.per_row * int(rows)

    def rows_within(self, limit: int) -> int:
        """The most output rows per slab whose peak stays within ``limit`` bytes (at least 1)."""
        if self.per_row <= 0:
            return max(1, self.output_rows)
        return int(max(1, min(self.output_rows, (limit - self.fixed) // self.per_row)))


def preprocessing_memory(predictor, input_shape: Sequence[int], cropped_shape: Sequence[int],
                         network_grid: Sequence[int], spacing: Sequence[float]) -> PreprocessingMemory:
    """The memory :func:`preprocess` needs for an input of spatial ``input_shape`` (array order), cropped to
    ``cropped_shape`` (transposed), resampled to ``network_grid``; upper bounds, input array not counted."""
    cm, pm = predictor.configuration_manager, predictor.plans_manager
    channels = len(predictor.dataset_json["channel_names"])
    n_input = int(np.prod(input_shape))
    n_cropped = int(np.prod(cropped_shape))
    n_grid = int(np.prod(network_grid))
    # nnU-Net's run_case_npy, measured with tracemalloc on 2.8.1 (256x256x200, one channel): 34 B per
    # input voxel; float32 and float64 outputs on the network grid.
    nnunet = PreprocessingMemory(int(n_input * (24 * channels + 12) + n_grid * (8 * channels + 8)), 0,
                                 int(network_grid[0]), bounded=False)
    if unsupported_reason(predictor) is not None or len(cropped_shape) != 3:
        return nnunet
    output = 4 * channels * n_grid
    chunk = _CHUNK_BYTES + n_input // max(int(input_shape[0]), 1) * 5  # one chunk of rows and its mask
    normalizers = [_normalizer(cm, pm, c) for c in range(channels)]
    whole = 0
    if not all(_is_elementwise(n) for n in normalizers):
        whole = 4 * n_input + 8 * n_cropped  # one channel's float32 copy, and numpy's std temporary
    if any(_reads_mask(n) for n in normalizers):
        whole += 5 * n_cropped  # the filled mask (hole filling's temporaries), the int8 mask
    spacing_t = [float(spacing[i]) for i in pm.transpose_forward]
    target = list(cm.spacing) if len(cm.spacing) == 3 else [spacing_t[0], *cm.spacing]
    resampling = data_resampling(cm, spacing_t, target)
    if resampling is None:
        return nnunet
    if tuple(cropped_shape) == tuple(network_grid):
        return PreprocessingMemory(output + whole + chunk, 0, int(network_grid[0]))
    if resampling.separate_axis is not None:
        plane_in = n_cropped // int(cropped_shape[resampling.separate_axis])
        plane_out = n_grid // int(network_grid[resampling.separate_axis])
        # One slice: float32, float64, padded float64, coefficients, float64 output, skimage's clip.
        return PreprocessingMemory(output + whole + chunk + 4 * 8 * (plane_in + 2 * _PAD * int(
            np.sqrt(plane_in)) + 4 * _PAD ** 2) + 24 * plane_out, 0, int(network_grid[0]))
    plane_in = (int(cropped_shape[1]) + 2 * _PAD) * (int(cropped_shape[2]) + 2 * _PAD)
    plane_out = n_grid // int(network_grid[0])
    ratio = cropped_shape[0] / network_grid[0]
    support = resampling.order + 2 + 2 * margin_rows(resampling.order) + 2 * _PAD
    # The padded float64 block of one slab (filtered in place), the coordinate grid and the float64 output.
    fixed = output + whole + chunk + 8 * plane_in * support
    per_row = int(8 * plane_in * ratio + 8 + 32 * plane_out)
    return PreprocessingMemory(int(fixed), per_row, int(network_grid[0]))


# --------------------------------------------------------------------------------------------------
# The input, cropped and normalized, read in blocks


def _chunk_rows(plane_voxels: int, channels: int = 1) -> int:
    return max(1, _CHUNK_BYTES // max(1, 4 * plane_voxels * channels))


def _along(axis: int, start: int, stop: int) -> tuple:
    return (slice(None),) * axis + (slice(start, stop),)


def _bounding_box(transposed: np.ndarray) -> list[list[int]]:
    """nnU-Net's ``get_bbox_from_mask(create_nonzero_mask(data))`` from per-axis projections of the mask."""
    shape = transposed.shape[1:]
    projections = [np.zeros(n, dtype=bool) for n in shape]
    rows = _chunk_rows(int(np.prod(shape[1:])), transposed.shape[0])
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        mask = None
        for channel in range(transposed.shape[0]):
            # nnU-Net tests the float32 copy: a float64 value below float32's range counts as zero.
            nonzero = np.asarray(transposed[channel, start:stop], dtype=np.float32) != 0
            mask = nonzero if mask is None else np.logical_or(mask, nonzero, out=mask)
        projections[0][start:stop] |= mask.any(axis=(1, 2))
        projections[1] |= mask.any(axis=(0, 2))
        projections[2] |= mask.any(axis=(0, 1))
    box = []
    for n, projection in zip(shape, projections):
        hits = np.flatnonzero(projection)
        # An axis without any non-zero voxel keeps its whole extent, as get_bbox_from_mask does.
        box.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, int(n)])
    return box


def _filled_mask(cropped: np.ndarray) -> np.ndarray:
    """nnU-Net's int8 crop mask (0 inside the filled non-zero mask, -1 outside), on the crop box only."""
    from scipy.ndimage import binary_fill_holes

    shape = cropped.shape[1:]
    mask = np.zeros(shape, dtype=bool)
    rows = _chunk_rows(int(np.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        for channel in range(cropped.shape[0]):
            mask[start:start + rows] |= np.asarray(cropped[channel, start:start + rows], dtype=np.float32) != 0
    mask = binary_fill_holes(mask)
    return np.where(mask, np.int8(0), np.int8(-1))


class _Channel:
    """One channel of the transposed, cropped input, normalized as nnU-Net does, read in blocks."""

    def __init__(self, raw: np.ndarray, normalizer, normalized: Optional[np.ndarray] = None):
        self.raw = raw  # a view of the caller's array (any dtype)
        self.normalizer = normalizer
        self.normalized = normalized  # float32, when the scheme needed the whole channel
        self.shape = raw.shape

    @classmethod
    def open(cls, data: np.ndarray, channel: int, order: list, crop: tuple, normalizer, mask) -> "_Channel":
        raw = data[channel].transpose(order)[crop]
        if _is_elementwise(normalizer):
            return cls(raw, normalizer)
        # nnU-Net's ``data.astype(np.float32)`` for this channel: same layout (order K), so the view
        # below has nnU-Net's strides and numpy's reductions over it loop the same way.
        copy = np.asarray(data[channel]).astype(np.float32)
        view = copy.transpose(order)[crop]
        result = normalizer.run(view, mask if _reads_mask(normalizer) else None)
        if result is not view:
            view[...] = result  # nnU-Net's ``data[c] = normalizer.run(...)``
        return cls(raw, normalizer, view)

    def rows(self, axis: int, start: int, stop: int) -> np.ndarray:
        index = _along(axis, start, stop)
        if self.normalized is not None:
            return self.normalized[index]
        block = np.array(self.raw[index], dtype=np.float32)  # nnU-Net's astype(float32), one block
        result = self.normalizer.run(block, None)
        return np.asarray(result, dtype=np.float32)

    def value_range(self) -> tuple[float, float]:
        """min and max as skimage's clip takes them from the float64 channel (NaN-aware like it)."""
        if self.normalized is not None:
            low, high = np.min(self.normalized), np.max(self.normalized)
            if np.isnan(low):
                low, high = np.nanmin(self.normalized), np.nanmax(self.normalized)
            return float(low), float(high)
        rows = _chunk_rows(int(np.prod(self.shape[1:])))
        lows, highs = [], []
        for start in range(0, self.shape[0], rows):
            block = self.rows(0, start, min(start + rows, self.shape[0]))
            lows.append(np.min(block))
            highs.append(np.max(block))
        low, high = np.min(lows), np.max(highs)
        if np.isnan(low):
            low, high = np.nanmin(lows), np.nanmax(highs)
        return float(low), float(high)


# --------------------------------------------------------------------------------------------------
# Resampling one channel


def _zoom_coordinates(n_in: int, n_out: int, pad: int) -> np.ndarray:
    """zoom_shift's input coordinates with ``grid_mode``: ``((o + 0.5) * (n_in / n_out) - 0.5) + pad``."""
    return ((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5) + float(pad)


def _support(coordinates: np.ndarray, order: int) -> tuple[int, int]:
    """The first and last coefficient index the spline of ``order`` reads at these coordinates."""
    if order & 1:
        starts = np.floor(coordinates).astype(np.int64) - order // 2
    else:
        starts = np.floor(coordinates + 0.5).astype(np.int64) - order // 2
    return int(starts.min()), int(starts.max()) + order


def _edge_pad(block: np.ndarray, pad: int) -> None:
    """Fill the ``pad`` outer voxels of every axis with the nearest inner one (``np.pad(mode='edge')``)."""
    for axis in range(block.ndim):
        n = block.shape[axis]
        first = block[_along(axis, pad, pad + 1)]
        last = block[_along(axis, n - pad - 1, n - pad)]
        block[_along(axis, 0, pad)] = first
        block[_along(axis, n - pad, n)] = last


def _resample_isotropic(channel: _Channel, out: np.ndarray, order: int, slab_rows: int) -> None:
    """skimage ``resize(order, mode='edge', anti_aliasing=False)`` of the whole channel into ``out``, by slabs."""
    from scipy.ndimage import map_coordinates, spline_filter

    from .resample import _grid

    n_in, n_out = channel.shape, out.shape
    pad = _PAD if order > 1 else 0
    coordinates = [_zoom_coordinates(i, o, pad) for i, o in zip(n_in, n_out)]
    low, high = channel.value_range()
    margin = margin_rows(order)
    chunk = _chunk_rows(int(np.prod(n_in[1:])))
    for start in range(0, n_out[0], max(1, int(slab_rows))):
        stop = min(start + slab_rows, n_out[0])
        first, last = _support(coordinates[0][start:stop], order)
        # In input rows: the support less the padding, widened by the pre-filter's margin.
        lo = max(0, first - pad - margin)
        hi = min(n_in[0], last - pad + 1 + margin)
        block = np.empty((hi - lo + 2 * pad, n_in[1] + 2 * pad, n_in[2] + 2 * pad), dtype=np.float64)
        inner = (slice(pad, pad + n_in[1]), slice(pad, pad + n_in[2]))
        for row in range(lo, hi, chunk):
            block[(slice(pad + row - lo, pad + min(row + chunk, hi) - lo), *inner)] = \
                channel.rows(0, row, min(row + chunk, hi))
        if pad:
            _edge_pad(block, pad)
            spline_filter(block, order, output=block, mode="nearest")  # line by line, so in place is exact
        # The block's first row is input row lo: shifting by an integer is exact in float64.
        grid = _grid([coordinates[0][start:stop] - lo, coordinates[1], coordinates[2]])
        result = map_coordinates(block, grid, order=order, mode="nearest", prefilter=False, output=np.float64)
        del block, grid
        np.clip(result, np.asarray(low), np.asarray(high), out=result)  # skimage's _clip_warp_output
        out[start:stop] = result
        del result


def _resample_separate(channel: _Channel, out: np.ndarray, resampling: DataResampling) -> None:
    """nnU-Net's anisotropic path: each input slice along the low-resolution axis resized in-plane with
    ``resize``, then the nearest slice along the axis (``order_z=0``), one output slice at a time."""
    from skimage.transform import resize

    from .resample import axis_sampling

    axis = resampling.separate_axis
    n_in, n_out = channel.shape[axis], out.shape[axis]
    plane_shape = [n for a, n in enumerate(out.shape) if a != axis]
    nearest = axis_sampling(n_in, n_out, 0).low
    cached, resized = -1, None
    for j in range(n_out):
        k = int(nearest[j])
        if k != cached:
            plane = np.take(channel.rows(axis, k, k + 1), 0, axis=axis).astype(np.float64)
            resized = resize(plane, plane_shape, resampling.order, mode="edge", anti_aliasing=False)
            cached = k
        out[(slice(None),) * axis + (j,)] = resized


# --------------------------------------------------------------------------------------------------
# The entry point


def preprocess(predictor, data: np.ndarray, properties: dict, slab_rows: Optional[int] = None):
    """``run_case_npy(data, None, properties, ...)``'s image and properties, computed slab by slab.

    Args:
        predictor: an initialised ``nnUNetPredictor``.
        data: ``(channels, x, y, z)`` image in the reader's axis order, any real dtype (not modified).
        properties: ``{"spacing": [...]}`` in the same order; a copy is returned with nnU-Net's
            ``shape_before_cropping``, ``bbox_used_for_cropping`` and
            ``shape_after_cropping_and_before_resampling`` added.
        slab_rows: output rows (network grid, first axis) per resampling slab; None picks the rows
            of about 512 MB.

    Returns:
        ``(image, properties)``: the float32 ``(channels, *network grid)`` image nnU-Net's
        preprocessor returns, and the properties.
    """
    import copy

    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    cm, pm = predictor.configuration_manager, predictor.plans_manager
    props = copy.deepcopy(properties)
    reason = unsupported_reason(predictor) if data.ndim == 4 else f"{data.ndim - 1}D data"
    if reason is None:
        original_spacing = [props["spacing"][i] for i in pm.transpose_forward]
        target = list(cm.spacing)
        if len(target) < 3:
            target = [original_spacing[0], *target]
        resampling = data_resampling(cm, original_spacing, target)
        if resampling is None:
            reason = "order_z other than 0 on the anisotropic path"
    if reason is not None:
        logger.warning("%s: preprocessing the whole image with nnU-Net (memory is not bounded in this phase)",
                       reason)
        image, _, props = cm.preprocessor_class(verbose=False).run_case_npy(
            data, None, props, pm, cm, predictor.dataset_json)
        return image, props

    order = [int(i) for i in pm.transpose_forward]
    transposed = data.transpose([0, *[i + 1 for i in order]])
    props["shape_before_cropping"] = transposed.shape[1:]
    box = _bounding_box(transposed)
    props["bbox_used_for_cropping"] = box
    crop = tuple(slice(lo, hi) for lo, hi in box)
    cropped_shape = tuple(hi - lo for lo, hi in box)
    props["shape_after_cropping_and_before_resampling"] = cropped_shape
    new_shape = tuple(int(v) for v in compute_new_shape(cropped_shape, original_spacing, target))

    normalizers = [_normalizer(cm, pm, c) for c in range(data.shape[0])]
    mask = None
    if any(_reads_mask(n) for n in normalizers):
        mask = _filled_mask(transposed[(slice(None), *crop)])
    image = np.empty((data.shape[0], *new_shape), dtype=np.float32)
    if slab_rows is None:
        memory = preprocessing_memory(predictor, data.shape[1:], cropped_shape, new_shape, properties["spacing"])
        slab_rows = memory.rows_within(memory.fixed + 512 * 1024 ** 2)
    for index, normalizer in enumerate(normalizers):
        channel = _Channel.open(data, index, order, crop, normalizer, mask)
        out = image[index]
        if cropped_shape == new_shape:
            # nnU-Net returns the normalized image unchanged when no axis changes size.
            rows = _chunk_rows(int(np.prod(new_shape[1:])))
            for start in range(0, new_shape[0], rows):
                out[start:start + rows] = channel.rows(0, start, min(start + rows, new_shape[0]))
        elif resampling.separate_axis is not None:
            _resample_separate(channel, out, resampling)
        else:
            _resample_isotropic(channel, out, resampling.order, slab_rows)
        del channel
    return image, props


__all__ = ["preprocess", "preprocessing_memory", "PreprocessingMemory", "margin_rows", "unsupported_reason"]
