"""The selection as a table: candidates and ensembles with CV Dice per class, gains, postprocessing.

Columns: the model or ensemble, the cross-validation Dice per class and their mean, the gain over
the best single candidate, and the inference seconds per volume. Those seconds are measured while
predicting the cross-validation (one fold's network, one case, TTA as selected); a selection
predicts with every fold of every member, so its cost is that times folds, summed over members
(shown as "x folds"). Then the postprocessing steps tried, each with the Dice it was judged on.
"""

from __future__ import annotations

import math
from typing import Sequence

from .choose import SelectionResult


def _dice(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]


def format_report(result: SelectionResult, markdown: bool = False) -> str:
    """Text (aligned columns) or markdown tables of a selection."""
    labels = result.labels
    singles = [s for s in result.scores if len(s.members) == 1]
    best_single = max((s.score.foreground_mean for s in singles), default=float("nan"))
    folds = len(result.folds)
    header = ["model", *[f"{name} ({value})" for value, name in labels.items()], "mean", "gain", "s/volume"]
    rows = []
    for score in result.scores:
        seconds = sum(result.seconds_per_case.get(m, float("nan")) for m in score.members) * folds
        mark = " *" if score.key == result.best else ""
        rows.append([" + ".join(score.members) + mark, *[_dice(score.score.per_label.get(v, float("nan")))
                                                          for v in labels],
                     _dice(score.score.foreground_mean),
                     f"{100 * (score.score.foreground_mean - best_single):+.2f}",
                     f"{seconds:.2f} ({folds} folds)"])
    title = "#### " if markdown else ""
    lines = [f"{title}Selection for {result.dataset}: cross-validation Dice (%) on folds "
             f"{' '.join(map(str, result.folds))}, TTA {'on' if result.use_mirroring else 'off'}", ""]
    lines += _table(header, rows, markdown)
    lines += ["", "* selected. gain: over the best single candidate. s/volume: one fold measured x folds, "
                  "summed over members.", ""]
    plan = result.postprocessing
    steps = []
    for step in plan.steps:
        target = "all foreground" if step.kind == "all_foreground" else labels.get(step.target, str(step.target))
        judged = (f"mean {_dice(step.foreground_before)} -> {_dice(step.foreground_after)}" if step.kind == "all_foreground"
                  else f"{_dice(step.before.get(step.target))} -> {_dice(step.after.get(step.target))}")
        steps.append([f"largest component: {target}", judged, "kept" if step.kept else "not kept"])
    lines += [f"{title}Postprocessing (decided on the cross-validation of the selection)", ""]
    lines += _table(["step", "Dice (%)", "decision"], steps, markdown)
    lines += ["", f"Selected: {' + '.join(m['name'] for m in result.members)}; CV Dice {_dice(plan.dice_before)} "
                  f"before, {_dice(plan.dice_after)} after postprocessing."]
    for note in result.notes:
        lines.append(f"Note: {note}")
    return "\n".join(lines) + "\n"
