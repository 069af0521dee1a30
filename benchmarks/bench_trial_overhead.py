"""Per-trial overhead: where the wall time of one short training trial goes.

A search runs hundreds of short trials, so everything that is not training (building the
trainer and data loaders, validation, writing the checkpoint and record) is paid hundreds of
times. Goal: everything but training under 10% of the trial.

The trial is nnU-Net's default configuration on the hippocampus cases in ../shared/data, one fold,
on the CPU, with a budget like a low PriorBand rung of the CPU profile. Wall time of the whole
``train()`` call is measured around it, so nothing escapes the split.

Usage: python benchmarks/bench_trial_overhead.py [--epochs 5] [--iterations-per-epoch 10]
Writes the table to docs/benchmarks.md under "## Per-trial overhead".
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--iterations-per-epoch", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    args = parser.parse_args()

    from AutoNNUNetLib.config import TrialConfig
    from AutoNNUNetLib.dataset import build_dataset, detect_source
    from AutoNNUNetLib.fingerprint import plan_and_preprocess
    from AutoNNUNetLib.trainer import model_dir_name, train
    from AutoNNUNetLib.workspace import Workspace

    with tempfile.TemporaryDirectory(prefix="bench-trial-") as tmp:
        workspace = Workspace(Path(tmp) / "ws")
        build_dataset(detect_source(HIPPOCAMPUS), workspace, dataset_id=4, name="Hippocampus")
        plan_and_preprocess(workspace)
        rows = []
        for run in range(2):  # the first run also pays one-time imports and caches
            start = time.perf_counter()
            result = train(workspace, TrialConfig(), Path(tmp) / f"trial{run}" / model_dir_name(),
                           epochs=args.epochs, max_epochs=args.epochs * 9, iterations_per_epoch=args.iterations_per_epoch,
                           device=args.device, seed=run)
            wall = time.perf_counter() - start
            fold = result.folds[0]
            other = wall - fold.setup_seconds - fold.train_seconds - fold.validation_seconds - fold.save_seconds
            rows.append((run, wall, fold.setup_seconds, fold.train_seconds, fold.validation_seconds,
                         fold.save_seconds, other, result.mean_dice))

    lines = [
        f"Trial: nnU-Net default configuration, hippocampus (60 cases, fold 0: 12 validation cases), "
        f"{args.epochs} epochs x {args.iterations_per_epoch} iterations, device {args.device}, "
        f"{platform.processor() or platform.machine()}; run 0 includes first-use imports.",
        "",
        "| run | wall s | setup s | training s | validation s | saving s | other s | non-training share | Dice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run, wall, setup, training, validation, saving, other, dice in rows:
        share = (wall - training) / wall
        lines.append(f"| {run} | {wall:.1f} | {setup:.1f} | {training:.1f} | {validation:.1f} | {saving:.2f} | "
                     f"{other:.2f} | {share:.1%} | {dice:.3f} |")
    lines += ["", "Goal: non-training share under 10% (warm run)."]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("Per-trial overhead", table)


if __name__ == "__main__":
    main()
