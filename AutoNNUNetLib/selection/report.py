"""The selection as a table: candidates and ensembles with CV Dice per class, gains, postprocessing.

Columns: the model or ensemble, the cross-validation Dice per class and their mean, the gain over
the best single candidate, and the inference seconds per volume. Those seconds are measured while
predicting the cross-validation (one fold's network, one case, TTA as selected); a selection
predicts with every fold of every member, so its cost is that times folds, summed over members
(shown as "x folds"). Then the postprocessing steps tried, each with the Dice it was judged on.

:func:`report_tables` computes the cells once; :func:`format_report` lays them out as text or
markdown, :func:`format_html` as the "Model selection" section of the search's HTML report.
:func:`find_selection` tells which selection belongs to a search root.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .choose import SelectionResult

FOOTNOTE = "selected (*). gain: over the best single candidate. s/volume: one fold measured x folds, summed over members."


def _dice(value: Optional[float]) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


@dataclass
class ReportTables:
    """The cells of a selection's report, formatted once for every layout."""

    title: str
    header: list[str]
    rows: list[list[str]]
    selected: int  # index of the selected row
    postprocessing_title: str
    postprocessing_header: list[str]
    postprocessing_rows: list[list[str]]
    summary: str
    notes: list[str] = field(default_factory=list)


def report_tables(result: SelectionResult) -> ReportTables:
    """Candidates and ensembles (CV Dice per class, mean, gain, s/volume), then postprocessing."""
    labels = result.labels
    singles = [s for s in result.scores if len(s.members) == 1]
    best_single = max((s.score.foreground_mean for s in singles), default=float("nan"))
    folds = len(result.folds)
    header = ["model", *[f"{name} ({value})" for value, name in labels.items()], "mean", "gain", "s/volume"]
    rows, selected = [], -1
    for index, score in enumerate(result.scores):
        seconds = sum(result.seconds_per_case.get(m, float("nan")) for m in score.members) * folds
        if score.key == result.best:
            selected = index
        rows.append([" + ".join(score.members), *[_dice(score.score.per_label.get(v, float("nan"))) for v in labels],
                     _dice(score.score.foreground_mean),
                     f"{100 * (score.score.foreground_mean - best_single):+.2f}",
                     f"{seconds:.2f} ({folds} folds)"])
    plan = result.postprocessing
    steps = []
    for step in plan.steps:
        target = "all foreground" if step.kind == "all_foreground" else labels.get(step.target, str(step.target))
        judged = (f"mean {_dice(step.foreground_before)} -> {_dice(step.foreground_after)}" if step.kind == "all_foreground"
                  else f"{_dice(step.before.get(step.target))} -> {_dice(step.after.get(step.target))}")
        steps.append([f"largest component: {target}", judged, "kept" if step.kept else "not kept"])
    return ReportTables(
        title=(f"Selection for {result.dataset}: cross-validation Dice (%) on folds "
               f"{' '.join(map(str, result.folds))}, TTA {'on' if result.use_mirroring else 'off'}"),
        header=header, rows=rows, selected=selected,
        postprocessing_title="Postprocessing (decided on the cross-validation of the selection)",
        postprocessing_header=["step", "Dice (%)", "decision"], postprocessing_rows=steps,
        summary=(f"Selected: {' + '.join(m['name'] for m in result.members)}; CV Dice {_dice(plan.dice_before)} "
                 f"before, {_dice(plan.dice_after)} after postprocessing."),
        notes=list(result.notes))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]


def format_report(result: SelectionResult, markdown: bool = False) -> str:
    """Text (aligned columns) or markdown tables of a selection."""
    tables = report_tables(result)
    rows = [[row[0] + (" *" if index == tables.selected else ""), *row[1:]] for index, row in enumerate(tables.rows)]
    title = "#### " if markdown else ""
    lines = [f"{title}{tables.title}", ""]
    lines += _table(tables.header, rows, markdown)
    lines += ["", FOOTNOTE.replace("selected (*)", "* selected"), ""]
    lines += [f"{title}{tables.postprocessing_title}", ""]
    lines += _table(tables.postprocessing_header, tables.postprocessing_rows, markdown)
    lines += ["", tables.summary]
    lines += [f"Note: {note}" for note in tables.notes]
    return "\n".join(lines) + "\n"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], selected: int = -1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = []
    for index, row in enumerate(rows):
        css = " class='selected'" if index == selected else ""
        lines.append(f"<tr{css}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(lines)}</table>"


def format_html(result: SelectionResult, root: Optional[Path] = None) -> str:
    """The "Model selection" section of the search's HTML report (the same cells as the text)."""
    tables = report_tables(result)
    where = f"<p><b>Selection root:</b> <code>{html.escape(str(root))}</code></p>" if root is not None else ""
    notes = "".join(f"<p class='note'>Note: {html.escape(note)}</p>" for note in tables.notes)
    return (f"<h2 id='selection'>Model selection</h2>\n{where}<p>{html.escape(tables.title)}</p>\n"
            f"{_html_table(tables.header, tables.rows, tables.selected)}\n<p>{html.escape(FOOTNOTE)}</p>\n"
            f"<h3>{html.escape(tables.postprocessing_title)}</h3>\n"
            f"{_html_table(tables.postprocessing_header, tables.postprocessing_rows)}\n"
            f"<p><b>{html.escape(tables.summary)}</b></p>{notes}\n")


def find_selection(search_root: Path) -> Optional[Path]:
    """The selection of the search at ``search_root``: ``selection`` inside it or beside it
    (``autonnunet finalize``'s default output), when it has a ``selection.json`` and its
    candidates came from this search's trials (``finalize.json`` names their folders)."""
    from ..files import is_within, read_json
    from .layout import FINALIZE_RECORD, SELECTION_RECORD

    search_root = Path(search_root)
    for folder in (search_root / "selection", search_root.parent / "selection"):
        if not (folder / SELECTION_RECORD).is_file():
            continue
        record = read_json(folder / FINALIZE_RECORD) or {}
        sources = [c.get("source_dir") for c in record.get("candidates", []) if isinstance(c, dict)]
        if any(source and is_within(source, search_root) for source in sources):
            return folder
    return None
