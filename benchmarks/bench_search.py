"""Search benchmark (issue 9): does a search at N = 4 F beat nnU-Net's default at the same F?

Hippocampus (the 60 cases in ../shared/data), CPU. F = one default training of ``--epochs`` epochs
of ``--iterations`` iterations (default 12 x 25 = 300 iterations, the issue's floor). The search
selects on fold 0; fold 1 confirms. Methods, each at budget N = ``--budget``:

- ``default``: nnU-Net's default trained to F (1 F). Every search below trains exactly this run
  first (``--prior-first``, seed 0, fold 0), so its fold-0 Dice is read from the first search;
- ``regularized_portfolio``: Regularized PriorBand (runtime weight 1) with the portfolio warm start
  (the reference's incumbents of the other nine MSD tasks; hippocampus left out);
- ``priorband``: plain PriorBand (runtime weight 0) without the portfolio (the ablation).

For every search: the final model's Dice at F on fold 0, then ``--confirm-fold 1 --confirm-seeds
S``: the searched winner and the default trained to F on fold 1 with S seeds each (the default's
confirmation runs are shared between methods: same configuration, same seeds). Reported: Dice,
mean and spread (sample standard deviation), cost in F and minutes, trials per rung, seconds per
epoch of the final model against the default's, and whether the goal is met (the incumbent
beats the default on fold 1 by more than the seed spread, no slower per epoch).

Resumable: every search keeps its root in WORK (rerun the same command). ``--report-only``
writes the table from whatever has finished (what did not is named).

Usage: python benchmarks/bench_search.py [--work DIR] [--budget 4] [--epochs 12] [--iterations 25]
       [--seeds 2] [--methods regularized_portfolio,priorband] [--report-only] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "Task04_Hippocampus"
SEARCHES = {
    "regularized_portfolio": {"runtime_weight": 1.0, "portfolio": True,
                              "label": "Regularized PriorBand + portfolio"},
    "priorband": {"runtime_weight": 0.0, "portfolio": False, "label": "PriorBand, no portfolio"},
}


def settings_for(method: str, args: argparse.Namespace):
    from AutoNNUNetLib.search import SearchSettings

    spec = SEARCHES[method]
    return SearchSettings(
        space="hpo", min_epochs=max(1, args.epochs // 4), max_epochs=args.epochs, eta=2,
        iterations_per_epoch=args.iterations, max_validation_cases=None, device="cpu", seed=0,
        budget=float(args.budget), prior_first=True, portfolio=spec["portfolio"],
        runtime_weight=spec["runtime_weight"], confirm_fold=1, confirm_seeds=args.seeds)


def share_default_confirmations(work: Path, root: Path, seeds: int) -> None:
    """Point this search's default confirmation folders at the first search's (same training)."""
    for s in range(seeds):
        target = root / "confirm" / f"default_seed{s}"
        for method in SEARCHES:
            source = work / method / "confirm" / f"default_seed{s}"
            if source.is_dir() and source.resolve() != target.resolve() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(source.resolve(), target)
                break


def run_method(method: str, workspace: Any, work: Path, args: argparse.Namespace) -> None:
    from AutoNNUNetLib.search import run_search

    root = work / method
    share_default_confirmations(work, root, args.seeds)
    started = time.time()
    run_search(workspace, root, settings_for(method, args),
               progress=lambda e: print(f"[{method}] {e.kind} {e.data.get('message') or e.data.get('trial') or ''}",
                                        flush=True) if e.kind in ("stage", "trial_finished", "finished") else None)
    timing = work / "timing.json"
    data = json.loads(timing.read_text()) if timing.is_file() else {}
    data.setdefault(method, []).append({"start": started, "end": time.time()})
    timing.write_text(json.dumps(data, indent=2))


def summarize(method: str, work: Path) -> dict[str, Any]:
    from AutoNNUNetLib.search.results import read_results

    root = work / method
    results = read_results(root)
    if not results:
        return {"method": method, "status": "not started"}
    timing = json.loads((work / "timing.json").read_text()).get(method, []) if (work / "timing.json").is_file() else []
    minutes = sum(t["end"] - t["start"] for t in timing) / 60.0 if timing else None
    trials = results.get("trials", [])
    per_rung: dict[str, list[int]] = {}
    for trial in trials:
        if trial.get("state") in ("succeeded", "success"):
            counts = per_rung.setdefault(str(trial.get("epochs")), [0, 0])
            counts[1 if trial.get("reused_from") else 0] += 1
    final = results.get("final") or {}
    confirmation = results.get("confirmation") or {}
    epochs = []  # what was trained, from the events (also while a trial is still running)
    events = root / "events.jsonl"
    if events.is_file():
        for line in events.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("kind") == "epoch":
                epochs.append(float(event["data"].get("seconds") or 0.0))
    return {
        "epochs_done": len(epochs), "seconds_per_epoch_measured": statistics.fmean(epochs) if epochs else None,
        "method": method,
        "status": results.get("state") if final or results.get("state") == "stopped" else "searching",
        "confirmed": bool(confirmation.get("default")), "minutes": minutes, "budget": results.get("budget"),
        "final": final, "confirmation": confirmation, "trials_per_epochs": per_rung,
        "estimate": (results.get("estimate") or {}).get("text"),
    }


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean_sd(entry: Optional[dict]) -> str:
    if not entry or entry.get("mean") is None:
        return "not run"
    return f"{entry['mean']:.3f} +- {entry.get('spread', 0.0):.3f} ({', '.join(f'{d:.3f}' for d in entry['dice'])})"


def report(rows: list[dict[str, Any]], args: argparse.Namespace, load: str) -> str:
    f_iterations = args.epochs * args.iterations
    lines = [
        f"Hippocampus (60 cases), CPU ({platform.processor() or platform.machine()}, 2 cores shared with other "
        f"jobs; load average {load}). F = {args.epochs} epochs x {args.iterations} iterations = "
        f"{f_iterations} iterations of nnU-Net's default (poly LR over F). Space `hpo`, fidelity "
        f"{max(1, args.epochs // 4)}..{args.epochs} epochs, eta 2, budget N = {args.budget:g} F each "
        f"(the prior trained to F first, the final model included). Selection on fold 0 (all its validation "
        f"cases), confirmation on fold 1 with {args.seeds} seeds per configuration.",
        "",
        "`python benchmarks/bench_search.py --work WORK` (resumable; raw results in WORK/<method>/results.json).",
        "",
        "| method | status | fold-0 Dice at F | default fold-0 Dice at F | fold-1 incumbent | fold-1 default | "
        "gain on fold 1 | cost (F) | minutes | trials per epochs (trained + reused) | s/epoch final / default |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for row in rows:
        label = SEARCHES[row["method"]]["label"]
        if row.get("status") == "not started":
            lines.append(f"| {label} | not started (out of time) | | | | | | | | | |")
            verdicts.append(f"- {label}: not run in this session, no verdict.")
            continue
        final, confirmation = row["final"], row["confirmation"]
        inc, dflt = confirmation.get("incumbent"), confirmation.get("default")
        gain = confirmation.get("gain")
        speed = (inc["seconds_per_epoch"] / dflt["seconds_per_epoch"]
                 if inc and dflt and dflt.get("seconds_per_epoch") else None)
        rungs = ", ".join(f"{e}: {n[0]}+{n[1]}" for e, n in sorted(row["trials_per_epochs"].items(), key=lambda x: int(x[0])))
        cost = (row.get("budget") or {}).get("cost_f")
        lines.append(
            f"| {label} | {row['status']}{'' if row['confirmed'] else ', not confirmed'} | "
            f"{_fmt(final.get('mean_dice'))} | {_fmt(final.get('default_dice'))} | {_mean_sd(inc)} | "
            f"{_mean_sd(dflt)} | {_fmt(gain, 4) if gain is not None else '-'} | {_fmt(cost, 2)} | "
            f"{_fmt(row['minutes'], 0)} | {rungs} | {_fmt(speed, 2)} |")
        if inc and dflt and gain is not None:
            spread = max(inc.get("spread", 0.0), dflt.get("spread", 0.0))
            faster = speed is not None and speed <= 1.05
            met = gain > spread and faster
            verdicts.append(
                f"- {label}: goal {'met' if met else 'not met'}: incumbent {inc['mean']:.4f} vs default "
                f"{dflt['mean']:.4f} on fold 1, gain {gain:+.4f} against a seed spread of {spread:.4f} "
                f"({'exceeds' if gain > spread else 'does not exceed'} it); s/epoch ratio {_fmt(speed, 2)}; "
                f"cost {_fmt(cost, 2)} F of {args.budget:g}. "
                + ("The winner is nnU-Net's default itself (nothing better found at this budget)."
                   if confirmation.get("same_config") else ""))
        else:
            verdicts.append(f"- {label}: confirmation not finished in this session, no verdict "
                            f"(fold-0 final {_fmt(final.get('mean_dice'))} vs default {_fmt(final.get('default_dice'))}).")
    lines += ["", "Trained so far (epoch events, every training of the method: trials, final, confirmation):"]
    for row in rows:
        if row.get("epochs_done") is not None:
            spe = row.get("seconds_per_epoch_measured")
            lines.append(f"- {SEARCHES[row['method']]['label']}: {row['epochs_done']} epochs of {args.iterations} "
                         f"iterations" + (f", {spe:.0f} s per epoch ({spe / args.iterations:.1f} s per iteration)"
                                          if spe else ""))
    default_row = next((r for r in rows if r.get("final", {}).get("default_dice") is not None), None)
    lines += ["", "The default method (1 F) is the prior run every search trains first: "
              + (f"fold-0 Dice {default_row['final']['default_dice']:.3f} at F." if default_row else "not finished yet."),
              "", "Goal (issue 9): the incumbent beats the default on fold 1 by more than the seed spread, at "
              "the same F, for N <= 4, and trains no slower per epoch (ratio <= 1.05 counted as no slower).", ""]
    lines += verdicts
    if args.note:
        for note in args.note:
            lines += ["", note]
    estimates = [f"- {SEARCHES[r['method']]['label']}: {r['estimate']}" for r in rows if r.get("estimate")]
    if estimates:
        lines += ["", "Estimates printed before each search started (probe of the default configuration):", *estimates]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "bench_search")
    parser.add_argument("--budget", type=float, default=4.0)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--methods", default=",".join(SEARCHES))
    parser.add_argument("--report-only", action="store_true", help="write the table from what has finished")
    parser.add_argument("--note", action="append", default=[], help="a paragraph added to the page (what happened)")
    parser.add_argument("--no-write", action="store_true", help="print instead of writing docs/benchmarks.md")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        from AutoNNUNetLib.search import prepare_workspace

        os.environ.setdefault("nnUNet_compile", "false")
        workspace = prepare_workspace(HIPPOCAMPUS, args.work / "workspace")
        for method in methods:
            run_method(method, workspace, args.work, args)
    rows = [summarize(m, args.work) for m in methods]
    (args.work / "bench_search.json").write_text(json.dumps(rows, indent=2, default=str))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    body = report(rows, args, load)
    if args.no_write:
        print(body)
    else:
        write_section("Search", body)
        print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
