"""Segment names, colors and terminology carried from the training segments to the predicted ones.

A Slicer segment carries more than its name: its color and its terminology entry (the coded
category, type and region a user picked in the Segment Editor, stored by ``vtkSegment`` as one
string, ``GetTerminology`` / ``SetTerminology``). nnU-Net keeps class names only. So when the scene's
cases are exported, each class's first segment (case by case, segment by segment: the one the user
sees first in the class table) lends the class its look, and the first non-empty terminology of
any of its segments its terminology. The table goes into the dataset's ``dataset.json`` under
:data:`SEGMENTS_KEY`; nnU-Net ignores extra keys and copies the file into every model it trains,
so it travels with the model folder, its zip and a selection's members. A prediction's segments
then get the class name, that color and that terminology; a class without a record (a model
trained elsewhere) gets a distinct color (colors.py) and no terminology.

Pure Python: logic.py reads and writes the segments, this file decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

#: The dataset.json entry: ``{class name: {"segment_name", "color": [r, g, b], "terminology"}}``.
SEGMENTS_KEY = "autonnunet_segments"
#: Longest terminology string kept (Slicer's are a few hundred characters; a record, not data).
MAX_TERMINOLOGY = 4096

Color = tuple[float, float, float]


@dataclass
class SegmentLook:
    """How one segment appears: its name, color (RGB 0-1, None: not known) and terminology entry."""

    name: str
    color: Optional[Color] = None
    terminology: str = ""


def check_color(value: Any) -> Optional[Color]:
    """An RGB triple of numbers in 0..1, or None for anything else (a hand-edited dataset.json)."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        return None
    try:
        rgb = tuple(float(c) for c in value)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in rgb):
        return None
    return rgb  # type: ignore[return-value]


def class_looks(looks_per_case: Sequence[Sequence[SegmentLook]],
                aliases: Optional[Mapping[str, str]] = None) -> dict[str, SegmentLook]:
    """``{class name: look}`` for every foreground class of the export.

    The class names are the dataset's (``class_table_from_segment_names``: renames and synonyms
    applied, first spelling kept), so the keys match ``dataset.json``'s ``labels``.
    """
    from AutoNNUNetLib.dataset.classes import class_key, class_table_from_segment_names, is_background, \
        resolve_class_name

    classes = class_table_from_segment_names([[s.name for s in looks] for looks in looks_per_case], aliases)
    by_key = {class_key(name): name for name in classes}
    found: dict[str, SegmentLook] = {}
    for looks in looks_per_case:
        for look in looks:
            class_name = by_key[class_key(resolve_class_name(look.name, aliases))]
            if is_background(class_name):
                continue
            kept = found.setdefault(class_name, SegmentLook(look.name, check_color(look.color), ""))
            if kept.color is None:
                kept.color = check_color(look.color)
            if not kept.terminology and look.terminology:
                kept.terminology = str(look.terminology)[:MAX_TERMINOLOGY]
    return found


def looks_entry(looks: Mapping[str, SegmentLook]) -> dict[str, dict[str, Any]]:
    """The JSON form stored under :data:`SEGMENTS_KEY`."""
    return {name: {"segment_name": look.name, "color": list(look.color) if look.color else None,
                   "terminology": look.terminology} for name, look in looks.items()}


def record_looks(dataset_dir: Path, looks: Mapping[str, SegmentLook]) -> Path:
    """Add the looks to an exported dataset's ``dataset.json`` (atomically; nothing else changes)."""
    from AutoNNUNetLib.files import atomic_write_json, read_json

    path = Path(dataset_dir) / "dataset.json"
    document = read_json(path)
    if not isinstance(document, dict) or "labels" not in document:
        raise ValueError(f"{path}: not an nnU-Net dataset.json")
    document[SEGMENTS_KEY] = looks_entry(looks)
    atomic_write_json(path, document)
    return path


def recorded_looks(dataset_json: Mapping[str, Any]) -> dict[str, SegmentLook]:
    """The looks a model's ``dataset.json`` carries (entries that are not well formed are left out)."""
    entry = dataset_json.get(SEGMENTS_KEY) if isinstance(dataset_json, Mapping) else None
    looks: dict[str, SegmentLook] = {}
    for name, value in (entry.items() if isinstance(entry, Mapping) else ()):
        if not isinstance(value, Mapping):
            continue
        terminology = value.get("terminology")
        looks[str(name)] = SegmentLook(str(value.get("segment_name") or name), check_color(value.get("color")),
                                       terminology[:MAX_TERMINOLOGY] if isinstance(terminology, str) else "")
    return looks


def prediction_looks(classes: Mapping[str, int], dataset_json: Optional[Mapping[str, Any]] = None) -> dict[str, SegmentLook]:
    """``{class name: look}`` for the predicted segments: the segment is named after the class,
    colored and coded as its training segments were, else a distinct color and no terminology."""
    from AutoNNUNetLib.dataset.classes import class_key

    from .colors import class_colors

    recorded = {class_key(name): look for name, look in recorded_looks(dataset_json or {}).items()}
    fallback = class_colors(classes)
    looks = {}
    for name, value in sorted(classes.items(), key=lambda item: item[1]):
        if value == 0:
            continue
        known = recorded.get(class_key(name))
        looks[name] = SegmentLook(name, (known.color if known and known.color else None) or fallback[name],
                                  known.terminology if known else "")
    return looks
