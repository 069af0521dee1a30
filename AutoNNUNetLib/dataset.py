"""Labeled cases in, a validated nnU-Net v2 raw dataset out.

nnU-Net expects its training data in one layout only::

    nnUNet_raw/DatasetNNN_Name/
        imagesTr/<case>_<XXXX>.nii.gz     one file per channel XXXX = 0000, 0001, ...
        labelsTr/<case>.nii.gz            integer label map on the image's grid
        dataset.json                      channel_names, labels, numTraining, file_ending

and it reports problems late (during planning or training), often as a bare assertion. This module
turns the forms users actually hold into that layout and checks everything first:

- an MSD task folder (``dataset.json`` with ``modality``/``training``; 4D multi-channel images are
  split into one file per channel): :func:`source_from_msd`
- an nnU-Net raw folder (any file ending SimpleITK reads): :func:`source_from_nnunet_raw`
- image/label file pairs (NIfTI, NRRD, MHA, ...; several channel files per case):
  :func:`source_from_pairs`, :func:`read_pairs_csv`
- arrays in memory with their geometry (what the Slicer module hands over): :class:`Volume`

A source is a list of :class:`Case` records plus a class table. :func:`build_dataset` validates
every case (grids, channels, label values, NaN/Inf, empty labels, ids) before writing anything,
reports all problems at once in a :class:`DatasetError`, writes to a hidden temporary folder beside
the target and renames it into place, so a failure never leaves a half-written dataset nor
destroys an existing one.

Conventions: geometry follows SimpleITK (LPS world coordinates, ``spacing``/``origin`` in x, y, z
order, ``direction`` as a row-major matrix); arrays follow SimpleITK's numpy order (z, y, x).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import AutoNNUNetError
from .events import ProgressEvent
from .imaging import GEOMETRY_TOLERANCE, Geometry, Volume
from .workspace import DATASET_NAME_RE, Workspace, dataset_folder_name

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
ProgressCallback = Callable[[ProgressEvent], None]



#: The only file ending written: nnU-Net reads it with SimpleITKIO, stock tools and Slicer read it.
FILE_ENDING = ".nii.gz"

#: Endings recognised when a case id is derived from a file name (longest first).
KNOWN_ENDINGS = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".tif", ".tiff", ".png")

#: nnU-Net case ids become file names; keep them to characters that are safe everywhere.
CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

EMPTY_LABEL = "label map is empty (only background); every case needs some foreground"

#: At most this many problems are spelled out in a DatasetError message (all are in ``.problems``).
MAX_LISTED_PROBLEMS = 40

_REAL_SCALAR_PIXEL_IDS = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32,
    sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64,
}
_FLOAT_PIXEL_IDS = {sitk.sitkFloat32, sitk.sitkFloat64}


# --------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: the case it concerns (``None`` for the dataset) and what."""

    case_id: Optional[str]
    message: str

    def __str__(self) -> str:
        return f"case {self.case_id}: {self.message}" if self.case_id is not None else self.message


class DatasetError(AutoNNUNetError, ValueError):
    """The input cannot become an nnU-Net dataset; the message names each case and its problem.

    With one problem the message is that problem. With several, the first line is a summary and
    each following line is one problem; :attr:`problems` holds them all as :class:`Problem`.
    """

    def __init__(self, problems: Union[str, Problem, Sequence[Problem]]):
        if isinstance(problems, str):
            problems = [Problem(None, problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__(_format_problems(self.problems))

    @property
    def case_ids(self) -> list[str]:
        """Ids of the cases with at least one problem, in report order."""
        return list(dict.fromkeys(p.case_id for p in self.problems if p.case_id is not None))


def _format_problems(problems: Sequence[Problem]) -> str:
    if len(problems) == 1:
        return str(problems[0])
    cases = {p.case_id for p in problems if p.case_id is not None}
    summary = f"{len(problems)} problems"
    if cases:
        summary += f" in {len(cases)} case{'s' if len(cases) != 1 else ''}"
    lines = [summary + "; nothing was written:"]
    lines += [f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Cases and sources


@dataclass(frozen=True)
class ChannelFile:
    """Channel ``index`` of a file holding several channels.

    MSD stores multi-channel cases as one 4D NIfTI (x, y, z, channel); NRRD/MHA may hold a vector
    image. nnU-Net wants one 3D file per channel, so each channel is referenced separately and
    split out when the dataset is written.
    """

    path: Path
    index: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


ChannelSpec = Union[Path, Volume, ChannelFile]
LabelSpec = Union[Path, Volume]


@dataclass
class Case:
    """One labeled case.

    ``channels`` has one entry per input channel, in the same order for every case (a file path,
    a :class:`ChannelFile` or a :class:`Volume`). ``label_names`` maps this case's own label values
    to class names; give it when label values differ between cases (Slicer exports segments in
    list order) and the dataset's class table then decides the written value. Value 0 without a
    name is background.
    """

    case_id: str
    channels: list[ChannelSpec]
    label: LabelSpec
    label_names: Optional[dict[int, str]] = None

    def __post_init__(self) -> None:
        self.case_id = str(self.case_id)
        if isinstance(self.channels, (str, Path, Volume, ChannelFile)):
            self.channels = [self.channels]  # a single channel given bare
        self.channels = [Path(c) if isinstance(c, str) else c for c in self.channels]
        if isinstance(self.label, str):
            self.label = Path(self.label)
        if self.label_names is not None:
            self.label_names = {int(value): str(name) for value, name in self.label_names.items()}


@dataclass
class DatasetSource:
    """Everything :func:`build_dataset` needs: the cases and the dataset's class table.

    ``classes`` maps class name to label value, e.g. ``{"background": 0, "Anterior": 1}``; values
    must be 0, 1, 2, ... (nnU-Net's rule). ``None`` derives it: from the cases' ``label_names``
    (background, then names in order of first appearance) or, without names, from the label values
    found (``label_1``, ``label_2``, ...). ``channel_names`` names the channels (nnU-Net picks CT
    normalisation for a channel named "CT", z-score otherwise); ``None`` means ``channel_0``, ...
    ``name`` is a suggested dataset name (the MSD task's own) used by the CLI.
    """

    cases: list[Case]
    classes: Optional[dict[str, int]] = None
    channel_names: Optional[list[str]] = None
    name: Optional[str] = None
    description: str = ""


def _strip_ending(name: str) -> str:
    lower = name.lower()
    for ending in KNOWN_ENDINGS:
        if lower.endswith(ending):
            return name[: -len(ending)]
    return Path(name).stem


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} does not hold a JSON object")
    return data


def _indexed_names(mapping: Mapping[str, Any], what: str, path: Path) -> list[str]:
    """``{"0": "T1", "1": "T2"}`` -> ``["T1", "T2"]`` (keys must be 0..n-1)."""
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
            header = _read_header(path)
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
    meta = _load_json(folder / "dataset.json")
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
        ]
    cases = []
    for entry in entries:
        try:
            image, label = folder / entry["image"], folder / entry["label"]
        except (KeyError, TypeError):
            raise DatasetError(f"{folder / 'dataset.json'}: bad 'training' entry {entry!r}") from None
        cases.append(Case(_strip_ending(label.name), expand_channels([image]), label))
    return DatasetSource(
        cases,
        classes,
        channel_names,
        name=str(meta.get("name") or folder.name),
        description=str(meta.get("description", "")),
    )


def source_from_nnunet_raw(folder: PathLike) -> DatasetSource:
    """An nnU-Net v2 raw dataset folder (``imagesTr``, ``labelsTr``, ``dataset.json``), e.g. to copy,
    check or re-number one. Cases come from both folders, so an image without label is reported."""
    folder = Path(folder)
    meta = _load_json(folder / "dataset.json")
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
    n = len(channel_names)

    cases: list[Case] = []
    if isinstance(meta.get("dataset"), dict):
        # The alternative layout: explicit file lists, relative to the dataset folder.
        for case_id, entry in meta["dataset"].items():
            images = [folder / p for p in entry.get("images", [])]
            cases.append(Case(case_id, list(images), folder / entry.get("label", f"labelsTr/{case_id}{ending}")))
    else:
        label_files = (folder / "labelsTr").glob(f"*{ending}")
        label_ids = {p.name[: -len(ending)] for p in label_files if not p.name.startswith(".")}
        image_re = re.compile(r"^(.*)_(\d{4})" + re.escape(ending) + "$")
        image_ids = {m.group(1) for p in (folder / "imagesTr").glob(f"*{ending}") if (m := image_re.match(p.name))}
        for case_id in sorted(label_ids | image_ids):
            images = [folder / "imagesTr" / f"{case_id}_{i:04d}{ending}" for i in range(n)]
            cases.append(Case(case_id, list(images), folder / "labelsTr" / f"{case_id}{ending}"))
    match = DATASET_NAME_RE.match(folder.name)
    return DatasetSource(cases, classes, channel_names, name=match.group(2) if match else folder.name)


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
    derived = [_strip_ending(label.name) for _, _, label in rows]
    if len(set(derived)) < len(derived):
        derived = [f"{label.parent.name}_{_strip_ending(label.name)}" for _, _, label in rows]
    cases = [
        Case(case_id if case_id is not None else derived[i], expand_channels(images), label)
        for i, (case_id, images, label) in enumerate(rows)
    ]
    return DatasetSource(
        cases,
        dict(classes) if classes is not None else None,
        list(channel_names) if channel_names is not None else None,
    )


def read_pairs_csv(path: PathLike) -> list[tuple[str, list[Path], Path]]:
    """Rows ``case_id,label,image[,image2,...]`` (optional header row starting with ``case_id``).

    Relative paths are relative to the CSV file's folder. Returns ``(case_id, images, label)``
    tuples for :func:`source_from_pairs`.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"pairs file {path} not found")
    rows = []
    with open(path, newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            row = [cell.strip() for cell in row]
            if not any(row) or row[0].startswith("#"):
                continue
            if number == 1 and row[0].lower() in ("case_id", "case", "id"):
                continue  # header
            if len(row) < 3 or not all(row[:3]):
                raise DatasetError(f"{path} line {number}: expected case_id,label,image[,image2...], got {row}")
            resolve = lambda p: p if p.is_absolute() else path.parent / p  # noqa: E731
            images = [resolve(Path(cell)) for cell in row[2:] if cell]
            rows.append((row[0], images, resolve(Path(row[1]))))
    if not rows:
        raise DatasetError(f"{path} lists no cases")
    return rows


def parse_classes(text: str) -> dict[str, int]:
    """``"background=0,liver=1"`` -> ``{"background": 0, "liver": 1}``."""
    classes: dict[str, int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            classes[name.strip()] = int(value)
        except ValueError:
            raise DatasetError(f"classes must look like 'background=0,liver=1', got {part.strip()!r}") from None
    return classes


def detect_source(path: PathLike) -> DatasetSource:
    """An MSD task folder or an nnU-Net raw folder, told apart by their ``dataset.json``
    (a ``.csv`` file is read as pairs with :func:`read_pairs_csv`)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return source_from_pairs(read_pairs_csv(path))
    if not path.is_dir():
        raise DatasetError(f"{path} is not a folder (expected an MSD task or nnU-Net raw dataset folder)")
    meta = _load_json(path / "dataset.json")
    if "channel_names" in meta or "file_ending" in meta:
        return source_from_nnunet_raw(path)
    if "modality" in meta or "training" in meta:
        return source_from_msd(path)
    raise DatasetError(
        f"{path / 'dataset.json'} is neither an nnU-Net v2 dataset.json (channel_names, file_ending) "
        "nor an MSD one (modality, training)"
    )


# --------------------------------------------------------------------------------------------
# Reading, header first


@dataclass(frozen=True)
class _Header:
    """What a file's header (or a Volume) says, before any voxel is read."""

    size: tuple[int, ...]          # x, y, z (of one channel)
    geometry: Geometry             # of one channel
    pixel_id: int                  # SimpleITK component pixel id
    n_channels: int                # > 1 for 4D or vector files
    plain: bool                    # a single-channel 2D/3D scalar file (can be copied as is)

    @property
    def is_float(self) -> bool:
        return self.pixel_id in _FLOAT_PIXEL_IDS


def _read_header(path: Path) -> _Header:
    """Header-only read (``ReadImageInformation``): cheap geometry checks on big files."""
    if not path.is_file():
        raise DatasetError(f"file not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DatasetError(f"cannot read {path}: {_sitk_reason(error)}") from None
    size, dim, components = reader.GetSize(), reader.GetDimension(), reader.GetNumberOfComponents()
    pixel_id = reader.GetPixelID()
    if components > 1:
        # A vector image: channels are components on one grid.
        return _Header(tuple(size), Geometry.from_image(reader), _component_id(pixel_id), components, False)
    if dim == 4:
        # 4D (MSD multi-channel): the 4th axis is the channel; the 3D geometry is the upper-left block.
        direction = np.reshape(reader.GetDirection(), (4, 4))[:3, :3]
        geometry = Geometry(reader.GetSpacing()[:3], reader.GetOrigin()[:3], direction)
        return _Header(tuple(size[:3]), geometry, pixel_id, int(size[3]), False)
    return _Header(tuple(size), Geometry.from_image(reader), pixel_id, 1, dim in (2, 3))


def _component_id(vector_pixel_id: int) -> int:
    """The scalar pixel id of a vector pixel id (e.g. VectorFloat32 -> Float32)."""
    probe = sitk.Image([1] * 2, vector_pixel_id, 2)
    return sitk.VectorIndexSelectionCast(probe, 0).GetPixelID()


def _sitk_reason(error: Exception) -> str:
    """SimpleITK messages start with a C++ file location; keep the part a user can act on."""
    text = str(error).strip()
    match = re.search(r"(sitk::ERROR|ERROR|Description):\s*(.*)", text, re.S)
    reason = (match.group(2) if match else text).strip().splitlines()
    return reason[0] if reason else "unreadable file"


def _volume_header(volume: Volume) -> _Header:
    array = volume.array
    if array.ndim not in (2, 3):
        raise DatasetError(f"in-memory array has {array.ndim} dimensions; expected a 2D or 3D scalar array per channel")
    assert volume.geometry is not None
    if volume.geometry.dimension != array.ndim:
        raise DatasetError(f"{array.ndim}D array with a {volume.geometry.dimension}D geometry")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise DatasetError(f"unsupported array type {array.dtype}")
    _check_geometry_values(volume.geometry)
    pixel_id = sitk.sitkFloat32 if array.dtype.kind == "f" else sitk.sitkInt32  # only float-ness matters here
    return _Header(volume.size, volume.geometry, pixel_id, 1, False)


def _check_geometry_values(geometry: Geometry) -> None:
    """What NIfTI cannot store or nnU-Net cannot use: non-positive spacing, non-orthonormal axes."""
    values = geometry.spacing + geometry.origin + geometry.direction
    if not all(math.isfinite(v) for v in values):
        raise DatasetError("geometry holds NaN/Inf values")
    if min(geometry.spacing) <= 0:
        raise DatasetError(f"spacing must be positive, got {_fmt(geometry.spacing)}")
    d = geometry.dimension
    matrix = np.reshape(geometry.direction, (d, d))
    if not np.allclose(matrix @ matrix.T, np.eye(d), atol=1e-3):
        raise DatasetError(f"direction {_fmt(geometry.direction)} is not orthonormal")


def _check_nifti_complete(path: Path) -> None:
    """Raise when a NIfTI file holds less voxel data than its header promises.

    ITK zero-fills a truncated ``.nii.gz`` without any error (an interrupted copy or download then
    trains on black voxels), so the stream is decompressed and its length checked here.
    """
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    opener = gzip.open if name.endswith(".gz") else open
    length, head = 0, b""
    try:
        with opener(path, "rb") as handle:
            while True:
                chunk = handle.read(1 << 22)
                if not chunk:
                    break
                if len(head) < 540:
                    head += chunk[: 540 - len(head)]
                length += len(chunk)
    except (EOFError, OSError, zlib.error) as error:
        raise DatasetError(f"{path} is truncated or corrupt ({error})") from None
    expected = _nifti_expected_length(head)
    if expected is not None and length < expected:
        raise DatasetError(f"{path} is truncated: {length} bytes of data, the header needs {expected}")


def _nifti_expected_length(head: bytes) -> Optional[int]:
    """vox_offset + voxels * bytes per voxel from a NIfTI-1 or NIfTI-2 header (None if not parseable)."""
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7:
        return None
    return offset + int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]])) * bitpix // 8


def _spec_header(spec: Union[ChannelSpec, LabelSpec]) -> _Header:
    if isinstance(spec, Volume):
        return _volume_header(spec)
    if isinstance(spec, ChannelFile):
        header = _read_header(spec.path)
        if not 0 <= spec.index < header.n_channels:
            raise DatasetError(f"{spec.path} has {header.n_channels} channel(s), channel {spec.index} requested")
        return header
    header = _read_header(Path(spec))
    if header.n_channels > 1:
        raise DatasetError(
            f"{spec} holds {header.n_channels} channels; give one file per channel or list them as ChannelFile entries"
        )
    return header


class _FileCache:
    """Images of the current case, so a 4D file holding several channels is read once."""

    def __init__(self) -> None:
        self._images: dict[Path, sitk.Image] = {}

    def read(self, path: Path) -> sitk.Image:
        if path not in self._images:
            try:
                self._images[path] = sitk.ReadImage(str(path))
            except RuntimeError as error:
                raise DatasetError(f"cannot read {path}: {_sitk_reason(error)}") from None
        return self._images[path]

    def clear(self) -> None:
        self._images.clear()


def _load_image(spec: Union[ChannelSpec, LabelSpec], cache: _FileCache) -> sitk.Image:
    """The 2D/3D scalar image of one channel or label."""
    if isinstance(spec, Volume):
        return spec.to_image()
    if isinstance(spec, ChannelFile):
        image = cache.read(spec.path)
        if image.GetNumberOfComponentsPerPixel() > 1:
            return sitk.VectorIndexSelectionCast(image, spec.index)
        size = list(image.GetSize())
        size[3] = 0  # collapse the channel axis
        return sitk.Extract(
            image, size, [0, 0, 0, spec.index], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX
        )
    image = cache.read(Path(spec))
    if image.GetDimension() == 4:  # a 4D file with a single channel
        size = list(image.GetSize())
        size[3] = 0
        return sitk.Extract(image, size, [0, 0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    return image


def _array_of(spec: Union[ChannelSpec, LabelSpec], cache: _FileCache) -> np.ndarray:
    if isinstance(spec, Volume):
        return spec.array  # no copy for in-memory data
    # A copy, not GetArrayViewFromImage: _load_image may return a temporary (an Extract of a 4D
    # file), and a view of it would outlive the image and read freed memory.
    return sitk.GetArrayFromImage(_load_image(spec, cache))


# --------------------------------------------------------------------------------------------
# Validation


@dataclass
class _CasePlan:
    """What validation learned about a case and the write step needs (no voxel data)."""

    case: Case
    headers: list[_Header]
    reference: Geometry                 # channel 0's grid: every file is written on it
    dimension: int
    label_values: list[float] = field(default_factory=list)
    value_map: dict[float, int] = field(default_factory=dict)   # own label value -> class value


def _size(size: Sequence[int]) -> str:
    return "x".join(str(n) for n in size)


def _describe(spec: Union[ChannelSpec, LabelSpec]) -> str:
    if isinstance(spec, Volume):
        return "in-memory array"
    if isinstance(spec, ChannelFile):
        return f"{spec.path.name} channel {spec.index}"
    return Path(spec).name


def _check_class_table(classes: Mapping[str, int]) -> list[Problem]:
    problems = []
    values = sorted(classes.values())
    if len(set(values)) != len(values):
        dup = sorted({v for v in values if values.count(v) > 1})
        problems.append(Problem(None, f"class table {dict(classes)} gives several classes the value(s) {dup}"))
    if 0 not in values:
        problems.append(Problem(None, f"class table {dict(classes)} has no background (value 0)"))
    expected = list(range(len(set(values))))
    if sorted(set(values)) != expected:
        problems.append(
            Problem(
                None,
                f"class values must be consecutive 0..{len(expected) - 1} (nnU-Net's rule), got {sorted(set(values))}",
            )
        )
    return problems


def _classes_from_names(cases: Sequence[Case]) -> dict[str, int]:
    """Background, then each segment name in order of first appearance ("Liver" and "liver" are one)."""
    classes = {"background": 0}
    folded = {"background"}
    for case in cases:
        for value, name in sorted((case.label_names or {}).items()):
            key = name.strip().lower()
            if value == 0 or key in folded:
                continue
            folded.add(key)
            classes[name] = len(classes)
    return classes


def _match_name(name: str, classes: Mapping[str, int]) -> Optional[int]:
    """Exact name first, then a case/space-insensitive match (Slicer's "Liver" vs a table's "liver")."""
    if name in classes:
        return classes[name]
    folded = {k.strip().lower(): v for k, v in classes.items()}
    return folded.get(name.strip().lower())


def _validate_case(
    case: Case, n_channels: int, classes: Optional[dict[str, int]], tol: float
) -> tuple[Optional[_CasePlan], list[Problem]]:
    """Check one case, reading it once and dropping the voxels before returning."""
    problems: list[Problem] = []

    def problem(message: str) -> None:
        problems.append(Problem(case.case_id, message))

    if len(case.channels) != n_channels:
        problem(f"has {len(case.channels)} channel(s), expected {n_channels}")
    if not case.channels:
        return None, problems

    # 1. Headers only: readability, channel grids and the label grid, before any voxel is read.
    headers: list[Optional[_Header]] = []
    for i, spec in enumerate(case.channels):
        try:
            header = _spec_header(spec)
        except DatasetError as error:
            problem(f"channel {i}: {error}")
            header = None
        else:
            if header.pixel_id not in _REAL_SCALAR_PIXEL_IDS:
                problem(f"channel {i} ({_describe(spec)}) has an unsupported pixel type")
                header = None
        headers.append(header)
    try:
        label_header: Optional[_Header] = _spec_header(case.label)
    except DatasetError as error:
        problem(f"label: {error}")
        label_header = None
    if label_header is not None and label_header.pixel_id not in _REAL_SCALAR_PIXEL_IDS:
        problem(f"label ({_describe(case.label)}) has an unsupported pixel type")
        label_header = None
    if headers[0] is None:
        return None, problems
    reference, ref_size = headers[0].geometry, headers[0].size
    if len(ref_size) not in (2, 3):
        problem(f"channel 0 is {len(ref_size)}D; expected 2D or 3D")
        return None, problems

    def compare(what: str, header: _Header) -> None:
        if header.size != ref_size:
            problem(f"{what} size {_size(header.size)} differs from channel 0's {_size(ref_size)} (x, y, z voxels)")
            return
        differences = header.geometry.differences(reference, tol)
        if differences:
            problem(f"{what} grid differs from channel 0 (beyond tolerance {tol:g}): " + "; ".join(differences))

    for i, header in enumerate(headers[1:], start=1):
        if header is not None:
            compare(f"channel {i} ({_describe(case.channels[i])})", header)
    if label_header is not None:
        compare(f"label ({_describe(case.label)})", label_header)
    if problems:
        return None, problems  # the grids are wrong: reading voxels would only add noise

    # 2. Voxels, one file at a time: NaN/Inf in images (only float types can hold them).
    cache = _FileCache()
    try:
        specs = (*case.channels, case.label)
        files = [s.path if isinstance(s, ChannelFile) else s for s in specs if not isinstance(s, Volume)]
        for path in dict.fromkeys(files):
            _check_nifti_complete(Path(path))
        for i, (spec, header) in enumerate(zip(case.channels, headers)):
            assert header is not None
            if not header.is_float:
                continue
            array = _array_of(spec, cache)
            finite = np.isfinite(array)
            if not finite.all():
                bad = int(array.size - np.count_nonzero(finite))
                problem(f"channel {i} ({_describe(spec)}) has {bad} NaN/Inf voxel(s)")
            del array, finite
            if not isinstance(spec, ChannelFile):
                cache.clear()  # keep a 4D file for its next channel, drop everything else at once
        cache.clear()

        # 3. The label map: finite, integral, known values, some foreground.
        assert label_header is not None
        array = _array_of(case.label, cache)
        values = _unique_values(array)
        del array
        cache.clear()
    except DatasetError as error:
        problem(str(error))
        return None, problems
    values = _check_label_values(values, problem)
    plan = _CasePlan(case, [h for h in headers if h is not None], reference, len(ref_size), label_values=values)
    if values and classes is not None:
        plan.value_map = _map_values(case, values, classes, problem)
        foreground = {c for c in plan.value_map.values() if c != 0 and c != classes.get("ignore", -1)}
        if not foreground:
            problem(EMPTY_LABEL)
    return (None if problems else plan), problems


def _unique_values(array: np.ndarray) -> np.ndarray:
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
            target = 0 if name.strip().lower() == "background" else _match_name(name, classes)
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
            problem(f"label values {unknown_values} not in the class table ({table})")
        mapping = {v: v for v in values if v in known}
    return mapping


@dataclass
class _Validated:
    plans: list[_CasePlan]
    classes: dict[str, int]
    channel_names: list[str]


def _validate(source: DatasetSource, tol: float, progress: Optional[ProgressCallback], share: float) -> _Validated:
    problems: list[Problem] = []
    cases = list(source.cases)
    ids = [c.case_id for c in cases]
    if len(cases) < 2:
        which = f" ({', '.join(ids)})" if ids else ""
        message = f"only {len(cases)} case(s){which}; nnU-Net needs at least 2"
        problems.append(Problem(ids[0] if len(ids) == 1 else None, message))
    seen: set[str] = set()
    for case_id in ids:
        if case_id in seen:
            problems.append(Problem(case_id, f"duplicate case id (appears {ids.count(case_id)} times)"))
        seen.add(case_id)
        if not CASE_ID_RE.match(case_id):
            message = "invalid case id: use letters, digits, '_', '-', '.' and start with a letter or digit"
            problems.append(Problem(case_id, message))
    problems = list(dict.fromkeys(problems))  # one "duplicate" line per id

    n_channels = len(source.channel_names) if source.channel_names else (len(cases[0].channels) if cases else 1)
    channel_names = list(source.channel_names) if source.channel_names else [f"channel_{i}" for i in range(n_channels)]
    if len(set(channel_names)) != len(channel_names):
        problems.append(Problem(None, f"channel names must be distinct, got {channel_names}"))

    # The class table: given, from segment names, or (None) from the values found below.
    named = [c.label_names is not None for c in cases]
    classes: Optional[dict[str, int]]
    if source.classes is not None:
        classes = dict(source.classes)
        problems += _check_class_table(classes)
    elif cases and all(named):
        classes = _classes_from_names(cases)
    elif any(named):
        unnamed = [c.case_id for c in cases if c.label_names is None]
        problems.append(Problem(unnamed[0], f"cases {unnamed} have no label_names while others do; give a class table"))
        classes = None
    else:
        classes = None

    plans: list[_CasePlan] = []
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
        _emit(progress, share * (index + 1) / max(len(cases), 1), f"checked {case.case_id}")

    if classes is None and not problems:
        # No table given: every value found becomes a class, numbered consecutively as nnU-Net wants.
        found = sorted({v for plan in plans for v in plan.label_values} - {0})
        negative = [v for v in found if v < 0]
        if negative:
            problems.append(Problem(None, f"negative label values {negative} found; give a class table"))
        classes = {"background": 0, **{f"label_{v}": i for i, v in enumerate(found, start=1)}}
        for plan in plans:
            plan.value_map = {v: (0 if v == 0 else classes[f"label_{v}"]) for v in plan.label_values}
            if not any(plan.value_map.values()):
                problems.append(Problem(plan.case.case_id, EMPTY_LABEL))
    if problems:
        raise DatasetError(problems)
    assert classes is not None
    # nnU-Net requires the name "background" for value 0, whatever the table called it.
    classes = {("background" if v == 0 else n): v for n, v in sorted(classes.items(), key=lambda kv: kv[1])}
    return _Validated(plans, classes, channel_names)


def check_source(source: DatasetSource, tolerance: float = GEOMETRY_TOLERANCE) -> dict[str, int]:
    """Validate without writing; return the class table that would be written.

    Raises :class:`DatasetError` listing every problem. Useful for a "Check" button.
    """
    return _validate(source, tolerance, None, 1.0).classes


# --------------------------------------------------------------------------------------------
# Writing


def _emit(progress: Optional[ProgressCallback], fraction: float, message: str) -> None:
    if progress is not None:
        progress(ProgressEvent("progress", {"fraction": round(min(max(fraction, 0.0), 1.0), 4), "message": message}))


def label_dtype(max_value: int) -> np.dtype:
    """The smallest integer type nnU-Net handles for this many classes: uint8, int16 or int32."""
    if max_value <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if max_value <= np.iinfo(np.int16).max:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def _write_case(plan: _CasePlan, images_dir: Path, labels_dir: Path, dtype: np.dtype) -> None:
    case = plan.case
    cache = _FileCache()
    for i, (spec, header) in enumerate(zip(case.channels, plan.headers)):
        target = images_dir / f"{case.case_id}_{i:04d}{FILE_ENDING}"
        same_file_kind = isinstance(spec, Path) and header.plain and spec.name.lower().endswith(FILE_ENDING)
        if same_file_kind and header.geometry == plan.reference:
            # Already what nnU-Net wants: copy the bytes, the most faithful (and fastest) "write".
            shutil.copyfile(spec, target)
            continue
        image = _load_image(spec, cache)
        # Within tolerance is not identical: put every file of the case exactly on channel 0's grid,
        # as nnU-Net's own integrity check compares grids without tolerance.
        plan.reference.apply_to(image)
        sitk.WriteImage(image, str(target), True)
        if not isinstance(spec, ChannelFile):
            cache.clear()
    cache.clear()

    array = np.asarray(_array_of(case.label, cache))
    out = np.zeros(array.shape, dtype=dtype)
    for value, target_value in plan.value_map.items():
        if target_value != 0:
            out[array == value] = target_value
    del array
    cache.clear()
    image = sitk.GetImageFromArray(out)
    plan.reference.apply_to(image)
    sitk.WriteImage(image, str(labels_dir / f"{case.case_id}{FILE_ENDING}"), True)


def _existing_with_id(workspace: Workspace, dataset_id: int, folder_name: str) -> list[Path]:
    """Other datasets with the same number: nnU-Net resolves ``-d N`` by number and fails on two."""
    prefix = f"Dataset{dataset_id:03d}_"
    found = []
    for tree in (workspace.raw, workspace.preprocessed, workspace.results):
        if tree.is_dir():
            found += [p for p in tree.glob(prefix + "*") if p.is_dir() and p.name != folder_name]
    return found


def build_dataset(
    source: DatasetSource,
    workspace: Union[Workspace, PathLike],
    dataset_id: int = 1,
    name: str = "AutoNNUNet",
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
    *,
    tolerance: float = GEOMETRY_TOLERANCE,
) -> Path:
    """Validate every case of ``source``, then write ``workspace.raw/DatasetNNN_Name``.

    Nothing is written until all cases pass; the dataset is assembled in a hidden temporary folder
    beside the target and renamed into place, so on any error the workspace is as it was (an
    existing dataset included). Sets ``workspace.dataset_name``. Returns the dataset folder.

    Raises:
        DatasetError: with every problem found, each naming its case; or when the target exists
            and ``overwrite`` is False; or when another dataset already uses ``dataset_id``.
    """
    if not isinstance(workspace, Workspace):
        workspace = Workspace(Path(workspace))
    try:
        folder_name = dataset_folder_name(dataset_id, name)
    except Exception as error:  # WorkspaceError: id out of range
        raise DatasetError(str(error)) from None
    target = workspace.raw / folder_name
    if target.exists() and not overwrite:
        raise DatasetError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    clashes = _existing_with_id(workspace, dataset_id, folder_name)
    if clashes:
        raise DatasetError(
            f"dataset id {dataset_id} is already used by {', '.join(str(p) for p in clashes)}; choose another id"
        )

    _emit(progress, 0.0, f"checking {len(source.cases)} cases")
    validated = _validate(source, tolerance, progress, 0.5)
    dtype = label_dtype(max(validated.classes.values()))

    workspace.raw.mkdir(parents=True, exist_ok=True)
    # Hidden (leading dot) so nnU-Net's and Workspace's "Dataset*" globs never see it.
    temp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.tmp-", dir=workspace.raw))
    try:
        images_dir, labels_dir = temp / "imagesTr", temp / "labelsTr"
        images_dir.mkdir()
        labels_dir.mkdir()
        for index, plan in enumerate(validated.plans):
            try:
                _write_case(plan, images_dir, labels_dir, dtype)
            except (DatasetError, RuntimeError, OSError) as error:
                # A file changed or vanished since validation, or the disk is full.
                reason = _sitk_reason(error) if isinstance(error, RuntimeError) else str(error)
                raise DatasetError(Problem(plan.case.case_id, f"writing failed: {reason}")) from error
            _emit(progress, 0.5 + 0.5 * (index + 1) / len(validated.plans), f"wrote {plan.case.case_id}")
        dataset_json = {
            "name": name,
            "description": source.description or f"Built by AutoNNUNet from {len(validated.plans)} labeled cases",
            "channel_names": {str(i): n for i, n in enumerate(validated.channel_names)},
            "labels": validated.classes,
            "numTraining": len(validated.plans),
            "file_ending": FILE_ENDING,
        }
        (temp / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        _move_into_place(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if (workspace.preprocessed / folder_name).exists():
        logger.warning("%s was rebuilt: its preprocessed data is stale until fingerprinting runs again", folder_name)
    workspace.dataset_name = folder_name
    _emit(progress, 1.0, f"dataset {folder_name} ready ({len(validated.plans)} cases)")
    return target


def _move_into_place(temp: Path, target: Path) -> None:
    """Rename ``temp`` to ``target``; an existing target is set aside first and restored on failure."""
    if not target.exists():
        os.rename(temp, target)
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, backup)
    try:
        os.rename(temp, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# CLI


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dataset",
        help="build a validated nnU-Net raw dataset (MSD folder, nnU-Net folder or image/label pairs)",
        description=(
            "Validate labeled cases and write them as an nnU-Net v2 raw dataset in WORKDIR/nnUNet_raw. "
            "SOURCE is an MSD task folder or an nnU-Net raw dataset folder; or give --pairs-csv."
        ),
    )
    parser.add_argument("source", nargs="?", type=Path, help="MSD task folder or nnU-Net raw dataset folder")
    parser.add_argument(
        "--pairs-csv", type=Path, metavar="FILE",
        help="CSV with rows case_id,label,image[,image2,...] (paths relative to the CSV)",
    )
    parser.add_argument("--classes", metavar="TABLE", help='class table, e.g. "background=0,liver=1,tumor=2"')
    parser.add_argument(
        "--channel-names", metavar="NAMES", help='channel names, e.g. "T1,T2" ("CT" selects CT normalisation)'
    )
    parser.add_argument("--workdir", required=True, type=Path, help="workspace folder")
    parser.add_argument("--id", dest="dataset_id", type=int, default=1, help="nnU-Net dataset number (default 1)")
    parser.add_argument("--name", help="dataset name (default: the source's own name, else AutoNNUNet)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same id and name")
    parser.set_defaults(func=_run_dataset_command)


def _run_dataset_command(args: argparse.Namespace) -> int:
    if (args.source is None) == (args.pairs_csv is None):
        raise DatasetError("give either SOURCE (MSD or nnU-Net folder) or --pairs-csv FILE")
    classes = parse_classes(args.classes) if args.classes else None
    if args.pairs_csv is not None:
        source = source_from_pairs(read_pairs_csv(args.pairs_csv), classes=classes)
    else:
        source = detect_source(args.source)
        if classes is not None:
            source.classes = classes
    if args.channel_names:
        source.channel_names = [n.strip() for n in args.channel_names.split(",") if n.strip()]
    name = args.name or source.name or "AutoNNUNet"
    workspace = Workspace(args.workdir)
    folder = build_dataset(source, workspace, dataset_id=args.dataset_id, name=name, overwrite=args.overwrite)
    meta = json.loads((folder / "dataset.json").read_text())
    channels = ", ".join(meta["channel_names"].values())
    labels = ", ".join(f"{n}={v}" for n, v in meta["labels"].items())
    print(f"{folder.name}: {meta['numTraining']} cases")
    print(f"  channels: {len(meta['channel_names'])} ({channels})")
    print(f"  classes:  {labels}")
    print(f"  written:  {folder}")
    return 0
