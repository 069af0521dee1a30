"""How a job server runs and where it keeps things: settings, the data directory, API errors."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ...errors import AutoNNUNetError
from ...files import PRIVATE_DIR_MODE
from ...jobs import SlurmOptions

API_PREFIX = "/v1"
DB_NAME = "autonnunet.db"
ID_RE = re.compile(r"^[uj][0-9a-f]{16}$")
UPLOAD_KINDS = ("dataset", "images", "model")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
GiB = 1 << 30
MiB = 1 << 20


def default_data_dir() -> Path:
    return Path(os.environ.get("AUTONNUNET_DATA_DIR", Path.home() / ".local" / "share" / "autonnunet-server"))


@dataclass
class ServerSettings:
    """How the server runs; ``gpus`` empty means CPU only (``cpu_slots`` jobs at a time)."""

    data_dir: Path
    gpus: list[str] = field(default_factory=list)
    cpu_slots: int = 1
    executor: str = "local"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    max_upload_bytes: int = 50 * GiB
    min_free_bytes: int = 1 * GiB
    max_chunk_bytes: int = 256 * MiB
    #: Extracted archives may be this many times larger than the archive (compression), at most.
    max_expansion: float = 20.0
    poll_interval: float = 1.0
    max_attempts: int = 5
    #: Per user: unfinished (queued or running) jobs, and uploads still receiving or validating.
    max_queued_jobs: int = 100
    max_open_uploads: int = 10
    python: str = field(default_factory=lambda: sys.executable)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()

    @property
    def devices(self) -> list[str]:
        """The queue's slots: GPU ids, or ``cpu0..`` on a CPU-only server."""
        return list(self.gpus) if self.gpus else [f"cpu{i}" for i in range(max(1, self.cpu_slots))]

    @property
    def uses_gpus(self) -> bool:
        return bool(self.gpus)


def parse_gpus(text: Optional[str]) -> list[str]:
    """``"0,1"`` -> ["0", "1"]; ``""``, ``"cpu"`` or ``"none"`` -> [] (CPU)."""
    if text is None or text.strip().lower() in ("", "cpu", "none"):
        return []
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    for gpu in gpus:
        if not re.fullmatch(r"[0-9]+|[A-Za-z0-9-]+", gpu):
            raise ValueError(f"bad GPU id {gpu!r} in --gpus (use indices like 0,1 or 'cpu')")
    return gpus


class ApiError(AutoNNUNetError):
    """An error answer: HTTP status and a message written for the user."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class UploadError(AutoNNUNetError, ValueError):
    """The uploaded archive is unsafe or is not a usable dataset."""


class DataDir:
    """The data directory's layout. It holds every user's data and the token hashes, so it is
    the owner's alone: folders 0700 and files 0600 (the server runs with umask 077, which its
    job processes inherit); a directory left readable by an older version is made private."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        if self.root.stat().st_mode & 0o077:
            make_private(self.root)
        for sub in ("uploads", "jobs"):
            (self.root / sub).mkdir(exist_ok=True, mode=PRIVATE_DIR_MODE)

    @property
    def db(self) -> Path:
        return self.root / DB_NAME

    def upload(self, upload_id: str) -> Path:
        return self.root / "uploads" / upload_id

    def upload_part(self, upload_id: str) -> Path:
        return self.upload(upload_id) / "upload.part"

    def upload_archive(self, upload_id: str) -> Path:
        return self.upload(upload_id) / "archive"

    def upload_content(self, upload_id: str) -> Path:
        return self.upload(upload_id) / "content"

    def upload_workspace(self, upload_id: str) -> Path:
        return self.upload(upload_id) / "workspace"

    def job(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id


def make_private(root: Path) -> None:
    """Take group and other permissions off ``root`` and everything below it (links untouched)."""
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            with contextlib.suppress(OSError):
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode & 0o700)
    root.chmod(PRIVATE_DIR_MODE)


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"

