"""Helpers for the Slicer module that need no Slicer, so they are tested headless.

The AutoNNUNet Slicer module is a thin view: everything in it that is a rule rather than a widget
lives here, where pytest can check it without a Slicer installation. Nothing in this file imports
slicer, qt, vtk or ctk (a CI test scans for it).

- Geometry: Slicer volumes carry spacing, an origin and IJK-to-RAS directions in RAS; image files
  and :class:`AutoNNUNetLib.dataset.Geometry` use SimpleITK's LPS conventions. Converting between
  the two only flips the sign of the first two physical axes, which is exact in floating point, so
  a volume exported from the scene and a prediction loaded back land on exactly the same grid.
  Slicer's ``arrayFromVolume`` returns arrays in KJI order, which is SimpleITK's (z, y, x) order:
  arrays pass through unchanged.
- Classes: segments with the same name are the same class in every case, whatever the order of
  the segments inside each segmentation node.
- Colors: distinct colors for the segments of a prediction.
- Progress: turning the library's progress events into status text, chart points and a Pareto
  front, and reading a search's ``results.json`` into table rows.
- Background processes: launching the ``autonnunet`` command as a child process with its own
  environment and killing its whole process tree on Cancel.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from .imaging import (
    LPS_FROM_RAS,
    geometry_from_ijk_to_ras,
    geometry_from_ras,
    ijk_to_ras_from_geometry,
    ijk_to_ras_matrix,
    lps_from_ras,
    ras_from_geometry,
    ras_from_lps,
)
from .processes import CANCEL_GRACE_SECONDS, kill_process_tree, signal_group

if TYPE_CHECKING:  # only for annotations: dataset.py imports SimpleITK
    from .imaging import Geometry
    from .events import ProgressEvent

#: The name every dataset uses for label value 0.
BACKGROUND = "background"

# ---------------------------------------------------------------------------------------------
# Classes from segment names
# ---------------------------------------------------------------------------------------------


def class_key(name: str) -> str:
    """How segment names are compared: surrounding spaces and letter case do not matter.

    "Tumor", "tumor " and "TUMOR" drawn in different cases are one class; the spelling seen first
    is the one shown and written to dataset.json.
    """
    return " ".join(str(name).split()).casefold()


def resolve_class_name(segment_name: str, aliases: Optional[Mapping[str, str]] = None) -> str:
    """The class a segment belongs to: its own name, unless the user renamed it in the class table."""
    if aliases:
        wanted = class_key(segment_name)
        for original, renamed in aliases.items():
            if class_key(original) == wanted and str(renamed).strip():
                return " ".join(str(renamed).split())
    return " ".join(str(segment_name).split())


def class_table_from_segment_names(
    segment_names_per_case: Sequence[Sequence[str]], aliases: Optional[Mapping[str, str]] = None
) -> dict[str, int]:
    """One label value per class across all cases: ``{"background": 0, "<first class>": 1, ...}``.

    Values follow the order in which classes first appear (case by case, segment by segment), so
    the first case's segment order is what the user sees; later cases may list their segments in
    any order and still get the same value per class. A segment called "background" stays 0.
    ``aliases`` maps a segment name to another class name (the editable class table), which also
    merges synonyms ("Tumour" -> "Tumor").
    """
    classes: dict[str, int] = {BACKGROUND: 0}
    seen: dict[str, str] = {class_key(BACKGROUND): BACKGROUND}
    for names in segment_names_per_case:
        for segment_name in names:
            class_name = resolve_class_name(segment_name, aliases)
            if not class_name:
                raise ValueError("a segment has an empty name; name every segment (it becomes the class name)")
            key = class_key(class_name)
            if key not in seen:
                seen[key] = class_name
                classes[class_name] = len(classes)
    return classes


def _class_value(classes: Mapping[str, int], class_name: str) -> int:
    key = class_key(class_name)
    for name, value in classes.items():
        if class_key(name) == key:
            return int(value)
    raise ValueError(f"class {class_name!r} is not in the class table ({', '.join(classes)})")


def segment_label_lookup(
    segment_names: Sequence[str], classes: Mapping[str, int], aliases: Optional[Mapping[str, str]] = None
) -> np.ndarray:
    """Lookup table from exported label values to class values for one case.

    Slicer's ``ExportSegmentsToLabelmapNode`` with an explicit segment list writes segment ``i`` of
    the list as value ``i + 1``; ``lookup[exported]`` turns that into the dataset's class value.
    """
    lookup = np.zeros(len(segment_names) + 1, dtype=np.int64)
    for index, segment_name in enumerate(segment_names):
        lookup[index + 1] = _class_value(classes, resolve_class_name(segment_name, aliases))
    return lookup


def remap_case_labels(
    exported: np.ndarray,
    segment_names: Sequence[str],
    classes: Mapping[str, int],
    aliases: Optional[Mapping[str, str]] = None,
) -> np.ndarray:
    """An exported label array (segment position + 1) rewritten to class values (smallest uint type)."""
    lookup = segment_label_lookup(segment_names, classes, aliases)
    exported = np.asarray(exported)
    if exported.size and (exported.min() < 0 or exported.max() >= len(lookup)):
        raise ValueError(
            f"label array holds values outside 0..{len(lookup) - 1} for {len(segment_names)} segments"
        )
    dtype = np.uint8 if max(classes.values(), default=0) < 256 else np.uint16
    return lookup.astype(dtype)[exported.astype(np.int64, copy=False)]


def case_label_names(segment_names: Sequence[str], aliases: Optional[Mapping[str, str]] = None) -> dict[int, str]:
    """The per-case ``label_names`` for :class:`dataset.Case`: ``{position + 1: class name}``.

    It describes the label map ``ExportSegmentsToLabelmapNode`` writes for this segment order;
    the dataset's class table (:func:`class_table_from_segment_names`) then decides the value each
    class gets in the written dataset, identical in every case. Several segments of one class in
    a case map to the same class.
    """
    return {index + 1: resolve_class_name(name, aliases) for index, name in enumerate(segment_names)}


@dataclass
class ClassRow:
    """One row of the editable class table: a segment name and the class it goes to."""

    segment_name: str
    class_name: str
    value: int
    cases: int


def class_rows(
    segment_names_per_case: Sequence[Sequence[str]], aliases: Optional[Mapping[str, str]] = None
) -> list[ClassRow]:
    """Rows for the class table: each distinct segment name, its class, label value and case count."""
    classes = class_table_from_segment_names(segment_names_per_case, aliases)
    first_spelling: dict[str, str] = {}
    counts: dict[str, int] = {}
    for names in segment_names_per_case:
        for key in {class_key(n) for n in names}:
            counts[key] = counts.get(key, 0) + 1
        for name in names:
            first_spelling.setdefault(class_key(name), " ".join(str(name).split()))
    rows = []
    for key, name in first_spelling.items():
        class_name = resolve_class_name(name, aliases)
        value = _class_value(classes, class_name)
        shown = next(n for n in classes if class_key(n) == class_key(class_name))
        rows.append(ClassRow(name, shown, value, counts[key]))
    return sorted(rows, key=lambda r: (r.value, class_key(r.segment_name)))


def case_id_from_name(name: str, taken: Iterable[str] = ()) -> str:
    """A file-name-safe, unique case id from a node name ("Patient 1 seg" -> "Patient_1_seg")."""
    cleaned = "".join(c if c.isalnum() or c in "-" else "_" for c in str(name).strip())
    cleaned = "_".join(part for part in cleaned.split("_") if part) or "case"
    taken = set(taken)
    candidate, number = cleaned, 2
    while candidate in taken:
        candidate = f"{cleaned}_{number}"
        number += 1
    return candidate


# ---------------------------------------------------------------------------------------------
# Colors
# ---------------------------------------------------------------------------------------------

#: Well separated colors for the first classes (RGB 0-1); more classes get golden-ratio hues.
_PALETTE = (
    (0.90, 0.30, 0.24),  # red
    (0.18, 0.55, 0.85),  # blue
    (0.30, 0.75, 0.35),  # green
    (0.95, 0.75, 0.15),  # yellow
    (0.60, 0.35, 0.80),  # purple
    (0.10, 0.75, 0.75),  # cyan
    (0.95, 0.50, 0.10),  # orange
    (0.90, 0.45, 0.70),  # pink
    (0.55, 0.40, 0.25),  # brown
    (0.60, 0.80, 0.20),  # lime
)


def distinct_colors(count: int) -> list[tuple[float, float, float]]:
    """``count`` clearly different RGB colors (0-1), the same for the same count every time."""
    colors = list(_PALETTE[:count])
    golden = 0.618033988749895
    hue = 0.11
    while len(colors) < count:
        hue = (hue + golden) % 1.0
        level = len(colors) // len(_PALETTE)
        colors.append(colorsys.hsv_to_rgb(hue, 0.75 - 0.1 * (level % 3), 0.95 - 0.1 * (level % 2)))
    return [tuple(float(c) for c in color) for color in colors]  # type: ignore[misc]


def class_colors(classes: Mapping[str, int]) -> dict[str, tuple[float, float, float]]:
    """A color for every foreground class, by class value (background has none)."""
    foreground = sorted((value, name) for name, value in classes.items() if value != 0)
    colors = distinct_colors(len(foreground))
    return {name: colors[index] for index, (_, name) in enumerate(foreground)}


# ---------------------------------------------------------------------------------------------
# Progress events -> UI
# ---------------------------------------------------------------------------------------------


def format_duration(seconds: Optional[float]) -> str:
    """``3h 05m``, ``12m 03s`` or ``45s``; empty for unknown."""
    if seconds is None or not math.isfinite(float(seconds)) or seconds < 0:
        return ""
    seconds = int(round(float(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _fmt_dice(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return "?"


def format_event(event: "ProgressEvent") -> Optional[str]:
    """One log line for a progress event, or None for events too chatty for the log (none yet)."""
    data = event.data or {}
    kind = event.kind
    if kind == "stage":
        name = data.get("name", "")
        message = data.get("message", "")
        return f"[{name}] {message}".strip() if name else str(message)
    if kind == "trial_started":
        parts = [f"Trial {data.get('trial', '?')} started"]
        details = []
        if data.get("rung") is not None:
            details.append(f"rung {data['rung']}")
        if data.get("epochs") is not None:
            details.append(f"{data['epochs']} epochs")
        return parts[0] + (f" ({', '.join(details)})" if details else "")
    if kind == "epoch":
        line = f"Trial {data.get('trial', '?')}"
        if data.get("fold") is not None:
            line += f" fold {data['fold']}"
        line += f" epoch {data.get('epoch', '?')}"
        if data.get("max_epochs") is not None:
            line += f"/{data['max_epochs']}"
        if data.get("loss") is not None:
            try:
                line += f" loss {float(data['loss']):.4f}"
            except (TypeError, ValueError):
                pass
        if data.get("seconds") is not None:
            line += f" ({format_duration(data['seconds'])})"
        return line
    if kind == "trial_finished":
        trial = data.get("trial", "?")
        if data.get("state", "succeeded") != "succeeded":
            return f"Trial {trial} failed: {data.get('error') or 'unknown error'}"
        line = f"Trial {trial} finished: Dice {_fmt_dice(data.get('dice'))}"
        if data.get("epochs") is not None:
            line += f" after {data['epochs']} epochs"
        if data.get("train_seconds") is not None:
            line += f", training {format_duration(data['train_seconds'])}"
        per_class = data.get("dice_per_class") or {}
        if per_class:
            line += " (" + ", ".join(f"{name} {_fmt_dice(value)}" for name, value in per_class.items()) + ")"
        return line
    if kind == "best":
        line = f"New best: trial {data.get('trial', '?')}, Dice {_fmt_dice(data.get('dice'))}"
        if data.get("epochs") is not None:
            line += f" ({data['epochs']} epochs)"
        return line
    if kind == "progress":
        parts = []
        if data.get("message"):
            parts.append(str(data["message"]))
        if data.get("fraction") is not None:
            parts.append(f"{100.0 * float(data['fraction']):.0f}%")
        if data.get("eta_seconds") is not None:
            parts.append(f"ETA {format_duration(data['eta_seconds'])}")
        return " - ".join(parts) if parts else None
    if kind == "finished":
        line = f"Finished: {data.get('state', 'unknown')}"
        if data.get("message"):
            line += f" - {data['message']}"
        return line
    return f"{kind}: {json.dumps(data, default=str)}"


@dataclass
class TrialPoint:
    """One evaluated trial (one configuration at one epoch budget) for the chart and tables."""

    trial: str
    rung: Optional[int] = None
    epochs: Optional[int] = None
    dice: Optional[float] = None
    train_seconds: Optional[float] = None
    state: str = "running"
    dice_per_class: dict[str, float] = field(default_factory=dict)


@dataclass
class ProgressState:
    """What the UI shows about a running job, folded from its progress events."""

    stage: str = ""
    message: str = ""
    fraction: Optional[float] = None
    eta_seconds: Optional[float] = None
    trial: Optional[str] = None
    rung: Optional[int] = None
    trial_epochs: Optional[int] = None
    epoch: Optional[int] = None
    max_epochs: Optional[int] = None
    best_dice: Optional[float] = None
    best_trial: Optional[str] = None
    finished_state: Optional[str] = None
    trials: dict[str, TrialPoint] = field(default_factory=dict)

    def update(self, event: "ProgressEvent") -> None:
        data = event.data or {}
        kind = event.kind
        if kind == "stage":
            self.stage = str(data.get("name", self.stage))
            self.message = str(data.get("message", ""))
        elif kind == "trial_started":
            self.trial = str(data.get("trial"))
            self.rung = _opt_int(data.get("rung"))
            self.trial_epochs = _opt_int(data.get("epochs"))
            self.epoch = None
            key = self._key(data)
            self.trials[key] = TrialPoint(trial=str(data.get("trial")), rung=self.rung, epochs=self.trial_epochs)
        elif kind == "epoch":
            self.epoch = _opt_int(data.get("epoch"))
            self.max_epochs = _opt_int(data.get("max_epochs")) or self.max_epochs
        elif kind == "trial_finished":
            key = self._key(data)
            point = self.trials.get(key) or TrialPoint(trial=str(data.get("trial")))
            point.rung = _opt_int(data.get("rung")) if data.get("rung") is not None else point.rung
            point.epochs = _opt_int(data.get("epochs")) if data.get("epochs") is not None else point.epochs
            point.dice = _opt_float(data.get("dice"))
            point.train_seconds = _opt_float(data.get("train_seconds"))
            point.state = str(data.get("state", "succeeded"))
            point.dice_per_class = dict(data.get("dice_per_class") or {})
            self.trials[key] = point
            if point.state == "succeeded" and point.dice is not None and (self.best_dice is None or point.dice > self.best_dice):
                self.best_dice, self.best_trial = point.dice, point.trial
        elif kind == "best":
            dice = _opt_float(data.get("dice"))
            if dice is not None:
                self.best_dice, self.best_trial = dice, str(data.get("trial"))
        elif kind == "progress":
            if data.get("fraction") is not None:
                self.fraction = min(1.0, max(0.0, float(data["fraction"])))
            if data.get("eta_seconds") is not None:
                self.eta_seconds = float(data["eta_seconds"])
            if data.get("message"):
                self.message = str(data["message"])
        elif kind == "finished":
            self.finished_state = str(data.get("state", "succeeded"))
            self.message = str(data.get("message", self.message))
            if self.finished_state == "succeeded":
                self.fraction = 1.0

    @staticmethod
    def _key(data: Mapping[str, Any]) -> str:
        # A promoted configuration is evaluated again at a higher budget: one chart point per budget.
        return f"{data.get('trial')}@{data.get('epochs')}"

    def status_text(self) -> str:
        """``Trial 7 (rung 1, 37 epochs), epoch 12/333`` style line for the status label."""
        if self.finished_state:
            return f"Finished ({self.finished_state})" + (f": {self.message}" if self.message else "")
        if self.trial is None:
            return self.message or self.stage or "Starting..."
        text = f"Trial {self.trial}"
        details = []
        if self.rung is not None:
            details.append(f"rung {self.rung}")
        if self.trial_epochs is not None:
            details.append(f"{self.trial_epochs} epochs")
        if details:
            text += f" ({', '.join(details)})"
        if self.epoch is not None:
            text += f", epoch {self.epoch}" + (f"/{self.max_epochs}" if self.max_epochs else "")
        if self.eta_seconds is not None:
            text += f", ETA {format_duration(self.eta_seconds)}"
        return text

    def best_text(self) -> str:
        if self.best_dice is None:
            return "-"
        return f"{self.best_dice:.4f} (trial {self.best_trial})"

    def percent(self) -> int:
        """0-100 for the progress bar; falls back to epochs within the current trial."""
        if self.fraction is not None:
            return int(round(100 * self.fraction))
        if self.epoch is not None and self.max_epochs:
            return int(round(100 * min(1.0, self.epoch / self.max_epochs)))
        return 0

    def finished_points(self) -> list[TrialPoint]:
        return [p for p in self.trials.values() if p.state == "succeeded" and p.dice is not None and p.train_seconds is not None]


def _opt_int(value: Any) -> Optional[int]:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _opt_float(value: Any) -> Optional[float]:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (time lower, Dice higher), by time.

    ``points`` are ``(train_seconds, dice)``. A point is dominated when another one is at least as
    fast and at least as accurate and strictly better in one of the two.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best_dice = -math.inf
    for index in order:
        if points[index][1] > best_dice:
            front.append(index)
            best_dice = points[index][1]
    return front


# ---------------------------------------------------------------------------------------------
# results.json -> table rows
# ---------------------------------------------------------------------------------------------


@dataclass
class TrialRow:
    """One row of the results table."""

    trial: str
    epochs: Optional[int]
    dice: Optional[float]
    train_seconds: Optional[float]
    state: str
    config: dict[str, Any]
    model_dir: Optional[Path]
    pareto: bool = False
    incumbent: bool = False


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in mapping and mapping[key] is not None:
            return mapping[key]
    return None


def _is_success(state: Any) -> bool:
    return str(state or "succeeded").lower() in ("succeeded", "success")


def trial_rows_from_results(results: Mapping[str, Any], root: Union[str, Path]) -> list[TrialRow]:
    """Table rows from a search's ``results.json``, with the Pareto front and incumbent marked.

    Reads the search's own ``pareto_front`` (trial ids) and ``incumbent`` (a trial id) when the
    file has them; otherwise the front is computed here from Dice and training time. Tolerates a
    few spellings of the keys so the table survives small changes of the file format. Relative
    model folders are resolved against the search root.
    """
    root = Path(root)
    incumbent = results.get("incumbent")
    if isinstance(incumbent, Mapping):
        incumbent = _first(incumbent, "trial_id", "trial", "id")
    incumbent_trial = str(incumbent) if incumbent is not None else None
    rows: list[TrialRow] = []
    for raw in results.get("trials") or []:
        model_dir = _first(raw, "model_dir", "model", "output_dir")
        if model_dir is not None:
            model_dir = Path(model_dir)
            if not model_dir.is_absolute():
                model_dir = root / model_dir
        state = str(_first(raw, "state", "status") or "succeeded")
        rows.append(
            TrialRow(
                trial=str(_first(raw, "trial_id", "trial", "id")),
                epochs=_opt_int(_first(raw, "epochs", "fidelity", "budget")),
                dice=_opt_float(_first(raw, "mean_dice", "dice")),
                train_seconds=_opt_float(_first(raw, "train_seconds", "training_seconds", "time")),
                state="succeeded" if _is_success(state) else state,
                config=dict(_first(raw, "config") or {}),
                model_dir=model_dir,
            )
        )
    front_ids = results.get("pareto_front")
    if isinstance(front_ids, list) and front_ids:
        wanted = {str(t) for t in front_ids}
        for row in rows:
            row.pareto = row.trial in wanted
    else:
        done = [i for i, row in enumerate(rows) if row.dice is not None and row.train_seconds is not None and row.state == "succeeded"]
        for position in pareto_front([(rows[i].train_seconds, rows[i].dice) for i in done]):  # type: ignore[misc]
            rows[done[position]].pareto = True
    for row in rows:
        row.incumbent = incumbent_trial is not None and row.trial == incumbent_trial
    incumbent_dir = incumbent_model_dir(root, results)
    if incumbent_dir is not None:
        for row in rows:
            if row.incumbent:
                row.model_dir = incumbent_dir  # the kept copy: trial folders may be cleaned up
    return rows


def incumbent_model_dir(root: Union[str, Path], results: Optional[Mapping[str, Any]] = None) -> Optional[Path]:
    """The incumbent's model folder: ``incumbent_model_dir`` of ``results.json``, else ``ROOT/incumbent/*``."""
    root = Path(root)
    results = results or {}
    named = results.get("incumbent_model_dir")
    if not named and isinstance(results.get("incumbent"), Mapping):
        named = _first(results["incumbent"], "model_dir", "model")
    if named:
        path = Path(named)
        path = path if path.is_absolute() else root / path
        if path.exists():
            return path
    folder = root / "incumbent"
    candidates = sorted(p for p in folder.glob("*") if (p / "plans.json").exists()) if folder.is_dir() else []
    if candidates:
        return candidates[0]
    return folder if (folder / "plans.json").exists() else None


def load_results(root: Union[str, Path]) -> dict[str, Any]:
    """``ROOT/results.json`` as a dict (empty when the search has not written it yet)."""
    path = Path(root) / "results.json"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# ---------------------------------------------------------------------------------------------
# Background processes
# ---------------------------------------------------------------------------------------------


def autonnunet_command(python: str, verb: str, arguments: Sequence[str], events_file: Optional[Union[str, Path]] = None) -> list[str]:
    """``[python, "-m", "AutoNNUNetLib", verb, *arguments, "--events", FILE]``."""
    command = [str(python), "-m", "AutoNNUNetLib", verb, *[str(a) for a in arguments]]
    if events_file is not None:
        command += ["--events", str(events_file)]
    return command


def subprocess_environment(
    base: Mapping[str, str], library_parent: Union[str, Path], extra: Optional[Mapping[str, str]] = None
) -> dict[str, str]:
    """A fresh environment for a child process; ``base`` (e.g. Slicer's ``os.environ``) is not touched.

    The folder holding the ``AutoNNUNetLib`` package goes first on PYTHONPATH, so the child imports
    the same library as the module even from a source checkout; output is unbuffered so the log
    file fills while the child runs.
    """
    env = {str(k): str(v) for k, v in base.items()}
    paths = [str(library_parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(library_parent)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[str(key)] = str(value)
    return env


class BackgroundProcess:
    """A child process whose output goes to a log file, polled rather than waited for.

    The Slicer module polls :meth:`poll` and :meth:`read_log` from a QTimer, so the UI never blocks.
    :meth:`cancel` does not block either: it sends SIGTERM to the child's process group (its
    training workers included) and a later :meth:`poll` sends SIGKILL to whatever is left after the
    grace period, or at once to stragglers when the child itself has ended.
    """

    def __init__(self, command: Sequence[str], env: Mapping[str, str], log_path: Union[str, Path], cwd: Optional[Union[str, Path]] = None):
        self.command = [str(c) for c in command]
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.cwd = str(cwd) if cwd is not None else None
        self._process: Optional[subprocess.Popen] = None
        self._log_offset = 0
        self._kill_deadline: Optional[float] = None
        self.cancelled = False

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True  # own process group: Cancel kills all of it, not Slicer
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs
            )

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process else None

    def poll(self) -> Optional[int]:
        """The exit code, or None while running; finishes a pending cancel."""
        if self._process is None:
            return None
        code = self._process.poll()
        if self._kill_deadline is not None and (code is not None or time.monotonic() > self._kill_deadline):
            self._kill_group(hard=True)
            if code is not None:
                self._kill_deadline = None
        return code

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def read_log(self) -> str:
        """Text appended to the log since the last call."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(self._log_offset)
            chunk = handle.read()
        self._log_offset += len(chunk)
        return chunk.decode("utf-8", errors="replace")

    def _kill_group(self, hard: bool) -> None:
        assert self._process is not None
        # start_new_session made the child a group leader: its pid is the group id, which stays
        # valid while any member (a worker it started) lives, even after the child has exited.
        signal_group(self._process.pid, hard=hard)

    def cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """Ask the whole tree to stop now; SIGKILL follows from :meth:`poll` after ``grace`` seconds."""
        if self._process is None or self._process.poll() is not None:
            return
        self.cancelled = True
        self._kill_deadline = time.monotonic() + grace
        self._kill_group(hard=False)

    def terminate(self, timeout: float = 5.0) -> None:
        """Blocking stop for shutdown (Slicer exiting): :func:`kill_process_tree`."""
        if self._process is not None and self._process.poll() is None:
            self.cancelled = True
            kill_process_tree(self._process.pid, timeout=timeout)
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()


def library_parent() -> Path:
    """The folder that holds the ``AutoNNUNetLib`` package (goes on the child's PYTHONPATH)."""
    return Path(__file__).resolve().parent.parent


def default_python() -> str:
    """The interpreter for children outside Slicer (inside Slicer the module passes PythonSlicer)."""
    return sys.executable


def verb_options(verb: str) -> set[str]:
    """The option strings (``--events``, ``--device`` ...) the ``autonnunet <verb>`` parser accepts.

    The module asks before adding optional flags, so it keeps working while verbs gain options.
    Empty when the verb does not exist.
    """
    import argparse

    from .cli import VERB_MODULES, build_parser

    if verb not in VERB_MODULES:
        return set()
    parser = build_parser(verb)  # imports only the module owning the verb
    for action in parser._actions:  # argparse keeps subparsers as one action holding a name->parser map
        if isinstance(action, argparse._SubParsersAction) and verb in action.choices:
            return {option for sub in action.choices[verb]._actions for option in sub.option_strings}
    return set()


@dataclass
class JobUpdate:
    """What one poll of a job found: new events, new log text, and whether it ended."""

    events: list = field(default_factory=list)
    log: str = ""
    finished: bool = False
    state: Optional[str] = None  # succeeded / failed / cancelled once finished
    message: str = ""


class ProcessJob:
    """A local ``autonnunet`` run: a :class:`BackgroundProcess` plus its events file.

    ``poll()`` never blocks: it reads the events and log written since the last call, and reports
    the exit once the process has ended (succeeded = exit code 0).
    """

    def __init__(self, kind: str, process: BackgroundProcess, events_file: Optional[Union[str, Path]], output: Any = None,
                 stopped_exit_codes: Sequence[int] = ()):
        self.kind = kind
        #: Exit codes meaning "stopped early, resumable" (``autonnunet search`` exits 3 when its
        #: wall time ran out): reported as state "stopped", not as a failure.
        self.stopped_exit_codes = tuple(stopped_exit_codes)
        self.process = process
        self.events_file = Path(events_file) if events_file is not None else None
        self.output = output  # what the caller needs once it ends (e.g. the prediction file)
        self.state = ProgressState()
        self._offset = 0
        self._done = False

    def start(self) -> "ProcessJob":
        self.process.start()
        return self

    def _read(self, update: JobUpdate) -> None:
        if self.events_file is not None:
            from .events import read_events

            events, self._offset = read_events(self.events_file, self._offset)
            for event in events:
                self.state.update(event)
            update.events.extend(events)
        update.log += self.process.read_log()

    def poll(self) -> JobUpdate:
        update = JobUpdate()
        if self._done:
            return update
        code = self.process.poll()
        self._read(update)
        if code is not None:
            self._read(update)  # whatever was written between the two reads
            self._done = True
            update.finished = True
            if self.process.cancelled:
                update.state = "cancelled"
            elif code == 0:
                update.state = "succeeded"
            elif code in self.stopped_exit_codes:
                update.state = "stopped"
                update.message = self.state.message
            else:
                update.state = "failed"
                tail = [line for line in self.process.log_path.read_text(errors="replace").splitlines() if line.strip()][-3:]
                update.message = f"exit code {code}" + (": " + " | ".join(tail) if tail else "")
        return update

    @property
    def running(self) -> bool:
        return not self._done

    def cancel(self) -> None:
        self.process.cancel()

    def terminate(self) -> None:
        """Stop at once and wait (application shutdown)."""
        self.process.terminate()

    def wait(self, timeout: float, interval: float = 0.5) -> JobUpdate:
        """Block until the job ends (headless use and tests); the collected update."""
        total = JobUpdate()
        deadline = time.monotonic() + timeout
        while True:
            update = self.poll()
            total.events += update.events
            total.log += update.log
            if update.finished:
                total.finished, total.state, total.message = True, update.state, update.message
                return total
            if time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"{self.kind} did not finish within {timeout:.0f} s")
            time.sleep(interval)


class RemoteSearchJob:
    """A search on a remote runner through :class:`AutoNNUNetLib.client.RemoteClient`.

    Every client call (upload + submit, status/log/events, cancel, download) runs in one worker
    thread; ``poll()`` only looks at finished futures, so the caller's thread (Slicer's UI thread)
    never waits on the network. Same :class:`JobUpdate` interface as :class:`ProcessJob`. When the
    job succeeds, ``model.zip`` (and ``results.json`` when the runner has it) are downloaded into
    ``download_dir``; ``output`` is then the model zip's path.
    """

    FINAL_STATES = ("succeeded", "failed", "cancelled")

    def __init__(self, client: Any, dataset_dir: Union[str, Path], options: Mapping[str, Any], download_dir: Union[str, Path]):
        from concurrent.futures import ThreadPoolExecutor

        self.kind = "search"
        self.client = client
        self.download_dir = Path(download_dir)
        self.state = ProgressState()
        self.job_id: Optional[str] = None
        self.output: Optional[Path] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autonnunet-remote")
        self._log_offset = 0
        self._event_offset = 0
        self._done = False
        self._cancel_requested = False
        self._pending = self._executor.submit(self._submit, str(dataset_dir), dict(options))
        self._pending_kind = "submit"

    # -- worker-thread side: the only place the client is called ---------------------------------

    def _submit(self, dataset_dir: str, options: dict) -> str:
        upload = self.client.upload_dataset(dataset_dir)  # resumable, checked by SHA-256
        job = self.client.submit_search(upload["id"], **options)
        return str(job["id"])

    def _fetch(self) -> tuple[dict, str, list, int, int]:
        status = self.client.status(self.job_id) or {}
        page = self.client.logs(self.job_id, self._log_offset) or {}
        events, event_offset, _complete = self.client.events(self.job_id, self._event_offset)
        text = page.get("text") or ""
        return status, text, list(events), int(page.get("next_offset", self._log_offset)), int(event_offset)

    def _download(self) -> Path:
        self.download_dir.mkdir(parents=True, exist_ok=True)
        model = self.client.download(self.job_id, "model.zip", self.download_dir)
        try:
            self.client.download(self.job_id, "results.json", self.download_dir)
        except Exception:  # the trials table is a bonus; the model is what matters
            pass
        return Path(model)

    # -- caller side -----------------------------------------------------------------------------

    def poll(self) -> JobUpdate:
        update = JobUpdate()
        if self._done or not self._pending.done():
            return update
        kind, future = self._pending_kind, self._pending
        try:
            result = future.result()
        except Exception as error:  # network or server error: report it and stop
            self._finish(update, "failed", f"{kind}: {error}")
            return update
        if kind == "submit":
            self.job_id = result
            update.log += f"Submitted remote job {self.job_id}\n"
            if self._cancel_requested:
                self.cancel()
                return update
        elif kind == "fetch":
            status, text, events, self._log_offset, self._event_offset = result
            update.log += text
            for event in events:
                self.state.update(event)
            update.events.extend(events)
            remote_state = str(status.get("state", "running"))
            if remote_state == "succeeded":
                self._pending, self._pending_kind = self._executor.submit(self._download), "download"
                return update
            if remote_state in self.FINAL_STATES:
                self._finish(update, remote_state, str(status.get("error") or ""))
                return update
        elif kind == "download":
            self.output = result
            self._finish(update, "succeeded", f"model downloaded to {self.output}")
            return update
        elif kind == "cancel":
            self._finish(update, "cancelled", "cancelled on the runner")
            return update
        self._pending, self._pending_kind = self._executor.submit(self._fetch), "fetch"
        return update

    def _finish(self, update: JobUpdate, state: str, message: str) -> None:
        self._done = True
        update.finished, update.state, update.message = True, state, message
        self._executor.shutdown(wait=False)

    @property
    def running(self) -> bool:
        return not self._done

    def cancel(self) -> None:
        """Ask the runner to cancel (from the worker thread); a later poll reports the end."""
        self._cancel_requested = True
        if self.job_id is None or self._done:
            return  # still uploading/submitting: cancelled as soon as the submit returns
        self._pending, self._pending_kind = self._executor.submit(self.client.cancel, self.job_id), "cancel"
