"""Bounded-memory prediction: nnU-Net's labels with a peak that follows the tile, not the volume.

- :mod:`.predict` - :func:`predict_bounded`, the one entry point, and :func:`plan_prediction`;
- :mod:`.budget` - the memory plan, ``max_memory_gb`` and :class:`MemoryBudgetError`;
- :mod:`.preprocess` - nnU-Net's crop, normalization and resampling of the input, slab by slab;
- :mod:`.sliding` - nnU-Net's sliding window with float16 sums, progress and cancel;
- :mod:`.resample` - the export's resampling computed one slab of output rows at a time;
- :mod:`.export` - slabs -> label map (and a probability file) on the original grid.

Names load on first use, so a request record can check a budget without numpy or torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_NAMES = {"GIB": "budget", "MemoryBudgetError": "budget", "MemoryPlan": "budget", "plan_memory": "budget",
          "check_budget_value": "budget", "plan_prediction": "predict", "predict_bounded": "predict",
          "PredictionCancelled": "sliding", "preprocess": "preprocess"}

__all__ = sorted(_NAMES)

__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
