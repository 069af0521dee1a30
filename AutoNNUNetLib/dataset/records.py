"""The records of dataset intake: a case, a source of cases, and the problems found in them.

A source (:class:`DatasetSource`) is a list of :class:`Case` records plus an optional class
table; :func:`~AutoNNUNetLib.dataset.build.build_dataset` turns it into an nnU-Net raw dataset.
Problems are collected as :class:`Problem` records and raised together in one
:class:`DatasetError`, so a user fixes every case in one round instead of one per run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from ..errors import AutoNNUNetError
from ..imaging import Volume

PathLike = Union[str, Path]

#: The only file ending written: nnU-Net reads it with SimpleITKIO, stock tools and Slicer read it.
FILE_ENDING = ".nii.gz"

#: Endings recognised when a case id is derived from a file name (longest first).
KNOWN_ENDINGS = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".tif", ".tiff", ".png")

#: nnU-Net case ids become file names; keep them to characters that are safe everywhere.
CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

#: At most this many problems are spelled out in a DatasetError message (all are in ``.problems``).
MAX_LISTED_PROBLEMS = 40


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
        super().__init__(format_problems(self.problems))

    @property
    def case_ids(self) -> list[str]:
        """Ids of the cases with at least one problem, in report order."""
        return list(dict.fromkeys(p.case_id for p in self.problems if p.case_id is not None))


def format_problems(problems: Sequence[Problem]) -> str:
    """One problem as itself; several as a summary line and one indented line each."""
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

    def files(self) -> list[Path]:
        """Every file this case reads (channels and label), once each, in order."""
        specs = (*self.channels, self.label)
        paths = [s.path if isinstance(s, ChannelFile) else s for s in specs if not isinstance(s, Volume)]
        return list(dict.fromkeys(Path(p) for p in paths))


@dataclass
class DatasetSource:
    """Everything :func:`build_dataset` needs: the cases and the dataset's class table.

    ``classes`` maps class name to label value, e.g. ``{"background": 0, "Anterior": 1}``. Values
    0, 1, 2, ... are written as they are (nnU-Net's rule). Other values (a label map holding 0, 7
    and 8) are the file's *original* values: they are renumbered 1, 2, ... in the written dataset
    and the mapping is recorded in its dataset.json (see :mod:`.classes`). ``None`` derives the
    table: from the cases' ``label_names`` (background, then names in order of first appearance)
    or, without names, from the label values found (``label_1``, ``label_2``, ...).
    ``channel_names`` names the channels (nnU-Net picks CT normalisation for a channel named "CT",
    z-score otherwise); ``None`` means ``channel_0``, ... ``name`` is a suggested dataset name (the
    MSD task's own) used by the CLI. ``folder`` is the folder the source was read from (MSD or
    nnU-Net raw), so every file can be checked to lie inside it.
    """

    cases: list[Case]
    classes: Optional[dict[str, int]] = None
    channel_names: Optional[list[str]] = None
    name: Optional[str] = None
    description: str = ""
    folder: Optional[Path] = None


def case_id_key(case_id: str) -> str:
    """How case ids collide: file names on macOS and Windows ignore letter case."""
    return str(case_id).casefold()


def case_id_from_name(name: str, taken: Iterable[str] = ()) -> str:
    """A file-name-safe case id from a node or file name ("Patient 1 seg" -> "Patient_1_seg").

    Unique among ``taken`` ignoring letter case (:func:`case_id_key`), so the files of two cases
    never land on one file on a case-insensitive file system.
    """
    cleaned = "".join(c if c.isalnum() or c in "-" else "_" for c in str(name).strip())
    cleaned = "_".join(part for part in cleaned.split("_") if part) or "case"
    used = {case_id_key(t) for t in taken}
    candidate, number = cleaned, 2
    while case_id_key(candidate) in used:
        candidate = f"{cleaned}_{number}"
        number += 1
    return candidate
