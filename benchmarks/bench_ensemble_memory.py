"""Ensemble averaging memory (issue 10 / 13): a selection's ensemble of a CT-sized volume.

Two members' class probabilities of a 512 x 512 x 400 volume with 3 classes (float32, 1.26 GB
each, as the bounded path writes them with ``save_probabilities``) are averaged and arg-maxed two
ways, with numpy's allocations traced (``tracemalloc``):

- baseline, whole arrays: every member loaded, summed, divided, arg max over the whole volume
  (what ``nnUNetv2_ensemble`` does per case, and what the selection did before the bounded path);
- ours: :func:`AutoNNUNetLib.selection.ensemble.ensemble_labels_from_files`, memory-mapped files
  averaged slab by slab (default slab budget 512 MB).

Both label maps must be equal. The probabilities are random softmax outputs (the operation's cost
and memory do not depend on the values). The files go to ``--work`` (2.5 GB of disk).

Usage: python benchmarks/bench_ensemble_memory.py [--work DIR] [--shape 400 512 512] [--no-write]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

GB = 1024 ** 3


def write_member(path: Path, shape: tuple, seed: int) -> None:
    """A softmax-like float32 (classes, *spatial) file, written slab by slab (never whole in memory)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    rng = np.random.default_rng(seed)
    for start in range(0, shape[1], 16):
        stop = min(start + 16, shape[1])
        block = rng.random((shape[0], stop - start, *shape[2:]), dtype=np.float32) + 1e-3
        out[:, start:stop] = block / block.sum(0, keepdims=True)
    out.flush()
    del out


def traced(function):
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, peak, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/autonnunet-bench-ensemble"))
    parser.add_argument("--shape", type=int, nargs=3, default=[400, 512, 512])
    parser.add_argument("--no-write", action="store_true", help="print the section, do not edit docs/benchmarks.md")
    args = parser.parse_args()

    from AutoNNUNetLib.selection.ensemble import (
        average_probabilities,
        ensemble_labels_from_files,
        labels_from_probabilities,
    )

    shape = (3, *args.shape)
    args.work.mkdir(parents=True, exist_ok=True)
    paths = [args.work / f"member{i}.npy" for i in range(2)]
    try:
        for seed, path in enumerate(paths):
            write_member(path, shape, seed)

        def whole():
            return labels_from_probabilities(average_probabilities(np.load(p) for p in paths))

        expected, whole_peak, whole_seconds = traced(whole)
        ours, ours_peak, ours_seconds = traced(lambda: ensemble_labels_from_files(paths))
        equal = bool(np.array_equal(expected, ours))
    finally:
        shutil.rmtree(args.work, ignore_errors=True)

    member_gb = np.prod(shape) * 4 / GB
    rows = [("whole arrays (nnUNetv2_ensemble's way; baseline)", whole_peak, whole_seconds),
            ("slab by slab from memory maps (ours)", ours_peak, ours_seconds)]
    table = ["| method | peak traced allocation (GB) | ratio to baseline | seconds |", "|---|---|---|---|"]
    for name, peak, seconds in rows:
        table.append(f"| {name} | {peak / GB:.2f} | {peak / whole_peak:.2f}x | {seconds:.1f} |")
    body = f"""`python benchmarks/bench_ensemble_memory.py --shape {' '.join(map(str, args.shape))}` on {platform.machine()},
{os.cpu_count()} cores. Two members, 3 classes, {' x '.join(map(str, args.shape))} voxels: {member_gb:.2f} GB of float32
probabilities per member on disk. Peak = numpy's allocations traced by `tracemalloc` during the averaging (the
members' predictions themselves are the bounded path's, see "Large volumes").

{chr(10).join(table)}

- Label maps equal: **{'yes' if equal else 'NO'}**.
- The selection's ensemble prediction holds one slab of the sum (default 512 MB budget, or `max_memory_gb`)
  plus the uint8 label map, instead of every member's probabilities, their sum and an int64 arg max."""
    print(body)
    if not args.no_write:
        write_section("Ensemble memory", body)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
