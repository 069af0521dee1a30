"""The memory plan of one bounded prediction: what each phase holds, and the slab size a budget allows.

A prediction goes through three phases whose peaks do not add up (each frees its temporaries):

1. preprocessing (:mod:`.preprocess`: nnU-Net's crop, normalization and resampling, slab by slab):
   the float32 image on the network's grid and one slab of input rows in float64 with the spline
   pre-filter's margin - the slab's row count is what the budget chooses (plans the slab path does
   not reproduce fall back to nnU-Net's ``run_case_npy``, about 34 bytes per input voxel);
2. tiles: the preprocessed image, float16 logit and weight sums on the network's grid, and the
   network's activations for one tile - grows with the network grid and the tile;
3. export: the float16 logits, the label map on the original grid, and one slab of output rows in
   float64/float16 - again the slab's row count is what the budget chooses.

``max_memory_gb`` bounds the memory the prediction adds to the process (the caller's input array
and the loaded model are not counted). A budget below the smallest possible peak (one tile, one
output row) is refused with :class:`MemoryBudgetError` before any work starts. The estimates are
upper bounds (no cropping assumed; coefficients measured with tracemalloc and peak RSS on nnU-Net
2.8.1, see Testing/large/test_bounded_memory.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import AutoNNUNetError

GIB = 1024 ** 3
#: Slab size when no budget is given: large enough that slabs cost nothing in speed.
DEFAULT_SLAB_BYTES = 512 * 1024 ** 2


class MemoryBudgetError(AutoNNUNetError, ValueError):
    """``max_memory_gb`` cannot hold this prediction (one tile, or one output row)."""


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak bytes per phase and the chosen slab (rows of the original grid per step)."""

    limit_bytes: Optional[int]
    preprocessing_bytes: int
    tiles_bytes: int
    export_fixed_bytes: int
    slab_row_bytes: int
    slab_rows: int
    output_rows: int
    tiles: int
    #: Network-grid rows per preprocessing slab (:func:`AutoNNUNetLib.bounded.preprocess.preprocess`).
    preprocessing_rows: int = 0

    @property
    def export_bytes(self) -> int:
        return self.export_fixed_bytes + self.slab_rows * self.slab_row_bytes

    @property
    def peak_bytes(self) -> int:
        return max(self.preprocessing_bytes, self.tiles_bytes, self.export_bytes)

    @property
    def slabs(self) -> int:
        return math.ceil(self.output_rows / self.slab_rows)

    def summary(self) -> str:
        limit = "no budget" if self.limit_bytes is None else f"budget {self.limit_bytes / GIB:.2f} GB"
        return (f"{limit}; planned peak {self.peak_bytes / GIB:.2f} GB (preprocessing "
                f"{self.preprocessing_bytes / GIB:.2f} in slabs of {self.preprocessing_rows} row(s), "
                f"{self.tiles} tiles {self.tiles_bytes / GIB:.2f}, export "
                f"{self.export_bytes / GIB:.2f} in {self.slabs} slab(s) of {self.slab_rows} row(s))")


def tile_working_bytes(configuration_manager, input_channels: int, heads: int, mirroring: bool) -> int:
    """Peak bytes of one tile's forward pass: activations of every stage kept for the skips, plus the
    working copies at full resolution (convolution, normalisation, the decoder's concatenation)."""
    import numpy as np  # here, so a request record can check a budget without numpy

    patch = [int(v) for v in configuration_manager.patch_size]
    kwargs = configuration_manager.network_arch_init_kwargs
    features = [int(f) for f in kwargs.get("features_per_stage", [32])]
    strides = kwargs.get("strides", [[1] * len(patch)] * len(features))
    voxels = float(np.prod(patch))
    scale = np.ones(len(patch))
    stage_voxels = []
    for stride in strides[: len(features)]:
        scale = scale * np.asarray(stride if isinstance(stride, (list, tuple)) else [stride] * len(patch))
        stage_voxels.append(voxels / float(np.prod(scale)))
    skips = sum(f * v for f, v in zip(features, stage_voxels))
    full = features[0] * stage_voxels[0]
    activations = 4 * (2 * skips + 8 * full)
    tile_io = 4 * voxels * (3 * input_channels + (3 if mirroring else 1) * heads)
    return int(activations + tile_io)


def network_shape(input_shape: Sequence[int], spacing: Sequence[float], plans_manager, configuration_manager) -> tuple:
    """The preprocessed (network-grid) shape of an uncropped input: the upper bound before cropping."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    transposed = [int(input_shape[i]) for i in plans_manager.transpose_forward]
    spacing_t = [float(spacing[i]) for i in plans_manager.transpose_forward]
    target = list(configuration_manager.spacing)
    if len(target) < len(transposed):
        target = [spacing_t[0], *target]
    return tuple(int(v) for v in compute_new_shape(transposed, spacing_t, target))


def slab_row_bytes(heads: int, output_plane: int, input_plane: int, rows_ratio: float,
                   separate_ratio: float, probabilities: bool) -> int:
    """Bytes per output row of one export slab (``output_plane`` voxels per row)."""
    per_voxel = (
        heads * 2  # the float16 slab of every class
        + 3 * 8  # map_coordinates' coordinate grid
        + 8 * max(1.0, 2 * separate_ratio)  # float64 result (stacked slices on the anisotropic path)
        + 8  # argmax indices (int64)
        + (heads * 8 if probabilities else 0)  # softmax in float32 and the file buffer
    )
    return int(per_voxel * output_plane + 8 * input_plane * max(rows_ratio, 1.0) * 1.5)


def check_budget_value(max_memory_gb: Optional[float]) -> Optional[float]:
    """``max_memory_gb`` as given, if it is None or a positive finite number of GB."""
    if max_memory_gb is not None:
        if isinstance(max_memory_gb, bool) or not isinstance(max_memory_gb, (int, float)) \
                or not math.isfinite(max_memory_gb) or max_memory_gb <= 0:
            raise MemoryBudgetError(f"max_memory_gb must be a positive number of GB, got {max_memory_gb!r}")
    return max_memory_gb


def plan_memory(
    predictor,
    input_shape: Sequence[int],
    spacing: Sequence[float],
    max_memory_gb: Optional[float] = None,
    probabilities: bool = False,
    network_grid: Optional[Sequence[int]] = None,
    cropped_shape: Optional[Sequence[int]] = None,
    tile_bytes: Optional[int] = None,
) -> MemoryPlan:
    """Plan a prediction of an input of spatial ``input_shape`` (array order) at ``spacing``.

    Before preprocessing, ``network_grid`` and ``cropped_shape`` are unknown and bounded by the
    uncropped shapes; after it the caller re-plans with the real ones (a smaller or equal peak).
    Raises :class:`MemoryBudgetError` if the budget cannot hold the smallest plan.
    """
    import numpy as np  # here, so a request record can check a budget without numpy

    from .preprocess import preprocessing_memory
    from .sliding import tile_count

    check_budget_value(max_memory_gb)
    cm, pm = predictor.configuration_manager, predictor.plans_manager
    heads = int(predictor.label_manager.num_segmentation_heads)
    channels = len(predictor.dataset_json["channel_names"])
    original = tuple(int(v) for v in input_shape)
    transposed = tuple(original[i] for i in pm.transpose_forward)
    cropped = tuple(int(v) for v in (cropped_shape or transposed))
    grid = tuple(int(v) for v in (network_grid or network_shape(input_shape, spacing, pm, cm)))
    patch = [int(v) for v in cm.patch_size]
    padded = tuple(max(g, p) for g, p in zip(grid, patch))
    n_input, n_grid, n_padded = int(np.prod(original)), int(np.prod(grid)), int(np.prod(padded))
    folds = len(predictor.list_of_parameters)

    label_bytes = n_input * (1 if len(predictor.label_manager.foreground_labels) < 255 else 2)
    logits_bytes = heads * n_padded * 2
    if tile_bytes is None:
        tile_bytes = tile_working_bytes(cm, channels, heads, bool(predictor.use_mirroring))
    tiles_bytes = (channels * n_grid * 4 + (channels * n_padded * 4 if padded != grid else 0)
                   + logits_bytes + n_padded * 2 + (heads * n_grid * 2 if folds > 1 else 0) + tile_bytes)
    export_fixed = logits_bytes + label_bytes + (heads * n_grid * 2 if folds > 1 else 0)
    output_plane = int(np.prod(cropped[1:]))
    input_plane = int(np.prod(grid[1:]))
    rows_ratio = grid[0] / cropped[0]
    separate_ratio = max(g / c for g, c in zip(grid, cropped))
    row_bytes = slab_row_bytes(heads, output_plane, input_plane, rows_ratio, separate_ratio, probabilities)
    preprocessing = preprocessing_memory(predictor, original, cropped, grid, spacing)
    tiles = tile_count(predictor, grid) * folds

    limit = None if max_memory_gb is None else int(max_memory_gb * GIB)
    smallest = max(preprocessing.bytes_for(1), tiles_bytes, export_fixed + row_bytes)
    if limit is not None and smallest > limit:
        phase = max((preprocessing.bytes_for(1), "preprocessing"),
                    (tiles_bytes, "one tile with the network-grid sums"),
                    (export_fixed + row_bytes, "the label map and one output row"))[1]
        raise MemoryBudgetError(
            f"max_memory_gb={max_memory_gb:g} cannot hold this prediction: it needs at least "
            f"{smallest / GIB:.2f} GB ({phase}) for a {'x'.join(map(str, original))} input "
            f"({tiles} tiles of {'x'.join(map(str, patch))}); raise the budget to {math.ceil(smallest / GIB * 10) / 10:g}"
        )
    if limit is None:
        rows = max(1, DEFAULT_SLAB_BYTES // max(row_bytes, 1))
    else:
        rows = max(1, (limit - export_fixed) // max(row_bytes, 1))
    rows = int(min(rows, cropped[0]))
    # Slabs beyond DEFAULT_SLAB_BYTES save no time (the pre-filter's margins are already a small part).
    pre_rows = preprocessing.rows_within(preprocessing.fixed + DEFAULT_SLAB_BYTES)
    if limit is not None:
        pre_rows = min(pre_rows, preprocessing.rows_within(limit))
    return MemoryPlan(limit, preprocessing.bytes_for(pre_rows), tiles_bytes, export_fixed, row_bytes, rows,
                      cropped[0], tiles, pre_rows)
