"""The one class-name rule: how segment and class names are compared, and the class table.

A class is named by the user (a Slicer segment name, a ``--classes`` entry, an MSD ``labels``
table). The same class drawn in several cases may be spelled "Tumor", "tumor " or "TUMOR": names
are compared by :func:`class_key` (runs of white space are one space, surrounding space and
letter case do not matter), and the spelling seen first is the one shown and written to
dataset.json. Every comparison of class names in the library and the Slicer module goes through
this module.

Label *values* follow nnU-Net's rule in the written dataset: background 0, then 1, 2, ... A class
table may name other values (a prostate label map with 0, 7 and 8: ``pz=7,tz=8``); those are the
files' original values, renumbered in order by :func:`contiguous_values`, and the mapping is kept
in dataset.json under :data:`ORIGINAL_LABELS_KEY` so predictions can be written back
(:func:`read_original_labels`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .records import Case, DatasetError, Problem

#: The name every dataset uses for label value 0.
BACKGROUND = "background"

#: At most this many classes in a class table given by the user (nnU-Net trains one output channel
#: per class; the largest public tasks have about 120).
MAX_CLASSES = 1000

#: At most this many classes when the table is derived from the values found in the label maps.
#: More is almost always an intensity image given as the label map (an int16 MRI has thousands of
#: distinct values); a real task with more classes names them in a class table.
MAX_INFERRED_CLASSES = 255

#: The largest label value a class may have in the files (int32, what label maps are stored as).
MAX_LABEL_VALUE = 2**31 - 1

#: dataset.json entry holding ``{written value: original value}`` when the labels were renumbered.
ORIGINAL_LABELS_KEY = "autonnunet_original_labels"


def class_key(name: str) -> str:
    """How class and segment names are compared: white space runs and letter case do not matter.

    "Tumor", "tumor " and "TUMOR" drawn in different cases are one class.
    """
    return " ".join(str(name).split()).casefold()


def clean_name(name: str) -> str:
    """A name as shown and written: surrounding space removed, inner runs of space made one."""
    return " ".join(str(name).split())


def is_background(name: str) -> bool:
    return class_key(name) == BACKGROUND


def resolve_class_name(segment_name: str, aliases: Optional[Mapping[str, str]] = None) -> str:
    """The class a segment belongs to: its own name, unless the user renamed it in the class table."""
    if aliases:
        wanted = class_key(segment_name)
        for original, renamed in aliases.items():
            if class_key(original) == wanted and str(renamed).strip():
                return clean_name(renamed)
    return clean_name(segment_name)


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
    seen = {class_key(BACKGROUND)}
    for names in segment_names_per_case:
        for segment_name in names:
            class_name = resolve_class_name(segment_name, aliases)
            if not class_name:
                raise DatasetError("a segment has an empty name; name every segment (it becomes the class name)")
            key = class_key(class_name)
            if key not in seen:
                seen.add(key)
                classes[class_name] = len(classes)
    return classes


def class_table_from_cases(cases: Sequence[Case]) -> dict[str, int]:
    """The class table of cases that carry ``label_names``: background, then names by first appearance."""
    names = [[name for value, name in sorted((case.label_names or {}).items()) if value != 0] for case in cases]
    return class_table_from_segment_names(names)


def find_class_value(classes: Mapping[str, int], class_name: str) -> Optional[int]:
    """The value of ``class_name`` in ``classes``: the exact name first, then by :func:`class_key`."""
    if class_name in classes:
        return int(classes[class_name])
    key = class_key(class_name)
    for name, value in classes.items():
        if class_key(name) == key:
            return int(value)
    return None


def class_value(classes: Mapping[str, int], class_name: str) -> int:
    """:func:`find_class_value`, raising a :class:`DatasetError` naming the table when absent."""
    value = find_class_value(classes, class_name)
    if value is None:
        raise DatasetError(f"class {class_name!r} is not in the class table ({', '.join(classes)})")
    return value


def segment_label_lookup(
    segment_names: Sequence[str], classes: Mapping[str, int], aliases: Optional[Mapping[str, str]] = None
) -> np.ndarray:
    """Lookup table from exported label values to class values for one case.

    Slicer's ``ExportSegmentsToLabelmapNode`` with an explicit segment list writes segment ``i`` of
    the list as value ``i + 1``; ``lookup[exported]`` turns that into the dataset's class value.
    """
    lookup = np.zeros(len(segment_names) + 1, dtype=np.int64)
    for index, segment_name in enumerate(segment_names):
        lookup[index + 1] = class_value(classes, resolve_class_name(segment_name, aliases))
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
        raise DatasetError(
            f"label array holds values outside 0..{len(lookup) - 1} for {len(segment_names)} segments"
        )
    dtype = np.uint8 if max(classes.values(), default=0) < 256 else np.uint16
    return lookup.astype(dtype)[exported.astype(np.int64, copy=False)]


def case_label_names(segment_names: Sequence[str], aliases: Optional[Mapping[str, str]] = None) -> dict[int, str]:
    """The per-case ``label_names`` for :class:`~.records.Case`: ``{position + 1: class name}``.

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
            first_spelling.setdefault(class_key(name), clean_name(name))
    rows = []
    for key, name in first_spelling.items():
        class_name = resolve_class_name(name, aliases)
        value = class_value(classes, class_name)
        shown = next(n for n in classes if class_key(n) == class_key(class_name))
        rows.append(ClassRow(name, shown, value, counts[key]))
    return sorted(rows, key=lambda r: (r.value, class_key(r.segment_name)))


def parse_classes(text: str) -> dict[str, int]:
    """``"background=0,liver=1"`` -> ``{"background": 0, "liver": 1}``.

    Values are the label values in the files; ``"pz=7,tz=8"`` is a valid table (background 0 is
    implied when no class has value 0; the values are renumbered 1, 2 when the dataset is written).
    """
    classes: dict[str, int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            classes[clean_name(name)] = int(value)
        except ValueError:
            raise DatasetError(f"classes must look like 'background=0,liver=1', got {part.strip()!r}") from None
    if classes and 0 not in classes.values() and not any(is_background(name) for name in classes):
        classes = {BACKGROUND: 0, **classes}
    return classes


def check_class_table(classes: Mapping[str, int]) -> list[Problem]:
    """What no dataset can have: two classes on one value or one name, no background, too many classes."""
    problems = []
    values = list(classes.values())
    if len(set(values)) != len(values):
        dup = sorted({v for v in values if values.count(v) > 1})
        problems.append(Problem(None, f"class table {dict(classes)} gives several classes the value(s) {dup}"))
    keys = [class_key(name) for name in classes]
    if len(set(keys)) != len(keys):
        problems.append(Problem(None, f"class table {dict(classes)} names one class twice (names ignore case and spaces)"))
    if 0 not in values:
        problems.append(Problem(None, f"class table {dict(classes)} has no background (value 0)"))
    ignore = [value for name, value in classes.items() if class_key(name) == "ignore"]
    if ignore and ignore[0] != max(values):
        problems.append(Problem(None, f"the 'ignore' class must have the highest value (nnU-Net's rule), got {ignore[0]}"))
    negative = sorted(v for v in values if v < 0)
    if negative:
        problems.append(Problem(None, f"class values must not be negative, got {negative}"))
    huge = sorted(v for v in values if v > MAX_LABEL_VALUE)
    if huge:
        problems.append(Problem(None, f"class values must be at most {MAX_LABEL_VALUE}, got {huge}"))
    misplaced = [f"{name}={value}" for name, value in classes.items() if is_background(name) and value != 0]
    if misplaced:
        problems.append(Problem(None, f"'background' is value 0 in nnU-Net; got {', '.join(misplaced)}"))
    if len(set(values)) > MAX_CLASSES + 1:
        problems.append(Problem(None, f"class table has {len(set(values)) - 1} classes; at most {MAX_CLASSES} are supported"))
    return problems


def contiguous_values(classes: Mapping[str, int]) -> tuple[dict[str, int], dict[int, int]]:
    """The table nnU-Net gets (values 0, 1, 2, ... in the order of the given values, value 0 named
    "background") and the renumbering ``{given value: written value}``, empty when none was needed.

    ``{"background": 0, "pz": 7, "tz": 8}`` -> ``({"background": 0, "pz": 1, "tz": 2}, {0: 0, 7: 1, 8: 2})``.
    """
    ordered = sorted(classes.items(), key=lambda item: item[1])
    renumber = {int(value): written for written, (_, value) in enumerate(ordered)}
    table = {(BACKGROUND if renumber[value] == 0 else name): renumber[value] for name, value in ordered}
    if all(value == written for value, written in renumber.items()):
        renumber = {}
    return table, renumber


def original_labels_entry(original: Mapping[int, int]) -> dict[str, int]:
    """The dataset.json form of ``{written value: original value}`` (JSON keys are strings)."""
    return {str(int(written)): int(value) for written, value in sorted(original.items())}


def read_original_labels(dataset_json: Union[Mapping[str, Any], str, Path]) -> Optional[dict[int, int]]:
    """``{written value: original value}`` recorded by intake, or None when the values were kept.

    ``dataset_json`` is the loaded dict or the path of a dataset.json (of a raw dataset, or of a
    model folder: nnU-Net copies the file, this entry included, into every trained model).
    """
    if not isinstance(dataset_json, Mapping):
        path = Path(dataset_json)
        try:
            dataset_json = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DatasetError(f"cannot read {path}: {error}") from None
        if not isinstance(dataset_json, Mapping):
            raise DatasetError(f"{path} does not hold a JSON object")
    entry = dataset_json.get(ORIGINAL_LABELS_KEY)
    if entry is None:
        return None
    try:
        mapping = {int(written): int(value) for written, value in dict(entry).items()}
    except (TypeError, ValueError):
        raise DatasetError(f"dataset.json: {ORIGINAL_LABELS_KEY} must map written values to original values") from None
    if sorted(mapping) != list(range(len(mapping))) or mapping.get(0) != 0:
        raise DatasetError(f"dataset.json: {ORIGINAL_LABELS_KEY} must cover values 0..n-1 with 0 kept as 0")
    return mapping


def restore_original_labels(labels: np.ndarray, original: Mapping[int, int]) -> np.ndarray:
    """A predicted label map (written values) in the files' original values, e.g. 1, 2 -> 7, 8."""
    labels = np.asarray(labels)
    # Indexed by written value (0..n-1), so a large original value costs nothing.
    values = [int(original[written]) for written in range(len(original))]
    if labels.size and (labels.min() < 0 or labels.max() >= len(values)):
        raise DatasetError(f"label map holds values outside 0..{len(values) - 1}")
    top, bottom = max(values, default=0), min(values, default=0)
    for dtype in (np.uint8, np.uint16, np.int32, np.int64):
        if np.iinfo(dtype).min <= bottom and top <= np.iinfo(dtype).max:
            break
    return np.asarray(values, dtype=dtype)[labels.astype(np.int64, copy=False)]
