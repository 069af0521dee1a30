"""The memory budget is honoured on a large generated volume, and refused up front when too small.

Peak memory is measured two ways in a fresh process (so the session's earlier work does not count):
``tracemalloc`` (every numpy buffer) and the kernel's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` once the model is loaded), both against the same budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from AutoNNUNetLib.bounded import GIB, MemoryBudgetError, plan_prediction, predict_bounded

SHAPE = (256, 256, 200)
#: Input spacing finer than the model's 1 mm, so that the export upsamples (the expensive direction).
SPACING = (0.35, 0.35, 0.35)
BUDGET_GB = 0.55

_CHILD = textwrap.dedent(
    """
    import contextlib, io, json, sys, time, tracemalloc
    import numpy as np, torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from AutoNNUNetLib.bounded import predict_bounded

    model_dir, budget = sys.argv[1], float(sys.argv[2])
    shape, spacing = tuple(json.loads(sys.argv[3])), json.loads(sys.argv[4])
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"),
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model_dir, use_folds=(0,))
    rng = np.random.default_rng(0)
    image = np.zeros((1, *shape), dtype=np.float32)
    image[0] = rng.integers(0, 4000, size=shape[-1], dtype=np.int32)[None, None, :]  # cheap structure
    image[0, 20:-20, 20:-20] += 3000.0

    def rss_kb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])

    baseline = rss_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS
    tracemalloc.start()
    start = time.perf_counter()
    labels = predict_bounded(predictor, image, {"spacing": spacing}, max_memory_gb=budget)
    seconds = time.perf_counter() - start
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"traced_peak": traced_peak, "rss_peak_added": (rss_kb("VmHWM:") - baseline) * 1024,
                      "seconds": seconds, "labels": np.bincount(labels.ravel()).tolist(),
                      "shape": list(labels.shape)}))
    """
)


def _predictor(model_dir):
    import contextlib
    import io

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))
    return predictor


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_budget_holds_traced_and_resident_peak(trained_model):
    plan = plan_prediction(_predictor(trained_model), (1, *SHAPE), {"spacing": list(SPACING)}, BUDGET_GB)
    assert plan.peak_bytes <= BUDGET_GB * GIB and plan.slabs > 1  # the budget really forces slabs
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(trained_model), str(BUDGET_GB), json.dumps(SHAPE), json.dumps(SPACING)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["shape"] == list(SHAPE)
    assert sum(measured["labels"]) == int(np.prod(SHAPE))
    assert measured["traced_peak"] < BUDGET_GB * GIB, measured
    assert measured["rss_peak_added"] < BUDGET_GB * GIB, measured


def test_too_small_budget_is_refused_before_any_work(trained_model):
    predictor = _predictor(trained_model)
    image = np.zeros((1, *SHAPE), dtype=np.float32)
    events = []
    start = time.perf_counter()
    with pytest.raises(MemoryBudgetError, match=r"max_memory_gb=0.05 cannot hold this prediction.*raise the budget"):
        predict_bounded(predictor, image, {"spacing": list(SPACING)}, max_memory_gb=0.05, progress=events.append,
                        cancel=lambda: pytest.fail("work started"))
    assert time.perf_counter() - start < 5.0
    assert events == []
    for bad in (0, -1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(MemoryBudgetError, match="positive number"):
            predict_bounded(predictor, image, {"spacing": list(SPACING)}, max_memory_gb=bad)
