"""The one safe-extraction rule for zip and tar archives (uploads, model import).

An archive from elsewhere is listed and checked before a byte is written:

- every member name is relative and stays inside the destination: no absolute path, no drive
  letter, no ``..``, no backslash or NUL (:func:`check_member_name`);
- only regular files and folders: symbolic and hard links, devices and FIFOs are refused. A zip
  member whose mode carries no file-type bits (Python's ``ZipFile.writestr`` default, many
  Windows tools) is a regular file, or a folder when its name ends with ``/``;
- a file appears once;
- the declared uncompressed size is at most ``max_ratio`` times the archive's size (counted as
  at least 1 MiB, so small archives of small files pass), and the disk keeps ``min_free_bytes``
  after ``free_factor`` times that size is written (:func:`check_expansion`): a 1 MB zip bomb
  cannot fill the disk;
- while extracting, a member that yields more bytes than its header declared stops the
  extraction, and files are created with ``O_EXCL | O_NOFOLLOW``, so nothing is written through
  a link or over another member.

Standard library only.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, Sequence, Union

from .errors import AutoNNUNetError

PathLike = Union[str, os.PathLike]

MiB = 1 << 20
GiB = 1 << 30
#: Defaults of the rule (the job server passes its own settings).
DEFAULT_MAX_RATIO = 20.0
DEFAULT_MIN_FREE_BYTES = 1 * GiB
DEFAULT_MAX_MEMBERS = 200_000


class ArchiveError(AutoNNUNetError, ValueError):
    """An archive is unsafe, damaged or too large to extract here (names the member or the rule)."""


@dataclass
class Member:
    """A checked archive member: its safe relative path and declared size."""

    path: PurePosixPath
    size: int  # declared uncompressed size; 0 for folders
    is_dir: bool
    source: Any  # the ZipInfo or TarInfo


def check_member_name(name: str) -> PurePosixPath:
    """The member's relative path, or an :class:`ArchiveError` when it could leave the destination."""
    if not name or "\x00" in name:
        raise ArchiveError(f"archive member with an empty or invalid name: {name!r}")
    if "\\" in name:
        raise ArchiveError(f"archive member {name!r} uses backslashes; use '/' separated paths")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/"):
        raise ArchiveError(f"archive member {name!r} is an absolute path; archives must hold relative paths")
    if any(part == ".." for part in path.parts):
        raise ArchiveError(f"archive member {name!r} points outside the archive: it contains '..' (path traversal)")
    if path.parts and re.fullmatch(r"[A-Za-z]:.*", path.parts[0]):
        raise ArchiveError(f"archive member {name!r} is an absolute path (a drive letter)")
    return PurePosixPath(*[p for p in path.parts if p != "."])


def _zip_member(info: zipfile.ZipInfo) -> Member:
    rel = check_member_name(info.filename)
    # Unix file-type bits, when the writer set them; none at all means a plain file (or a folder
    # by its trailing slash).
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = "a symbolic link" if kind == stat.S_IFLNK else "a device or other special file"
        raise ArchiveError(f"archive member {info.filename!r} is {what}; only files and folders are accepted")
    is_dir = info.is_dir() or kind == stat.S_IFDIR
    return Member(rel, 0 if is_dir else int(info.file_size), is_dir, info)


def _tar_member(info: tarfile.TarInfo) -> Member:
    rel = check_member_name(info.name)
    if info.issym() or info.islnk():
        raise ArchiveError(f"archive member {info.name!r} is a link; only files and folders are accepted")
    if not (info.isreg() or info.isdir()):
        raise ArchiveError(f"archive member {info.name!r} is a device, FIFO or other special file")
    return Member(rel, int(info.size) if info.isreg() else 0, info.isdir(), info)


def archive_format(path: PathLike) -> str:
    """``"zip"`` or ``"tar"`` (any compression); an :class:`ArchiveError` for anything else."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        with tarfile.open(path, "r:*"):
            return "tar"
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ArchiveError(f"{Path(path).name} is neither a zip nor a tar archive ({error})") from None


def inspect_archive(path: PathLike, max_members: int = DEFAULT_MAX_MEMBERS) -> tuple[str, list[Member]]:
    """List and check every member (nothing is extracted); returns the format and the members."""
    fmt = archive_format(path)
    members: list[Member] = []
    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
                if len(infos) > max_members:
                    raise ArchiveError(f"archive holds {len(infos)} members; at most {max_members} are accepted")
                members = [_zip_member(info) for info in infos]
        else:
            with tarfile.open(path, "r:*") as archive:
                for info in archive:
                    if len(members) >= max_members:
                        raise ArchiveError(f"archive holds more than {max_members} members")
                    members.append(_tar_member(info))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ArchiveError(f"the archive is damaged: {error}") from None
    seen: set[PurePosixPath] = set()
    for member in members:
        if not member.is_dir:
            if member.path in seen or not member.path.parts:
                raise ArchiveError(f"archive holds the file {str(member.path)!r} twice")
            seen.add(member.path)
    return fmt, members


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def check_expansion(archive_size: int, members: Sequence[Member], dest: PathLike, *,
                    max_ratio: float = DEFAULT_MAX_RATIO, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
                    free_factor: float = 1.0) -> int:
    """Refuse members that expand beyond ``max_ratio`` times the archive, or would leave less than
    ``min_free_bytes`` free on ``dest``'s disk after writing ``free_factor`` times their size.
    Returns their total size."""
    total = sum(m.size for m in members)
    if total > max_ratio * max(int(archive_size), MiB):
        raise ArchiveError(f"the archive expands to {_human(total)}, more than {max_ratio:g} times its size "
                           f"({_human(archive_size)}); refusing it")
    probe = Path(dest)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < free_factor * total + min_free_bytes:
        raise ArchiveError(f"not enough free disk space to extract {_human(total)} "
                           f"(free: {_human(free)}, {_human(min_free_bytes)} must stay free)")
    return total


def extract_members(path: PathLike, dest: PathLike, members: Sequence[Member], fmt: str,
                    target: Optional[Callable[[Member], Optional[PurePosixPath]]] = None) -> None:
    """Extract checked ``members`` into ``dest`` (created; may exist empty).

    ``target`` maps a member to its relative path in ``dest`` (None: skip it); default: its own
    path. Files are created with ``O_EXCL | O_NOFOLLOW``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()

    def place(rel: PurePosixPath) -> Path:
        out = (root / Path(*rel.parts)).resolve() if rel.parts else root
        if out != root and root not in out.parents:
            raise ArchiveError(f"archive member {rel} escapes the extraction folder")
        return out

    def copy(stream: Any, out: Path, size: int, name: str) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        written = 0
        with os.fdopen(fd, "wb") as handle:
            for block in iter(lambda: stream.read(MiB), b""):
                written += len(block)
                if written > size:  # the header lied about the size (zip bomb guard)
                    raise ArchiveError(f"archive member {name} is larger than its header says")
                handle.write(block)

    def chosen(member: Member) -> Optional[PurePosixPath]:
        return member.path if target is None else target(member)

    def open_member(archive: Any, member: Member) -> Any:
        if fmt == "zip":
            return archive.open(member.source)
        stream = archive.extractfile(member.source)
        if stream is None:
            raise ArchiveError(f"archive member {member.path} cannot be read")
        return stream

    try:
        with (zipfile.ZipFile(path) if fmt == "zip" else tarfile.open(path, "r:*")) as archive:
            for member in members:
                rel = chosen(member)
                if rel is None:
                    continue
                out = place(rel)
                if member.is_dir:
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                with open_member(archive, member) as stream:
                    copy(stream, out, member.size, str(member.path))
    except FileExistsError as error:
        raise ArchiveError(f"archive holds the same file twice: {Path(error.filename).name}") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as error:
        raise ArchiveError(f"the archive is damaged: {error}") from None


def safe_extract(path: PathLike, dest: PathLike, *, max_ratio: float = DEFAULT_MAX_RATIO,
                 min_free_bytes: int = DEFAULT_MIN_FREE_BYTES, free_factor: float = 1.0,
                 max_members: int = DEFAULT_MAX_MEMBERS,
                 target: Optional[Callable[[Member], Optional[PurePosixPath]]] = None) -> list[Member]:
    """Check an archive by the rule above and extract it into ``dest``; returns the members written.

    ``target`` selects and places members (see :func:`extract_members`); only the selected ones
    count towards the size limits.
    """
    fmt, members = inspect_archive(path, max_members)
    selected = [m for m in members if (m.path if target is None else target(m)) is not None]
    check_expansion(os.path.getsize(path), selected, dest, max_ratio=max_ratio, min_free_bytes=min_free_bytes,
                    free_factor=free_factor)
    extract_members(path, dest, selected, fmt, target)
    return selected
