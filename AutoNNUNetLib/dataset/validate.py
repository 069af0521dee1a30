"""Every check a dataset needs, done before anything is written.

Validation reads each case once: headers first (readability, grids, pixel types), then voxels
one file at a time (completeness, NaN/Inf, label values), and keeps no voxel data. It returns a
:class:`CasePlan` per case, which the write step follows, or raises one :class:`DatasetError`
listing every problem of every case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ..events import ProgressEvent
from ..imaging import GEOMETRY_TOLERANCE, Geometry
from .classes import (
    BACKGROUND,
    MAX_INFERRED_CLASSES,
    check_class_table,
    class_table_from_cases,
    contiguous_values,
    find_class_value,
    is_background,
)
from .containment import outside_files
from .headers import (
    REAL_SCALAR_PIXEL_IDS,
    FileCache,
    Header,
    array_of,
    check_nifti_complete,
    describe,
    is_nifti,
    nonfinite_by_channel,
    size_text,
    spec_header,
)
from .records import CASE_ID_RE, Case, ChannelFile, DatasetError, DatasetSource, Problem, case_id_key

ProgressCallback = Callable[[ProgressEvent], None]

#: nnU-Net splits the training cases into 5 folds (scikit-learn KFold) after preprocessing and fails
#: there with fewer cases; refusing at intake says so before any time is spent.
MIN_CASES = 5

#: A case whose label map is only background: allowed (stock nnU-Net trains on it; it teaches "no
#: structure here"), but worth a warning, as it is more often a missing export than a choice.
EMPTY_LABEL = "label map is empty (only background); kept as a case without foreground"

#: Refused: with no foreground anywhere there is nothing to learn.
NO_FOREGROUND = "no case has any foreground (every label map is only background)"


@dataclass
class CasePlan:
    """What validation learned about a case and the write step needs (no voxel data)."""

    case: Case
    headers: list[Header]
    reference: Geometry                 # channel 0's grid: every file is written on it
    dimension: int
    label_values: list[float] = field(default_factory=list)
    value_map: dict[float, int] = field(default_factory=dict)   # own label value -> class value
    empty: bool = False                 # only background


@dataclass
class Validated:
    """A source that passed: one plan per case, the class table and channel names to write."""

    plans: list[CasePlan]
    classes: dict[str, int]
    channel_names: list[str]
    original_labels: Optional[dict[int, int]] = None   # written value -> value in the files, if renumbered
    warnings: list[Problem] = field(default_factory=list)   # accepted, but worth telling the user


def emit(progress: Optional[ProgressCallback], fraction: float, message: str) -> None:
    if progress is not None:
        progress(ProgressEvent("progress", {"fraction": round(min(max(fraction, 0.0), 1.0), 4), "message": message}))


def _validate_case(
    case: Case, n_channels: int, classes: Optional[dict[str, int]], tol: float
) -> tuple[Optional[CasePlan], list[Problem]]:
    """Check one case, reading it once and dropping the voxels before returning."""
    problems: list[Problem] = []

    def problem(message: str) -> None:
        problems.append(Problem(case.case_id, message))

    if len(case.channels) != n_channels:
        problem(f"has {len(case.channels)} channel(s), expected {n_channels}")
    if not case.channels:
        return None, problems

    # 1. Headers only: readability, channel grids and the label grid, before any voxel is read.
    headers: list[Optional[Header]] = []
    for i, spec in enumerate(case.channels):
        try:
            header = spec_header(spec)
        except DatasetError as error:
            problem(f"channel {i}: {error}")
            header = None
        else:
            if header.pixel_id not in REAL_SCALAR_PIXEL_IDS:
                problem(f"channel {i} ({describe(spec)}) has an unsupported pixel type")
                header = None
        headers.append(header)
    try:
        label_header: Optional[Header] = spec_header(case.label)
    except DatasetError as error:
        problem(f"label: {error}")
        label_header = None
    if label_header is not None and label_header.pixel_id not in REAL_SCALAR_PIXEL_IDS:
        problem(f"label ({describe(case.label)}) has an unsupported pixel type")
        label_header = None
    if headers[0] is None:
        return None, problems
    reference, ref_size = headers[0].geometry, headers[0].size
    if len(ref_size) not in (2, 3):
        problem(f"channel 0 is {len(ref_size)}D; expected 2D or 3D")
        return None, problems

    def compare(what: str, header: Header) -> None:
        if header.size != ref_size:
            problem(f"{what} size {size_text(header.size)} differs from channel 0's {size_text(ref_size)} (x, y, z voxels)")
            return
        differences = header.geometry.differences(reference, tol)
        if differences:
            problem(f"{what} grid differs from channel 0 (beyond tolerance {tol:g}): " + "; ".join(differences))

    for i, header in enumerate(headers[1:], start=1):
        if header is not None:
            compare(f"channel {i} ({describe(case.channels[i])})", header)
    if label_header is not None:
        compare(f"label ({describe(case.label)})", label_header)
    if problems:
        return None, problems  # the grids are wrong: reading voxels would only add noise

    # 2. Voxels, one file at a time: NaN/Inf in images (only float types can hold them).
    cache = FileCache()
    counted: dict[Path, list[int]] = {}
    try:
        for path in case.files():
            check_nifti_complete(Path(path))
        for i, (spec, header) in enumerate(zip(case.channels, headers)):
            assert header is not None
            bad = _nonfinite(spec, header, cache, counted)
            if bad:
                problem(f"channel {i} ({describe(spec)}) has {bad} NaN/Inf voxel(s)")
            if not isinstance(spec, ChannelFile):
                cache.clear()  # keep a 4D file for its next channel, drop everything else at once
        cache.clear()
        bad_labels = _nonfinite(case.label, label_header, cache, counted) if _is_nifti_file(case.label) else 0
        if bad_labels:
            problem(f"label map has {bad_labels} NaN/Inf voxel(s)")

        # 3. The label map: finite, integral, known values, some foreground.
        assert label_header is not None
        array = array_of(case.label, cache)
        values = unique_values(array)
        del array
        cache.clear()
    except DatasetError as error:
        problem(str(error))
        return None, problems
    values = _check_label_values(values, problem)
    plan = CasePlan(case, [h for h in headers if h is not None], reference, len(ref_size), label_values=values)
    if values and classes is not None:
        plan.value_map = _map_values(case, values, classes, problem)
        ignore = find_class_value(classes, "ignore")
        foreground = {c for c in plan.value_map.values() if c != 0 and c != ignore}
        plan.empty = not foreground
    return (None if problems else plan), problems


def _is_nifti_file(spec) -> bool:
    path = spec.path if isinstance(spec, ChannelFile) else spec
    return isinstance(path, Path) and is_nifti(path)


def _nonfinite(spec, header: Header, cache: FileCache, counted: dict[Path, list[int]]) -> int:
    """NaN/Inf voxels of one channel or label, counted the way nnU-Net will read them.

    NIfTI goes through nibabel (SimpleITK reads NaN/Inf in NIfTI as 0, nnU-Net's NibabelIO does
    not), once per file (``counted`` keeps the counts of a 4D file for its other channels);
    everything else through SimpleITK or the array itself. Only float data can hold them.
    """
    if not header.is_float:
        return 0  # integers hold no NaN (ITK reports a scaled integer NIfTI as float)
    if _is_nifti_file(spec):
        path = spec.path if isinstance(spec, ChannelFile) else spec
        if path not in counted:
            counted[path] = nonfinite_by_channel(path)
        return counted[path][spec.index] if isinstance(spec, ChannelFile) else sum(counted[path])
    array = array_of(spec, cache)
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def unique_values(array: np.ndarray) -> np.ndarray:
    """The distinct values of a label array (sorted)."""
    if array.dtype in (np.uint8, np.uint16, np.bool_):
        # Counting is far cheaper than sorting for small unsigned types.
        counts = np.bincount(array.ravel().astype(np.intp, copy=False) if array.dtype == np.bool_ else array.ravel())
        return np.flatnonzero(counts)
    return np.unique(array)


def _check_label_values(values: np.ndarray, problem: Callable[[str], None]) -> list[float]:
    """Reject NaN/Inf and non-integral label values; return the values as Python numbers."""
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not finite.all():
            problem("label map has NaN/Inf values")
            values = values[finite]
        fractional = values[values != np.round(values)]
        if fractional.size:
            shown = ", ".join(f"{v:g}" for v in fractional[:5])
            problem(f"label map has non-integral values ({shown}{', ...' if fractional.size > 5 else ''})")
            return []
    return [int(v) for v in values]


def _map_values(
    case: Case, values: Sequence[int], classes: Mapping[str, int], problem: Callable[[str], None]
) -> dict[float, int]:
    """Own label value -> class value, through ``label_names`` when the case has them."""
    table = ", ".join(f"{n}={v}" for n, v in sorted(classes.items(), key=lambda kv: kv[1]))
    mapping: dict[float, int] = {}
    if case.label_names is not None:
        unnamed, unknown = [], []
        for value in values:
            name = case.label_names.get(value)
            if name is None:
                if value == 0:
                    mapping[value] = 0  # unnamed 0 is background, as in every label map export
                else:
                    unnamed.append(value)
                continue
            target = 0 if is_background(name) else find_class_value(classes, name)
            if target is None:
                unknown.append(f"{name!r} (value {value})")
            else:
                mapping[value] = target
        if unnamed:
            problem(f"label values {unnamed} have no name in label_names {case.label_names}")
        if unknown:
            problem(f"class name(s) {', '.join(unknown)} not in the class table ({table})")
    else:
        known = set(classes.values())
        unknown_values = [v for v in values if v not in known]
        if unknown_values:
            problem(f"label values {_values_text(unknown_values)} not in the class table ({table})")
        mapping = {v: v for v in values if v in known}
    return mapping


def _too_many_values(plans: Sequence[CasePlan]) -> list[Problem]:
    """More distinct label values than :data:`MAX_INFERRED_CLASSES`: not a label map, most likely."""
    hint = (f"at most {MAX_INFERRED_CLASSES} classes are taken from label values (an intensity image given as "
            "the label?); name the classes with a class table (--classes) to use more")
    problems = []
    for plan in plans:
        count = len([v for v in plan.label_values if v != 0])
        if count > MAX_INFERRED_CLASSES:
            problems.append(Problem(plan.case.case_id, f"label map has {count} distinct values; {hint}"))
    total = len({v for plan in plans for v in plan.label_values} - {0})
    if not problems and total > MAX_INFERRED_CLASSES:
        problems.append(Problem(None, f"the label maps hold {total} distinct values together; {hint}"))
    return problems


def _values_text(values: Sequence[int], shown: int = 10) -> str:
    """``[3, 7]``, or the first values and a count when there are many (an intensity image has thousands)."""
    if len(values) <= shown:
        return str(list(values))
    return f"[{', '.join(str(v) for v in values[:shown])}, ...] ({len(values)} values)"


def _usual_channel_count(cases: Sequence[Case]) -> int:
    """The channel count most cases have (the larger on a tie): the odd case out is the one blamed,
    even when it is the first."""
    counts = [len(case.channels) for case in cases]
    return max(set(counts), key=lambda n: (counts.count(n), n)) if counts else 1


def validate(
    source: DatasetSource,
    tol: float = GEOMETRY_TOLERANCE,
    progress: Optional[ProgressCallback] = None,
    share: float = 1.0,
) -> Validated:
    """Check every case of ``source``; raise one :class:`DatasetError` listing every problem."""
    if source.folder is not None:
        # Again at the moment of reading: a link may have changed since the source was listed.
        outside = outside_files(source, source.folder)
        if outside:
            raise DatasetError(outside)
    problems: list[Problem] = []
    cases = list(source.cases)
    ids = [c.case_id for c in cases]
    if len(cases) < MIN_CASES:
        which = f" ({', '.join(ids)})" if 0 < len(ids) <= 4 else ""
        message = (f"only {len(cases)} case(s){which}; nnU-Net's 5-fold cross-validation needs at least "
                   f"{MIN_CASES} (one validation case per fold): add labeled cases")
        problems.append(Problem(ids[0] if len(ids) == 1 else None, message))
    seen: set[str] = set()
    spellings: dict[str, str] = {}
    for case_id in ids:
        if case_id in seen:
            problems.append(Problem(case_id, f"duplicate case id (appears {ids.count(case_id)} times)"))
        seen.add(case_id)
        first = spellings.setdefault(case_id_key(case_id), case_id)
        if first != case_id:
            message = f"case id differs from case {first} only in letter case (their files collide on macOS and Windows)"
            problems.append(Problem(case_id, message))
        if not CASE_ID_RE.match(case_id):
            message = "invalid case id: use letters, digits, '_', '-', '.' and start with a letter or digit"
            problems.append(Problem(case_id, message))
    problems = list(dict.fromkeys(problems))  # one "duplicate" line per id

    n_channels = len(source.channel_names) if source.channel_names else _usual_channel_count(cases)
    channel_names = list(source.channel_names) if source.channel_names else [f"channel_{i}" for i in range(n_channels)]
    if len(set(channel_names)) != len(channel_names):
        problems.append(Problem(None, f"channel names must be distinct, got {channel_names}"))

    # The class table: given, from segment names, or (None) from the values found below.
    named = [c.label_names is not None for c in cases]
    classes: Optional[dict[str, int]]
    if source.classes is not None:
        classes = dict(source.classes)
        problems += check_class_table(classes)
    elif cases and all(named):
        classes = class_table_from_cases(cases)
    elif any(named):
        unnamed = [c.case_id for c in cases if c.label_names is None]
        problems.append(Problem(unnamed[0], f"cases {unnamed} have no label_names while others do; give a class table"))
        classes = None
    else:
        classes = None

    plans: list[CasePlan] = []
    dimension: Optional[tuple[int, str]] = None
    for index, case in enumerate(cases):
        plan, case_problems = _validate_case(case, n_channels, classes, tol)
        problems += case_problems
        if plan is not None:
            if dimension is None:
                dimension = (plan.dimension, case.case_id)
            elif plan.dimension != dimension[0]:
                message = f"is {plan.dimension}D but case {dimension[1]} is {dimension[0]}D"
                problems.append(Problem(case.case_id, message))
            plans.append(plan)
        emit(progress, share * (index + 1) / max(len(cases), 1), f"checked {case.case_id}")

    if classes is None and not problems:
        problems += _too_many_values(plans)
    if classes is None and not problems:
        # No table given: every value found becomes a class "label_<value>" (renumbered below).
        found = sorted({v for plan in plans for v in plan.label_values} - {0})
        negative = [v for v in found if v < 0]
        if negative:
            problems.append(Problem(None, f"negative label values {negative} found; give a class table"))
        classes = {BACKGROUND: 0, **{f"label_{v}": v for v in found}}
        for plan in plans:
            plan.value_map = {v: v for v in plan.label_values}
            plan.empty = not any(plan.value_map.values())
    if plans and not problems and all(plan.empty for plan in plans):
        problems.append(Problem(None, NO_FOREGROUND))
    if problems:
        raise DatasetError(problems)
    warnings = [Problem(plan.case.case_id, EMPTY_LABEL) for plan in plans if plan.empty]
    assert classes is not None
    # nnU-Net wants 0, 1, 2, ...: other values are the files' own, renumbered in order and recorded.
    classes, renumber = contiguous_values(classes)
    if renumber:
        for plan in plans:
            plan.value_map = {value: renumber[target] for value, target in plan.value_map.items()}
    original = {written: value for value, written in renumber.items()} if renumber else None
    return Validated(plans, classes, channel_names, original, warnings)


def check_source(source: DatasetSource, tolerance: float = GEOMETRY_TOLERANCE) -> dict[str, int]:
    """Validate without writing; return the class table that would be written.

    Raises :class:`DatasetError` listing every problem. Useful for a "Check" button.
    """
    return validate(source, tolerance).classes
