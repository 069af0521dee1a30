"""File helpers used across the pipeline: checksums, atomic writes, an inter-process lock.

Each exists once here so that every caller follows the same rule (a reader never sees half a
file; a lock is released by the OS when its holder dies; on every platform Slicer runs on).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

#: Permissions of files the runner creates in its data directory (owner only).
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def sha256_file(path: PathLike, chunk: int = 4 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (models and archives are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def json_default(value: Any) -> Any:
    """JSON encoding for the values records carry: paths, numpy scalars and arrays."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def atomic_write_text(path: PathLike, text: str, mode: Optional[int] = None) -> Path:
    """Write ``text`` through a temporary file in the same folder, fsync, then rename.

    A reader (or a crash) sees the old file or the new one, never half of one. ``mode`` sets the
    file's permissions before it becomes visible.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: PathLike, data: Any, mode: Optional[int] = None, indent: Optional[int] = 2) -> Path:
    """:func:`atomic_write_text` of ``data`` as JSON (paths and numpy values converted)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=json_default), mode=mode)


def read_json(path: PathLike) -> Optional[Any]:
    """The JSON content of ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def file_lock(path: PathLike, timeout: float = -1, poll: Optional[Callable[[], None]] = None,
              poll_interval: float = 0.5) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (POSIX and Windows; released if the holder dies).

    Uses ``filelock`` (a NePS dependency already), so no ``fcntl`` import anywhere else. With
    ``poll`` the wait is a loop that calls it between attempts, so a caller can raise to give up
    waiting (for example when its job is cancelled).
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    if poll is None:
        lock.acquire(timeout=timeout)
    else:
        while True:
            try:
                lock.acquire(timeout=poll_interval)
                break
            except Timeout:
                poll()
    try:
        yield
    finally:
        lock.release()


def is_within(path: PathLike, folder: PathLike) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``folder`` or somewhere inside it."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True
