"""Files of a source stay inside its folder: the rule that keeps an upload from reading the server.

An MSD or nnU-Net ``dataset.json`` names its files by path. Joined blindly to the folder, an
absolute path, a ``..`` or a symbolic link reaches any file the process can read, and a dataset
built from it would hold a copy. Every path a folder reader takes from ``dataset.json`` or from a
folder listing is resolved (links followed) and must lie inside the source folder; the server
checks an extracted upload a second time against its own upload folder with :func:`check_inside`.

Errors about such a path say only that it points outside: nothing about whether the target
exists, what it is or what it holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ..files import is_within
from .records import DatasetError, Problem

if TYPE_CHECKING:
    from .records import DatasetSource

PathLike = Union[str, Path]

OUTSIDE = "points outside the source folder"


def inside(folder: PathLike, entry: Any, what: str) -> Path:
    """``folder / entry`` when it resolves inside ``folder``; :class:`DatasetError` otherwise.

    ``entry`` is a relative path taken from a listing or ``dataset.json``; ``what`` names it in
    the error (e.g. ``"dataset.json 'training' entry 3 image"``). The returned path is the joined
    one (not resolved), so messages keep the names the user knows.
    """
    if not isinstance(entry, (str, Path)) or not str(entry).strip():
        raise DatasetError(f"{what}: expected a relative file path")
    text = str(entry)
    if "\x00" in text:
        raise DatasetError(f"{what}: {OUTSIDE}")
    candidate = Path(folder) / text
    # Absolute entries replace the folder in the join; resolving also follows links and "..".
    if Path(text).is_absolute() or not within(candidate, folder):
        raise DatasetError(f"{what}: {OUTSIDE}")
    return candidate


def within(path: PathLike, folder: PathLike) -> bool:
    """:func:`files.is_within`, False for a path that cannot be resolved at all."""
    try:
        return is_within(path, folder)
    except (OSError, RuntimeError, ValueError):  # a name too long, a link loop: not a usable path
        return False


def outside_files(source: "DatasetSource", root: PathLike) -> list[Problem]:
    """One problem per case with a file that does not resolve inside ``root``."""
    problems = []
    for case in source.cases:
        for path in case.files():
            if not within(path, root):
                problems.append(Problem(case.case_id, f"a file of this case {OUTSIDE}"))
                break
    return problems


def check_inside(source: "DatasetSource", root: PathLike) -> None:
    """Raise :class:`DatasetError` unless every file of every case resolves inside ``root``.

    For a server that extracted an upload into ``root``: call it after reading the source (any
    kind, CSV pairs included) and before building, so a path or link the reader let through, or
    one changed since, is refused. In-memory volumes have no file and always pass.
    """
    problems = outside_files(source, root)
    if problems:
        raise DatasetError(problems)
