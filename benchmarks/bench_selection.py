"""Model selection benchmark (issue 10): what nnU-Net's selection adds after a search, and its cost.

Hippocampus (the 60 cases in ../shared/data), CPU, short final length F (``--epochs`` x
``--iterations``). Two candidates, as a search would hand over: nnU-Net's default (the
"incumbent") and a smaller network (base 16 features, learning rate 0.02; a "Pareto point").
Both are finalized on all 5 folds; then:

- ``incumbent, fold 0``: the incumbent's fold-0 model on fold 0's validation cases (what a
  one-fold search sees);
- ``incumbent, 5-fold CV``: the incumbent's cross-validation Dice over all 60 cases (each case
  predicted by the fold that did not train on it); at inference the 5 folds are averaged;
- ``pareto1, 5-fold CV``;
- ``best pairwise ensemble``: softmax average of both candidates, cross-validated the same way;
- ``selected + postprocessing``: nnU-Net's choice (best of the above) with its largest-component
  postprocessing, decided and scored on the cross-validation.

Inference seconds per volume: measured on ``--volumes`` images
(training images: the shared data has no imagesTs) after one warm-up call, for each way of predicting (1 fold; 5 folds; 2 x 5 folds; + postprocessing).

Goal (issue 10): the selected model's CV Dice is at least the best single candidate's (by
construction); the page says by how much it improves and what it costs at inference.

Resumable: the workspace and the selection root live in WORK; re-running reuses finished folds.

Usage: python benchmarks/bench_selection.py [--work DIR] [--epochs 3] [--iterations 10] [--volumes 5] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"


def prepare_workspace(work: Path):
    from AutoNNUNetLib.dataset import build_dataset, detect_source
    from AutoNNUNetLib.fingerprint import plan_and_preprocess
    from AutoNNUNetLib.workspace import Workspace

    workspace = Workspace(work / "workspace")
    if not any((work / "workspace" / "nnUNet_preprocessed").glob("Dataset*/nnUNetPlans_3d_fullres")):
        build_dataset(detect_source(HIPPOCAMPUS), workspace, dataset_id=4, name="Hippocampus", overwrite=True)
        plan_and_preprocess(workspace, num_processes=2)
    return workspace


def cv_dice_of_fold(entry, fold: int, references, labels, ending: str) -> float:
    from AutoNNUNetLib.selection.crossval import fold_predictions_current, read_label_map
    from AutoNNUNetLib.selection.scores import score_cases

    marker = fold_predictions_current(entry.model_dir, fold, False)
    predictions = {c: read_label_map(entry.model_dir / f"fold_{fold}" / "validation" / f"{c}{ending}")
                   for c in marker["cases"]}
    return score_cases(predictions, {c: references[c] for c in marker["cases"]}, labels).foreground_mean


def time_inference(selection, volumes) -> float:
    selection.predict(volumes[0])  # warm-up: lazy set-up is not a per-volume cost
    seconds = []
    for channels in volumes:
        start = time.perf_counter()
        selection.predict(channels)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/autonnunet-bench-selection"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--volumes", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print the section, do not edit docs/benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("nnUNet_compile", "false")

    from AutoNNUNetLib.config import TrialConfig
    from AutoNNUNetLib.imaging import Volume
    from AutoNNUNetLib.selection.candidates import Candidate
    from AutoNNUNetLib.selection.choose import foreground_labels, select, write_selection
    from AutoNNUNetLib.selection.crossval import read_label_map
    from AutoNNUNetLib.selection.finalize import finalize, load_finalized
    from AutoNNUNetLib.selection.postprocessing import PostprocessingPlan
    from AutoNNUNetLib.selection.predictor import Selection
    from AutoNNUNetLib.selection.report import format_report

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    workspace = prepare_workspace(args.work)
    candidates = [Candidate("incumbent", TrialConfig(), origin="incumbent"),
                  Candidate("pareto1", TrialConfig(base_num_features=16, initial_lr=0.02), origin="pareto")]
    root = args.work / f"selection-{args.epochs}x{args.iterations}"
    t0 = time.perf_counter()
    os.environ["nnUNet_n_proc_DA"] = "0"
    finalize(workspace, candidates, root, epochs=args.epochs, iterations_per_epoch=args.iterations, device="cpu", seed=0,
             progress=lambda e: print(e.data.get("message", ""), flush=True) if e.kind == "progress" else None)
    finalize_minutes = (time.perf_counter() - t0) / 60
    result = select(root)
    state = load_finalized(root)
    by_name = {e.candidate.name: e for e in state.candidates}
    dataset_json = workspace.load_dataset_json()
    labels = list(foreground_labels(dataset_json))
    ending = dataset_json.get("file_ending", ".nii.gz")
    gt = workspace.preprocessed_dataset / "gt_segmentations"
    references = {p.name[: -len(ending)]: read_label_map(p) for p in gt.glob(f"*{ending}")}

    singles = {s.members[0]: s for s in result.scores if len(s.members) == 1}
    ensemble = next(s for s in result.scores if len(s.members) == 2)
    best_single = max(s.score.foreground_mean for s in singles.values())
    fold0 = cv_dice_of_fold(by_name["incumbent"], 0, references, labels, ending)

    # The shared data has no test images; timing does not need labels, so training images serve.
    held_out = sorted((HIPPOCAMPUS / "imagesTr").glob("hippocampus_*.nii.gz"))[: args.volumes + 1]
    volumes = [[Volume.read(p)] for p in held_out]
    both = write_selection(state, ["incumbent", "pareto1"], PostprocessingPlan(), write=False)
    timings = {
        "incumbent, fold 0": time_inference(Selection(root, device="cpu", folds=[0], members=["incumbent"],
                                                      result=both, postprocess=False), volumes),
        "incumbent, 5 folds": time_inference(Selection(root, device="cpu", members=["incumbent"], result=both,
                                                       postprocess=False), volumes),
        "ensemble, 2 x 5 folds": time_inference(Selection(root, device="cpu", result=both, postprocess=False), volumes),
        "selected + postprocessing": time_inference(Selection(root, device="cpu"), volumes),
    }
    selected = " + ".join(m["name"] for m in result.members)
    plan = result.postprocessing
    rows = [
        ("incumbent, fold 0 (what a one-fold search sees)", fold0, "fold 0's 12 validation cases",
         timings["incumbent, fold 0"]),
        ("incumbent, 5-fold CV", singles["incumbent"].score.foreground_mean, "60 cases", timings["incumbent, 5 folds"]),
        ("pareto1, 5-fold CV", singles["pareto1"].score.foreground_mean, "60 cases", float("nan")),
        ("best pairwise ensemble (incumbent + pareto1), 5-fold CV", ensemble.score.foreground_mean, "60 cases",
         timings["ensemble, 2 x 5 folds"]),
        (f"selected ({selected}) + postprocessing", plan.dice_after, "60 cases", timings["selected + postprocessing"]),
    ]
    table = ["| model | CV Dice (mean of Anterior/Posterior) | cases | inference s/volume |", "|---|---|---|---|"]
    for name, dice, cases, seconds in rows:
        table.append(f"| {name} | {dice:.4f} | {cases} | {'-' if seconds != seconds else f'{seconds:.2f}'} |")
    kept = [s for s in plan.kept]
    met = plan.dice_after >= best_single - 1e-12
    gain = plan.dice_after - best_single
    cost = timings["selected + postprocessing"] / timings["incumbent, 5 folds"]
    body = f"""`python benchmarks/bench_selection.py --epochs {args.epochs} --iterations {args.iterations} --volumes {args.volumes}`
on {platform.machine()}, {os.cpu_count()} cores, CPU only, shared machine (1-min load average {load_start:.1f} at the
start, {os.getloadavg()[0]:.1f} at the end). Hippocampus (60 cases), F = {args.epochs} epochs x {args.iterations}
iterations per fold, two candidates (nnU-Net's default as the incumbent; base 16 features and learning rate 0.02 as
a Pareto point), both finalized on 5 folds ({finalize_minutes:.1f} min for the 10 folds including the
cross-validation predictions, TTA off). Inference: median of {args.volumes} volumes (imagesTr) after a warm-up.

{chr(10).join(table)}

Postprocessing decided on the cross-validation: {', '.join(('all foreground' if s.kind == 'all_foreground' else f'label {s.target}') for s in kept) or 'no step kept'}
(tried: {', '.join(f"{'all foreground' if s.kind == 'all_foreground' else f'label {s.target}'} {'kept' if s.kept else 'not kept'}" for s in plan.steps)}).

- Goal (the selected model's CV Dice is at least the best single candidate's): **{'met' if met else 'not met'}**;
  selected {plan.dice_after:.4f} vs best single {best_single:.4f} ({100 * gain:+.2f} Dice points), at
  {cost:.2f}x the inference time of the incumbent's 5-fold model. The fold-0 figure is a different case set (12
  cases), shown because it is what a one-fold search reports.
- The gains are measured on the cross-validation the choice was made on (nnU-Net's protocol too), so they include
  the optimism of picking the best of {len(result.scores)} models and of {len(plan.steps)} postprocessing steps on the same 60 cases;
  an unbiased figure needs held-out labeled cases (the shared data has none).
- Total benchmark time {(time.perf_counter() - started) / 60:.1f} min.

The report table of `autonnunet select` for this run:

{format_report(result, markdown=True)}"""
    print(body)
    if not args.no_write:
        write_section("Model selection", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
