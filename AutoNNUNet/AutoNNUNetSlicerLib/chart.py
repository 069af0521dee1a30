"""The live chart: every scored trial's Dice against its training time, and the Pareto front.

:func:`chart_data` is the whole rule (which points, in which order, in which unit) and needs no
Slicer; :func:`show_points` hands its result to Slicer's plot nodes. Both series are *scatter*
plots: Slicer draws a ``PlotTypeLine`` series against the row index, not against the X column, so
a line series would put the front at the wrong training times. The trials are drawn without a
line (they are not a sequence); the front keeps a line, which joins its points left to right
because they are sorted by training time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from AutoNNUNetLib.progress import TrialPoint, pareto_points

CHART_NAME = "AutoNNUNet trials"
X_COLUMN, Y_COLUMN = "minutes", "dice"


@dataclass(frozen=True)
class SeriesStyle:
    """How one series is drawn: names of vtkMRMLPlotSeriesNode's PlotType/LineStyle/MarkerStyle enums."""

    name: str
    plot_type: str
    line_style: str
    marker_style: str
    marker_size: int
    color: tuple[float, float, float]


TRIALS_STYLE = SeriesStyle("Trials", "Scatter", "None", "Circle", 8, (0.18, 0.55, 0.85))
FRONT_STYLE = SeriesStyle("Pareto front", "Scatter", "Solid", "Square", 10, (0.90, 0.30, 0.24))
SERIES = (TRIALS_STYLE, FRONT_STYLE)


@dataclass
class ChartData:
    """Columns of the two series' tables (training time in minutes, Dice)."""

    trial_minutes: list[float]
    trial_dice: list[float]
    front_minutes: list[float]
    front_dice: list[float]
    front_trials: list[str]

    @property
    def empty(self) -> bool:
        return not self.trial_minutes


def chart_data(points: Iterable[TrialPoint]) -> ChartData:
    """The scored trials (in the order given) and their Pareto front, fastest first."""
    scored = [p for p in points if p.scored]
    front = pareto_points(scored)
    return ChartData(
        trial_minutes=[p.train_seconds / 60.0 for p in scored],  # type: ignore[operator]
        trial_dice=[float(p.dice) for p in scored],  # type: ignore[arg-type]
        front_minutes=[p.train_seconds / 60.0 for p in front],  # type: ignore[operator]
        front_dice=[float(p.dice) for p in front],  # type: ignore[arg-type]
        front_trials=[p.trial for p in front],
    )


# -- Slicer side ----------------------------------------------------------------------------------


def _chart_nodes(scene):
    """The chart and its two series (created once per scene; styles applied every time, so a
    chart saved by an older version is redrawn correctly)."""
    import slicer

    chart = scene.GetFirstNodeByName(CHART_NAME)
    if chart is None or not chart.IsA("vtkMRMLPlotChartNode"):
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", CHART_NAME)
        for style in SERIES:
            table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{CHART_NAME} {style.name}")
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", style.name)
            series.SetAndObserveTableNodeID(table.GetID())
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle("AutoNNUNet search: Dice vs training time")
    chart.SetXAxisTitle("Training time (min)")
    chart.SetYAxisTitle("Validation Dice")
    chart.SetLegendVisibility(True)
    seriesNodes = [chart.GetNthPlotSeriesNode(index) for index in range(len(SERIES))]
    node = slicer.vtkMRMLPlotSeriesNode
    for series, style in zip(seriesNodes, SERIES):
        series.SetXColumnName(X_COLUMN)
        series.SetYColumnName(Y_COLUMN)
        series.SetPlotType(getattr(node, "PlotType" + style.plot_type))
        series.SetLineStyle(getattr(node, "LineStyle" + style.line_style))
        series.SetMarkerStyle(getattr(node, "MarkerStyle" + style.marker_style))
        series.SetMarkerSize(style.marker_size)
        series.SetColor(*style.color)
    return chart, seriesNodes


def show_points(points: Iterable[TrialPoint], scene=None) -> Optional[object]:
    """Fill the chart's tables with :func:`chart_data` of ``points``; the chart node (None: nothing to draw)."""
    import numpy as np
    import slicer

    data = chart_data(points)
    if data.empty:
        return None
    chart, (trials, front) = _chart_nodes(scene or slicer.mrmlScene)
    for series, x, y in ((trials, data.trial_minutes, data.trial_dice), (front, data.front_minutes, data.front_dice)):
        slicer.util.updateTableFromArray(series.GetTableNode(), [np.array(x, dtype=float), np.array(y, dtype=float)],
                                         [X_COLUMN, Y_COLUMN])
    return chart


def show_chart(scene=None) -> None:
    """Show the chart in a plot view (Slicer switches to a layout with one if needed)."""
    import slicer

    chart, _ = _chart_nodes(scene or slicer.mrmlScene)
    slicer.modules.plots.logic().ShowChartInLayout(chart)
