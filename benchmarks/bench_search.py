"""Search benchmark: nnU-Net default vs random search vs PriorBand vs Regularized PriorBand.

Every method gets the same wall-clock budget on the hippocampus cases in ../shared/data (fold 0,
validation Dice on all of fold 0's validation cases, CPU):

- default: nnU-Net's default configuration, its epoch count chosen so it fills the budget (the
  poly LR schedule runs against that count), validated after each eighth of the schedule;
- random: random search over the ``hpo_nas`` space, every trial at full fidelity;
- priorband: PriorBand (runtime weight 0) over ``hpo_nas``, fidelity = epochs;
- regularized: Regularized PriorBand (runtime weight 1), same space and fidelity.

Reported: best validation Dice over time, final Dice (the search's incumbent: best at the highest
fidelity reached; and best at any fidelity), the time to reach the default's final Dice, and the
training seconds per epoch of each incumbent (every method uses the same iterations per epoch).

Usage: python benchmarks/bench_search.py [--budget-minutes 20] [--iterations-per-epoch 10]
       [--methods default,random,priorband,regularized] [--work DIR] [--no-write]
Writes the results to docs/benchmarks.md under "## Search" (raw numbers to WORK/bench_search.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"
METHODS = ("default", "random", "priorband", "regularized")


def run_default(workspace, work: Path, budget: float, iterations: int, device: str) -> dict[str, Any]:
    """nnU-Net's default for the whole budget, validated in chunks (resume keeps it one run)."""
    from AutoNNUNetLib.config import TrialConfig
    from AutoNNUNetLib.trainer import model_dir_name, train

    # Calibrate the epoch count on a throwaway epoch (not counted in the budget).
    probe = train(workspace, TrialConfig(), work / "default_probe" / model_dir_name(), epochs=1, max_epochs=1,
                  iterations_per_epoch=iterations, device=device, seed=0, max_validation_cases=1)
    fold = probe.folds[0]
    per_epoch = fold.train_seconds
    overhead = fold.setup_seconds + fold.save_seconds
    # Eight validations over the run; the full validation costs about 12x the probe's one case.
    validation = 12.0 * fold.validation_seconds
    epochs = max(8, int((budget - 8 * (overhead + validation)) / per_epoch))
    chunk = max(1, epochs // 8)
    curve = []
    start = time.time()
    previous = None
    reached = 0
    result = None
    while reached < epochs:
        target = min(epochs, reached + chunk)
        out = work / "default" / f"epochs_{target:04d}" / model_dir_name()
        result = train(workspace, TrialConfig(), out, epochs=target, max_epochs=epochs,
                       iterations_per_epoch=iterations, device=device, seed=0, resume_from=previous)
        previous, reached = out, target
        curve.append({"seconds": time.time() - start, "dice": result.mean_dice, "epochs": target})
        if time.time() - start > budget:
            break  # calibration was optimistic (e.g. a busier machine): the budget is the budget
    assert result is not None
    return {
        "method": "default", "epochs": epochs, "epochs_reached": reached, "curve": curve, "final_dice": result.mean_dice,
        "best_dice": max(p["dice"] for p in curve), "seconds_per_epoch": result.train_seconds / result.epochs,
        "elapsed": time.time() - start, "dice_per_class": result.dice_per_class,
    }


def run_searcher(method: str, workspace, work: Path, budget: float, iterations: int, device: str,
                 min_epochs: int, max_epochs: int, eta: int) -> dict[str, Any]:
    from AutoNNUNetLib.search import SearchSettings, run_search

    settings = SearchSettings.from_profile(
        "default", space="hpo_nas", min_epochs=min_epochs, max_epochs=max_epochs, eta=eta,
        iterations_per_epoch=iterations, wall_time=budget, device=device, seed=0,
        optimizer="random" if method == "random" else "priorband",
        runtime_weight=1.0 if method == "regularized" else 0.0)
    start = time.time()
    results = run_search(workspace, work / method, settings)
    elapsed = time.time() - start
    done = sorted((t for t in results.trials if t.state == "success" and t.mean_dice is not None),
                  key=lambda t: t.finished)
    curve = []
    best = -math.inf
    for trial in done:
        if trial.mean_dice > best:
            best = trial.mean_dice
            curve.append({"seconds": trial.finished - start, "dice": best, "trial": trial.trial_id,
                          "epochs": trial.epochs})
    incumbent = results.best
    return {
        "method": method, "curve": curve, "elapsed": elapsed, "trials": len(results.trials),
        "finished_trials": len(done), "epochs_trained": results.budget.get("epochs_used"),
        "final_dice": incumbent.mean_dice if incumbent else None,
        "final_epochs": incumbent.epochs if incumbent else None,
        "best_dice": max((t.mean_dice for t in done), default=None),
        "seconds_per_epoch": incumbent.seconds_per_epoch if incumbent else None,
        "incumbent": incumbent.trial_id if incumbent else None,
        "incumbent_config": _changes(incumbent.config) if incumbent else None,
        "dice_per_class": incumbent.dice_per_class if incumbent else None,
    }


def _changes(config: dict) -> str:
    from AutoNNUNetLib.config import TrialConfig

    default = TrialConfig().to_dict()
    out = []
    for key, value in config.items():
        if value != default.get(key) and value is not None:
            out.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(out) or "nnU-Net default"


def time_to_reach(curve: list[dict], target: Optional[float]) -> Optional[float]:
    if target is None:
        return None
    return next((p["seconds"] for p in curve if p["dice"] is not None and p["dice"] >= target), None)


def _goals(runs: dict[str, dict], budget: float) -> list[str]:
    """The issue's two goals, checked against the measured runs."""
    default = runs.get("default")
    if default is None:
        return ["Goals not checked: no default run."]
    target = default["final_dice"]
    reaches = {m: time_to_reach(runs[m]["curve"], target) for m in ("random", "priorband", "regularized") if m in runs}
    fastest = min((t for t in reaches.values() if t is not None), default=None)
    first = (f"reached by {', '.join(m for m, t in reaches.items() if t is not None)} after {fastest / 60:.1f} min"
             if fastest is not None else "not reached by any search within the budget")
    verdict = "met" if fastest is not None and fastest <= budget / 3 else "**not met**"
    lines = [f"- Goal 1 (a searched incumbent reaches the default's final Dice {target:.4f} within a third of the "
             f"budget, {budget / 180:.1f} min): {verdict}; {first}."]
    regularized = runs.get("regularized")
    if regularized and regularized.get("seconds_per_epoch") and regularized.get("final_dice") is not None:
        speedup = default["seconds_per_epoch"] / regularized["seconds_per_epoch"]
        ok = speedup >= 2.0 and regularized["final_dice"] >= target
        lines.append(f"- Goal 2 (Regularized PriorBand's incumbent trains at least 2x faster per epoch than the default "
                     f"at no worse Dice): {'met' if ok else '**not met**'}; {speedup:.2f}x faster per epoch, Dice "
                     f"{regularized['final_dice']:.4f} vs {target:.4f}.")
    return lines


def _reading(runs: dict[str, dict], args: argparse.Namespace) -> list[str]:
    """What the budget allowed each method, so the goals' verdicts can be read in context."""
    default = runs.get("default")
    searches = [runs[m] for m in ("random", "priorband", "regularized") if m in runs]
    if default is None or not searches:
        return []
    epochs = [r.get("epochs_trained") or 0 for r in searches]
    trials = [r.get("trials") or 0 for r in searches]
    return [
        "",
        f"Reading: in {args.budget_minutes:g} CPU minutes the default trains {default.get('epochs_reached')} epochs "
        f"as one run, while a search trains {min(epochs)}-{max(epochs)} epochs in total over {min(trials)}-{max(trials)} "
        f"trials of at most {args.max_epochs} epochs each (every trial also pays its setup and a validation). At "
        f"{args.max_epochs} epochs no configuration comes near the default's {default['final_dice']:.3f}: the goals "
        "assume searches whose top rung is a full training (GPU budgets of the reference); on this CPU budget they "
        "are a comparison of learning speed in the first epochs, where the default needed the time in the column "
        "'default's time to this Dice' to match each search's incumbent.",
    ]


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def render(runs: dict[str, dict], args: argparse.Namespace, load: str) -> str:
    default = runs.get("default")
    target = default["final_dice"] if default else None
    lines = [
        f"`python benchmarks/bench_search.py --budget-minutes {args.budget_minutes:g} "
        f"--iterations-per-epoch {args.iterations_per_epoch}` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, CPU only ({load}). Hippocampus (60 cases), fold 0, validation Dice = mean "
        f"over Anterior/Posterior on fold 0's validation cases. Same wall-clock budget for each method: "
        f"**{args.budget_minutes:g} min**. Searches: space `hpo_nas`, fidelity {args.min_epochs}..{args.max_epochs} "
        f"epochs (eta {args.eta}), {args.iterations_per_epoch} iterations per epoch for everyone; the search "
        "time includes every trial's setup and validation.",
        "",
        "| method | trials (finished) | epochs trained | final Dice (incumbent) | best Dice any fidelity | "
        "time to default's final Dice | default's time to this Dice | incumbent s/epoch | epoch speed vs default |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base_spe = default["seconds_per_epoch"] if default else None
    for method in METHODS:
        run = runs.get(method)
        if run is None:
            continue
        reach = time_to_reach(run["curve"], target)
        trials = f"{run.get('trials', '-')} ({run.get('finished_trials', '-')})" if method != "default" else "1"
        epochs = run.get("epochs_trained", run.get("epochs_reached", run.get("epochs")))
        final = _fmt(run["final_dice"]) + (f" @ {run['final_epochs']} ep" if run.get("final_epochs") else "")
        ratio = (base_spe / run["seconds_per_epoch"]) if base_spe and run.get("seconds_per_epoch") else None
        # The other way round: how long the default (validated every eighth of its run) needed for this Dice.
        default_reach = time_to_reach(default["curve"], run["final_dice"]) if default else None
        lines.append(
            f"| {method} | {trials} | {epochs} | {final} | {_fmt(run['best_dice'])} | "
            f"{_fmt(reach / 60 if reach is not None else None, '.1f')} min | "
            f"{_fmt(default_reach / 60 if default_reach is not None else None, '.1f')} min | "
            f"{_fmt(run.get('seconds_per_epoch'), '.1f')} | "
            f"{_fmt(ratio, '.2f')}x |")
    lines += ["", *_goals(runs, args.budget_minutes * 60.0), *_reading(runs, args),
              "", "Best validation Dice so far (minutes: Dice):", ""]
    for method in METHODS:
        run = runs.get(method)
        if run:
            points = ", ".join(f"{p['seconds'] / 60:.1f}: {p['dice']:.3f}" for p in run["curve"])
            lines.append(f"- {method}: {points or 'no finished trial'}")
    lines += [""]
    for method in ("random", "priorband", "regularized"):
        run = runs.get(method)
        if run and run.get("incumbent"):
            lines.append(f"- {method} incumbent {run['incumbent']}: {run['incumbent_config']}")
    if default:
        lines.append(f"- default: {default.get('epochs_reached', default['epochs'])} of a {default['epochs']}-epoch "
                     f"poly-LR schedule, {args.iterations_per_epoch} iterations per epoch, "
                     f"{default['elapsed'] / 60:.1f} min including its validations (the budget is checked "
                     "between chunks of epochs)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=20.0)
    parser.add_argument("--iterations-per-epoch", type=int, default=10)
    parser.add_argument("--min-epochs", type=int, default=1)
    parser.add_argument("--max-epochs", type=int, default=9)
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default="/tmp/autonnunet_bench_search")
    parser.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("nnUNet_compile", "false")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    raw_path = work / "bench_search.json"
    runs: dict[str, dict] = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    from AutoNNUNetLib.search import prepare_workspace

    workspace = prepare_workspace(HIPPOCAMPUS, work / "workspace")  # built and planned once, reused by reruns
    budget = args.budget_minutes * 60.0
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"unknown method {method}")
        if method in runs:
            print(f"{method}: already measured in {raw_path} (delete it to rerun)")
            continue
        print(f"== {method} ({args.budget_minutes:g} min)", flush=True)
        load_start = os.getloadavg()[0]
        if method == "default":
            runs[method] = run_default(workspace, work, budget, args.iterations_per_epoch, args.device)
        else:
            runs[method] = run_searcher(method, workspace, work, budget, args.iterations_per_epoch, args.device,
                                        args.min_epochs, args.max_epochs, args.eta)
        # Kept with the run, so a later render (e.g. after an interrupted benchmark) still knows it.
        runs[method]["load"] = [load_start, os.getloadavg()[0]]
        raw_path.write_text(json.dumps(runs, indent=2, default=str))
        print(json.dumps({k: v for k, v in runs[method].items() if k != "curve"}, default=str), flush=True)
    loads = [value for run in runs.values() for value in run.get("load", [])]
    load = (f"1-min load average {min(loads):.1f}-{max(loads):.1f} at method starts/ends"
            if loads else "load not recorded")
    body = render(runs, args, load)
    print(body)
    if not args.no_write:
        write_section("Search", body)


if __name__ == "__main__":
    main()
