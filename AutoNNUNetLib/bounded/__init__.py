"""Bounded-memory prediction: nnU-Net's labels with a peak that follows the tile, not the volume.

- :mod:`.predict` - :func:`predict_bounded`, the one entry point, and :func:`plan_prediction`;
- :mod:`.budget` - the memory plan, ``max_memory_gb`` and :class:`MemoryBudgetError`;
- :mod:`.sliding` - nnU-Net's sliding window with float16 sums, progress and cancel;
- :mod:`.resample` - the export's resampling computed one slab of output rows at a time;
- :mod:`.export` - slabs -> label map (and a probability file) on the original grid.
"""

from __future__ import annotations

from .budget import GIB, MemoryBudgetError, MemoryPlan, plan_memory
from .predict import plan_prediction, predict_bounded
from .sliding import PredictionCancelled

__all__ = ["GIB", "MemoryBudgetError", "MemoryPlan", "PredictionCancelled", "plan_memory", "plan_prediction",
           "predict_bounded"]
