"""Where cases come from: an MSD task folder, an nnU-Net raw folder, file pairs, a CSV of pairs.

Each reader returns a :class:`~.records.DatasetSource` (cases plus the source's class table) and
reads headers only; voxels are read once, by validation.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from ..workspace import DATASET_NAME_RE
from .containment import OUTSIDE, check_inside, inside, within
from .headers import read_header
from .records import FILE_ENDING, KNOWN_ENDINGS, Case, ChannelFile, ChannelSpec, DatasetError, DatasetSource, PathLike


def strip_ending(name: str) -> str:
    """A file name without its image ending (``.nii.gz`` counts as one ending)."""
    lower = name.lower()
    for ending in KNOWN_ENDINGS:
        if lower.endswith(ending):
            return name[: -len(ending)]
    return Path(name).stem


#: A dataset.json of 10,000 cases is about 2 MB; anything this large is not one (nor safe to parse).
MAX_DATASET_JSON_BYTES = 64 << 20


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path} not found")
    if path.stat().st_size > MAX_DATASET_JSON_BYTES:
        raise DatasetError(f"{path} is {path.stat().st_size >> 20} MB; a dataset.json is far smaller")
    try:
        # utf-8-sig: editors on Windows save JSON with a byte-order mark, which json.loads refuses.
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} does not hold a JSON object")
    return data


def _indexed_names(mapping: Mapping[str, Any], what: str, path: Path) -> list[str]:
    """``{"0": "T1", "1": "T2"}`` -> ``["T1", "T2"]`` (keys must be 0..n-1)."""
    if not isinstance(mapping, Mapping):
        raise DatasetError(f"{path}: {what} must map channel numbers to names, got {mapping!r}")
    try:
        items = sorted((int(k), str(v)) for k, v in mapping.items())
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: {what} keys must be channel numbers, got {list(mapping)}") from None
    if [k for k, _ in items] != list(range(len(items))):
        raise DatasetError(f"{path}: {what} keys must be 0..{len(items) - 1}, got {[k for k, _ in items]}")
    return [v for _, v in items]


def expand_channels(paths: Sequence[PathLike]) -> list[ChannelSpec]:
    """One entry per channel: files holding several channels (4D, vector) become :class:`ChannelFile` s.

    Reads headers only. A file whose header cannot be read is kept as is, so validation reports
    it with its case.
    """
    specs: list[ChannelSpec] = []
    for path in paths:
        path = Path(path)
        try:
            header = read_header(path)
        except DatasetError:
            specs.append(path)
            continue
        if header.n_channels > 1:
            specs.extend(ChannelFile(path, i) for i in range(header.n_channels))
        else:
            specs.append(path)
    return specs


def source_from_msd(folder: PathLike) -> DatasetSource:
    """A Medical Segmentation Decathlon task folder (``dataset.json`` with ``modality``, ``labels``,
    ``training``). 4D multi-channel images are split into their channels."""
    folder = Path(folder)
    meta = _load_json(inside(folder, "dataset.json", "dataset.json"))
    channel_names = _indexed_names(meta.get("modality") or {"0": "image"}, "modality", folder / "dataset.json")
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{folder / 'dataset.json'} has no 'labels' table")
    try:
        classes = {str(name): int(value) for value, name in labels.items()}  # MSD: value -> name
    except (TypeError, ValueError):
        raise DatasetError(f"{folder / 'dataset.json'}: MSD 'labels' must map values to names, got {labels}") from None

    entries = meta.get("training")
    if entries is None:
        # Some copies lack the list: fall back to the label files (ignoring macOS "._" debris).
        entries = [
            {"image": f"imagesTr/{p.name}", "label": f"labelsTr/{p.name}"}
            for p in sorted((folder / "labelsTr").glob("*.nii*"))
            if not p.name.startswith(".")
        ]  # checked like listed entries below
    if not isinstance(entries, list):
        raise DatasetError(f"{folder / 'dataset.json'}: 'training' must be a list of image/label entries")
    cases = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(f"{folder / 'dataset.json'}: 'training' entry {number} needs an 'image' and a 'label'")
        where = f"dataset.json 'training' entry {number}"
        image = inside(folder, entry["image"], f"{where} image")
        label = inside(folder, entry["label"], f"{where} label")
        cases.append(Case(strip_ending(label.name), expand_channels([image]), label))
    if not cases:
        raise DatasetError(f"{folder} holds no cases: its dataset.json lists no 'training' entries")
    return DatasetSource(
        cases,
        classes,
        channel_names,
        name=str(meta.get("name") or folder.name),
        description=str(meta.get("description", "")),
        folder=folder,
    )


def source_from_nnunet_raw(folder: PathLike) -> DatasetSource:
    """An nnU-Net v2 raw dataset folder (``imagesTr``, ``labelsTr``, ``dataset.json``), e.g. to copy,
    check or re-number one. Cases come from both folders, so an image without label is reported."""
    folder = Path(folder)
    meta = _load_json(inside(folder, "dataset.json", "dataset.json"))
    channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(f"{folder / 'dataset.json'} has no 'channel_names'")
    channel_names = _indexed_names(channels, "channel_names", folder / "dataset.json")
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{folder / 'dataset.json'} has no 'labels' table")
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise DatasetError(f"{folder / 'dataset.json'}: region-based labels (lists of values) are not supported")
    try:
        classes = {str(name): int(value) for name, value in labels.items()}  # nnU-Net v2: name -> value
    except (TypeError, ValueError):
        raise DatasetError(f"{folder / 'dataset.json'}: 'labels' must map names to integers, got {labels}") from None
    ending = str(meta.get("file_ending", FILE_ENDING))
    if not re.fullmatch(r"\.[A-Za-z0-9][A-Za-z0-9.]*", ending):
        raise DatasetError(f"{folder / 'dataset.json'}: file_ending must look like '.nii.gz', got {ending!r}")
    n = len(channel_names)

    cases: list[Case] = []
    if isinstance(meta.get("dataset"), dict):
        # The alternative layout: explicit file lists, relative to the dataset folder.
        for case_id, entry in meta["dataset"].items():
            where = f"dataset.json 'dataset' entry {case_id!r}"
            if not isinstance(entry, dict) or not isinstance(entry.get("images", []), list):
                raise DatasetError(f"{where}: expected {{'images': [...], 'label': ...}}")
            images = [inside(folder, p, f"{where} image {i}") for i, p in enumerate(entry.get("images", []))]
            label = inside(folder, entry.get("label", f"labelsTr/{case_id}{ending}"), f"{where} label")
            cases.append(Case(case_id, images, label))
    else:
        label_files = (folder / "labelsTr").glob(f"*{ending}")
        label_ids = {p.name[: -len(ending)] for p in label_files if not p.name.startswith(".")}
        image_re = re.compile(r"^(.*)_(\d{4})" + re.escape(ending) + "$")
        image_ids = {m.group(1) for p in (folder / "imagesTr").glob(f"*{ending}") if (m := image_re.match(p.name))}
        for case_id in sorted(label_ids | image_ids):
            # Listed names cannot hold "..", but a listed file (or imagesTr itself) may be a link.
            images = [inside(folder, f"imagesTr/{case_id}_{i:04d}{ending}", f"case {case_id} channel {i}")
                      for i in range(n)]
            label = inside(folder, f"labelsTr/{case_id}{ending}", f"case {case_id} label")
            cases.append(Case(case_id, images, label))
    if not cases:
        raise DatasetError(f"{folder} holds no cases: no files ending {ending} in its imagesTr/ or labelsTr/")
    match = DATASET_NAME_RE.match(folder.name)
    return DatasetSource(cases, classes, channel_names, name=match.group(2) if match else folder.name, folder=folder)


PairEntry = Union[
    tuple[Union[PathLike, Sequence[PathLike]], PathLike],
    tuple[str, Union[PathLike, Sequence[PathLike]], PathLike],
]


def source_from_pairs(
    pairs: Union[Iterable[PairEntry], Mapping[str, tuple[Any, PathLike]]],
    classes: Optional[Mapping[str, int]] = None,
    channel_names: Optional[Sequence[str]] = None,
) -> DatasetSource:
    """Image/label file pairs in any format SimpleITK reads (NIfTI, NRRD, MHA, ...).

    ``pairs`` holds ``(images, label)`` or ``(case_id, images, label)`` tuples, or is a mapping
    ``case_id -> (images, label)``; ``images`` is one path or a list of channel paths. Without a
    case id the label's file name is used (with its folder's name when file names repeat, as in
    ``patient01/seg.nrrd``). Multi-channel files are split into channels. ``classes=None`` derives
    the class table from the label values found.
    """
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    rows: list[tuple[Optional[str], list[Path], Path]] = []
    for item in items:
        if isinstance(pairs, Mapping):
            case_id, (images, label) = item
        elif len(item) == 3:
            case_id, images, label = item
        elif len(item) == 2:
            case_id, (images, label) = None, item
        else:
            raise DatasetError(f"a pair must be (images, label) or (case_id, images, label), got {item!r}")
        image_list = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
        rows.append((None if case_id is None else str(case_id), image_list, Path(label)))

    # Derive missing ids from label file names; fall back to "<folder>_<name>" when names repeat.
    derived = [strip_ending(label.name) for _, _, label in rows]
    if len(set(derived)) < len(derived):
        derived = [f"{label.parent.name}_{strip_ending(label.name)}" for _, _, label in rows]
    cases = [
        Case(case_id if case_id is not None else derived[i], expand_channels(images), label)
        for i, (case_id, images, label) in enumerate(rows)
    ]
    return DatasetSource(
        cases,
        dict(classes) if classes is not None else None,
        list(channel_names) if channel_names is not None else None,
    )


#: Header names of the CSV columns (compared ignoring case and surrounding space).
CASE_COLUMNS = ("case_id", "case", "id")
LABEL_COLUMNS = ("label", "labels", "seg", "segmentation", "mask")
IMAGE_COLUMN_RE = re.compile(r"^(image|channel)[ _]?\d*$")


@dataclass(frozen=True)
class _Columns:
    """Where a CSV header puts each field."""

    case: int
    label: int
    images: list[int]
    width: int


def _csv_columns(header: list[str], where: str) -> _Columns:
    names = [cell.strip().lower() for cell in header]
    case = [i for i, n in enumerate(names) if n in CASE_COLUMNS]
    label = [i for i, n in enumerate(names) if n in LABEL_COLUMNS]
    images = [i for i, n in enumerate(names) if IMAGE_COLUMN_RE.match(n)]
    unknown = [header[i] for i in range(len(names)) if i not in (*case, *label, *images) and names[i]]
    if unknown:
        raise DatasetError(f"{where}: unknown column(s) {unknown}; expected case_id, label and image[, image2, ...]")
    if len(case) != 1 or len(label) != 1 or not images:
        raise DatasetError(f"{where}: the header needs one case_id column, one label column and image column(s), "
                           f"got {header}")
    return _Columns(case[0], label[0], images, len(header))


def _csv_row(row: list[str], columns: Optional[_Columns], where: str) -> tuple[str, str, list[str]]:
    """(case id, label, images) of one row, by header names or (without a header) by position."""
    if columns is None:
        if len(row) < 3 or not all(row[:3]):
            raise DatasetError(f"{where}: expected case_id,label,image[,image2...], got {row}")
        return row[0], row[1], [cell for cell in row[2:] if cell]
    if any(row[columns.width:]):
        raise DatasetError(f"{where}: more cells than header columns, got {row}")
    cell = lambda i: row[i] if i < len(row) else ""  # noqa: E731
    # A missing channel is left out here; validation reports it with its case.
    case_id, label, images = cell(columns.case), cell(columns.label), [cell(i) for i in columns.images if cell(i)]
    if not case_id or not label or not images:
        raise DatasetError(f"{where}: every row needs a case_id, a label and an image, got {row}")
    return case_id, label, images


def _is_header(row: list[str]) -> bool:
    names = {cell.strip().lower() for cell in row}
    return bool(names & set(CASE_COLUMNS)) and bool(names & set(LABEL_COLUMNS))


def read_pairs_csv(path: PathLike) -> list[tuple[str, list[Path], Path]]:
    """Cases listed in a CSV file, one row per case.

    With a header row (``case_id``, ``label`` and ``image`` columns in any order, more channels as
    ``image2``, ``image_3``, ...), columns are taken by name. Without one, rows are
    ``case_id,label,image[,image2,...]``. Lines starting with ``#`` and empty lines are skipped;
    an Excel byte-order mark is accepted. Relative paths are relative to the CSV file's folder.
    Returns ``(case_id, images, label)`` tuples for :func:`source_from_pairs`.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"pairs file {path} not found")
    rows = []
    columns: Optional[_Columns] = None
    first = True
    resolve = lambda p: p if p.is_absolute() else path.parent / p  # noqa: E731
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark that would stick to "case_id".
        with open(path, newline="", encoding="utf-8-sig") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                row = [cell.strip() for cell in row]
                if not any(row) or row[0].startswith("#"):
                    continue
                where = f"{path.name} line {number}"
                if first:
                    first = False
                    if _is_header(row):
                        columns = _csv_columns(row, where)
                        continue
                case_id, label, images = _csv_row(row, columns, where)
                rows.append((case_id, [resolve(Path(p)) for p in images], resolve(Path(label))))
    except UnicodeDecodeError:
        raise DatasetError(f"{path.name} is not a UTF-8 text file") from None
    except csv.Error as error:
        raise DatasetError(f"{path.name} is not a readable CSV file ({error})") from None
    if not rows:
        raise DatasetError(f"{path} lists no cases")
    return rows


def detect_source(path: PathLike, root: Optional[PathLike] = None) -> DatasetSource:
    """An MSD task folder or an nnU-Net raw folder, told apart by their ``dataset.json``
    (a ``.csv`` file is read as pairs with :func:`read_pairs_csv`).

    With ``root`` (the folder an upload was extracted into), ``path`` and every file of the source
    must resolve inside it (:func:`~.containment.check_inside`): the check for untrusted input.
    """
    path = Path(path)
    if root is not None:
        if not within(path, root):
            raise DatasetError(f"the source {OUTSIDE}")
        source = detect_source(path)
        check_inside(source, root)
        return source
    if path.is_file() and path.suffix.lower() == ".csv":
        return source_from_pairs(read_pairs_csv(path))
    if not path.is_dir():
        raise DatasetError(f"{path} is not a folder (expected an MSD task or nnU-Net raw dataset folder)")
    expected = "expected an MSD task or nnU-Net raw dataset folder (dataset.json, imagesTr/, labelsTr/)"
    if not any(p for p in path.iterdir() if not p.name.startswith(".")):
        raise DatasetError(f"{path} is empty: {expected}")
    if not (path / "dataset.json").exists() and not (path / "dataset.json").is_symlink():
        raise DatasetError(f"{path} has no dataset.json: {expected}, or give a CSV of image/label pairs")
    meta = _load_json(inside(path, "dataset.json", "dataset.json"))
    if "channel_names" in meta or "file_ending" in meta:
        return source_from_nnunet_raw(path)
    if "modality" in meta or "training" in meta:
        return source_from_msd(path)
    raise DatasetError(
        f"{path / 'dataset.json'} is neither an nnU-Net v2 dataset.json (channel_names, file_ending) "
        "nor an MSD one (modality, training)"
    )
