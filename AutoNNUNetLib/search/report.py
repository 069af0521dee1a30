"""``autonnunet report ROOT``: plots and an HTML page for a search.

Writes into ``ROOT/report/`` (or ``--out``):

- ``incumbent.png``: best validation Dice so far over the search's wall-clock time (any fidelity and
  at the highest fidelity), every finished trial as a dot coloured by its epochs.
- ``pareto.png``: Dice against training time, the Pareto front (Dice / training / inference time)
  highlighted, marker size = inference time.
- ``curves.png``: per-configuration learning curves: training loss per epoch across its rungs,
  and validation Dice at each rung it reached.
- ``index.html``: the summary, the plots and the trials table (plain parameter names), and a
  "Model selection" section when the search has one (``autonnunet finalize`` / ``select``: found
  in or beside ROOT, or given with ``--selection``): candidates with cross-validation Dice per
  class, ensemble gains, postprocessing decisions, inference seconds per volume.

matplotlib runs headless (Agg); nothing here needs a display.
"""

from __future__ import annotations

import argparse
import html
import math
from pathlib import Path
from typing import Any, Optional, Union

from ..config import TrialConfig
from ..states import TrialState

REPORT_DIR = "report"


def _results(root: Path):
    from .layout import RESULTS_NAME
    from .results import collect_results, load_results

    if (root / RESULTS_NAME).is_file():
        return load_results(root)
    return collect_results(root)


def _chains(trials: list) -> dict[int, list]:
    """Trials of each configuration, ordered by rung (a promoted trial continues the previous)."""
    chains: dict[int, list] = {}
    for trial in trials:
        chains.setdefault(trial.config_id, []).append(trial)
    for chain in chains.values():
        chain.sort(key=lambda t: (t.epochs or 0))
    return chains


def plot_incumbent(results: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    done = sorted((t for t in results.trials if t.state == TrialState.SUCCEEDED and t.mean_dice is not None and t.finished),
                  key=lambda t: t.finished)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if done:
        start = min(t.started or t.finished for t in done)
        top = max(t.epochs or 0 for t in done)
        best_any, best_top = -math.inf, -math.inf
        xs, ys_any, ys_top = [], [], []
        for t in done:
            best_any = max(best_any, t.mean_dice)
            if (t.epochs or 0) == top:
                best_top = max(best_top, t.mean_dice)
            xs.append((t.finished - start) / 60.0)
            ys_any.append(best_any)
            ys_top.append(best_top if best_top > -math.inf else float("nan"))
        scatter = ax.scatter(xs, [t.mean_dice for t in done], c=[t.epochs or 0 for t in done], cmap="viridis",
                             s=18, alpha=0.7, label="trials")
        fig.colorbar(scatter, ax=ax, label="epochs")
        ax.step(xs, ys_any, where="post", color="tab:red", label="best (any fidelity)")
        ax.step(xs, ys_top, where="post", color="black", linestyle="--", label=f"best at {top} epochs")
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, ax, path, "search time (min)", "validation Dice (mean over classes)", "Incumbent over time",
                 empty=not done)


def plot_pareto(results: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    done = [t for t in results.trials if t.state == TrialState.SUCCEEDED and t.mean_dice is not None and t.train_seconds]
    front = set(results.pareto_front)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if done:
        inference = [t.inference_seconds or 0.0 for t in done]
        scale = 120.0 / max(max(inference), 1e-9)
        ax.scatter([t.train_seconds / 60.0 for t in done], [t.mean_dice for t in done],
                   s=[10 + scale * s for s in inference], c=["tab:red" if t.trial_id in front else "tab:gray"
                                                             for t in done], alpha=0.7)
        on_front = sorted((t for t in done if t.trial_id in front), key=lambda t: t.train_seconds)
        best = -math.inf
        line = []
        for t in on_front:  # the 2-D staircase of the front (Dice vs training time)
            if t.mean_dice > best:
                best = t.mean_dice
                line.append(t)
        ax.step([t.train_seconds / 60.0 for t in line], [t.mean_dice for t in line], where="post",
                color="tab:red", alpha=0.6)
        for t in on_front:
            ax.annotate(t.trial_id, (t.train_seconds / 60.0, t.mean_dice), fontsize=6, alpha=0.8)
    return _save(fig, ax, path, "training time (min, cumulative over rungs)", "validation Dice",
                 "Pareto front (red; marker size = inference time)", empty=not done)


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, empty: bool) -> Path:
    """Label one plot's axes (a note when there is nothing to show), write it and free the figure."""
    import matplotlib.pyplot as plt

    if empty:
        ax.text(0.5, 0.5, "no finished trials yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(results: Any, path: Path, max_configs: int = 40) -> Path:
    import matplotlib.pyplot as plt

    chains = _chains([t for t in results.trials if t.state == TrialState.SUCCEEDED])
    ranked = sorted(chains.items(), key=lambda item: -max((t.mean_dice or 0.0) for t in item[1]))[:max_configs]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("tab20")
    for i, (config_id, chain) in enumerate(ranked):
        color = cmap(i % 20)
        epochs, losses = [], []
        for trial in chain:
            for point in trial.curve or []:
                if point.get("fold", 0) == min(p.get("fold", 0) for p in trial.curve) and point.get("loss") is not None:
                    epochs.append(point["epoch"])
                    losses.append(point["loss"])
        if epochs:
            ax_loss.plot(epochs, losses, color=color, linewidth=1, alpha=0.8)
        ax_dice.plot([t.epochs for t in chain], [t.mean_dice for t in chain], marker="o", color=color,
                     linewidth=1, alpha=0.8, label=str(config_id))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (first fold)")
    ax_loss.set_title("Learning curves")
    ax_dice.set_xlabel("epochs (rung)")
    ax_dice.set_ylabel("validation Dice")
    ax_dice.set_title("Dice per rung, one line per configuration")
    if ranked and len(ranked) <= 20:
        ax_dice.legend(fontsize=6, ncol=2, title="config", title_fontsize=7)
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.{digits}g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def _config_summary(config: dict) -> str:
    """Only what differs from nnU-Net's default, so the table shows what the search changed."""
    default = TrialConfig().to_dict()
    changed = [f"{k}={_fmt(v, 3)}" for k, v in config.items() if default.get(k) != v and v is not None]
    return ", ".join(changed) or "nnU-Net default"


def write_html(results: Any, out_dir: Path, images: list[Path], selection_html: str = "") -> Path:
    best = results.best
    rows = []
    for t in results.trials:
        css = " class='incumbent'" if t.trial_id == results.incumbent else ""
        per_class = ", ".join(f"{html.escape(str(k))}: {_fmt(v)}" for k, v in (t.dice_per_class or {}).items())
        rows.append(
            f"<tr{css}><td>{html.escape(t.trial_id)}</td><td>{html.escape(t.state)}</td><td>{_fmt(t.epochs)}</td>"
            f"<td>{_fmt(t.epochs_trained)}</td><td>{_fmt(t.mean_dice)}</td><td>{per_class}</td>"
            f"<td>{_fmt(t.train_seconds, 3)}</td><td>{_fmt(t.seconds_per_epoch, 3)}</td>"
            f"<td>{_fmt(t.inference_seconds, 3)}</td><td>{html.escape(t.resumed_from or '')}</td>"
            f"<td class='cfg'>{html.escape(_config_summary(t.config))}</td>"
            f"<td class='err'>{html.escape(t.error or '')}</td></tr>")
    summary = [f"<b>State:</b> {html.escape(results.state)}", f"<b>Trials:</b> {len(results.trials)}",
               f"<b>Epochs trained:</b> {results.budget.get('epochs_used')}"
               + (f" of {results.budget['total_epochs']}" if results.budget.get("total_epochs") else "")]
    if best is not None:
        summary.append(f"<b>Incumbent:</b> {html.escape(best.trial_id)} - Dice {_fmt(best.mean_dice)} at "
                       f"{best.epochs} epochs, {_fmt(best.seconds_per_epoch, 3)} s/epoch")
        summary.append(f"<b>Incumbent configuration:</b> {html.escape(_config_summary(best.config))}")
    if results.incumbent_model_dir:
        summary.append(f"<b>Model folder:</b> <code>{html.escape(results.incumbent_model_dir)}</code>")
    if results.final:
        summary.append(f"<b>Final training:</b> folds {results.final.get('folds')}, Dice "
                       f"{_fmt(results.final.get('mean_dice'))}")
    settings = results.settings
    summary.append("<b>Search:</b> " + html.escape(
        f"space {settings.get('space')}, {settings.get('optimizer')}, epochs {settings.get('min_epochs')}.."
        f"{settings.get('max_epochs')} (eta {settings.get('eta')}), folds {settings.get('folds')}, "
        f"runtime weight {settings.get('runtime_weight')}"))
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>AutoNNUNet search report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; vertical-align: top; }}
th {{ background: #eee; }}
tr.incumbent, tr.selected {{ background: #fff3c4; }}
td.cfg {{ max-width: 40em; }}
td.err {{ color: #a00; max-width: 25em; }}
img {{ max-width: 48%; margin: 4px; border: 1px solid #ddd; }}
</style></head><body>
<h1>AutoNNUNet search report</h1>
<p>{'<br>'.join(summary)}</p>
<p>{''.join(f'<img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">' for p in images)}</p>
<h2>Trials</h2>
<table><tr><th>trial</th><th>state</th><th>epochs</th><th>trained</th><th>Dice</th><th>Dice per class</th>
<th>train s</th><th>s/epoch</th><th>inference s</th><th>resumed from</th><th>configuration (changes)</th>
<th>error</th></tr>
{''.join(rows)}
</table>
{selection_html}</body></html>
"""
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def write_report(root: Union[str, Path], out_dir: Optional[Union[str, Path]] = None,
                 selection: Optional[Union[str, Path]] = None) -> Path:
    """Write the plots and ``index.html`` for the search at ``root``; returns the HTML path.

    ``selection``: the selection root to report on (default: the search's own, if it has one,
    :func:`~AutoNNUNetLib.selection.report.find_selection`).
    """
    import matplotlib

    matplotlib.use("Agg")
    root = Path(root)
    results = _results(root)
    out = Path(out_dir) if out_dir is not None else root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    images = [
        plot_incumbent(results, out / "incumbent.png"),
        plot_pareto(results, out / "pareto.png"),
        plot_curves(results, out / "curves.png"),
    ]
    return write_html(results, out, images, _selection_section(root, selection))


def _selection_section(root: Path, selection: Optional[Union[str, Path]]) -> str:
    from ..selection.choose import SelectionResult
    from ..selection.report import find_selection, format_html

    folder = Path(selection) if selection is not None else find_selection(root)
    if folder is None:
        return ""
    return format_html(SelectionResult.load(folder), folder)


def _cmd_report(args: argparse.Namespace) -> int:
    path = write_report(args.root, args.out, args.selection)
    print(path)
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser("report", help="plots and an HTML page for a search root",
                                   description="Write PNG plots and an HTML trials table for a search, with its model "
                                               "selection when there is one.")
    parser.add_argument("root", help="search root directory")
    parser.add_argument("--out", help="output folder (default ROOT/report)")
    parser.add_argument("--selection", help="selection root to add (default: ROOT/selection or a 'selection' "
                                            "folder beside ROOT whose candidates came from this search)")
    parser.set_defaults(func=_cmd_report)
