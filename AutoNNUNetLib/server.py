"""The job server (``autonnunet serve``): run searches on a GPU machine for remote users.

HTTP JSON API under ``/v1`` (FastAPI, OpenAPI docs at ``/docs``), bearer tokens on everything but
``/v1/health``; a user sees only their own uploads and jobs (another user's id answers 404, the
same as a missing one, so ids cannot be probed).

- Uploads: resumable chunked upload of a dataset archive. ``POST /v1/uploads`` with the total size
  and SHA-256, then ``PUT /v1/uploads/{id}/chunks?offset=N`` (each chunk with its own SHA-256 in
  ``X-Chunk-SHA256`` or ``X-Chunk-CRC32``), ``GET /v1/uploads/{id}`` tells the committed offset to resume from, and
  ``POST /v1/uploads/{id}/complete`` checks the whole SHA-256 and starts validation: archive
  members are checked (no absolute paths, ``..``, links or device files), extracted, and the
  dataset is built with the library's validation (``autonnunet dataset``) before a job may use it.
  Chunks are streamed to disk; nothing is ever held whole in memory.
- Jobs: ``POST /v1/jobs/{search,train,predict}`` with the CLI's parameters and an optional
  ``Idempotency-Key``; a FIFO queue with one slot per GPU (a search with ``workers: N`` takes N
  slots and runs N NePS workers); status with progress from the job's events, log paging, events,
  cancel (kills the whole process tree), artifacts with SHA-256 and HTTP Range.
- Durability: all state is in SQLite (:mod:`AutoNNUNetLib.store`) and in the data directory. Jobs
  run under their own supervisor process (:mod:`AutoNNUNetLib.jobs`), which outlives the server: a
  restarted server re-attaches to running jobs, and re-queues jobs whose processes are gone; a
  re-run search continues its NePS root, so finished trials are kept.

FastAPI and uvicorn are imported only when the app is created, so ``autonnunet --help`` stays fast
and the rest of the library (and the Slicer module) never needs them.
"""


# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations,
# and those name classes imported inside create_app (lazily), which string annotations can't see.
import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, AsyncIterator, Optional, Union

from .errors import AutoNNUNetError
from . import __version__
from .events import ProgressEvent, read_events
from .jobs import (
    ARTIFACTS_DIR, EVENTS_NAME, LOG_NAME, MODEL_DIR_PREFIX, JobExit, JobSpec, LocalJob, PredictParams, ProgressTracker, SearchParams,
    SlurmOptions, Step, TrainParams, read_exit, read_log, sha256_file,
)
from .processes import kill_process_group, process_group_members
from .store import FINAL_JOB_STATES, Artifact, IdempotencyConflict, JobRecord, Store, UploadRecord

log = logging.getLogger("AutoNNUNetLib.server")

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


class ApiError(Exception):
    """An error answer: HTTP status and a message written for the user."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class UploadError(AutoNNUNetError, ValueError):
    """The uploaded archive is unsafe or is not a usable dataset."""


# ---------------------------------------------------------------------------------------------
# Response records (FastAPI renders dataclasses as JSON schemas).
# ---------------------------------------------------------------------------------------------


@dataclass
class Health:
    status: str
    version: str
    executor: str
    slots: int
    gpus: list[str]


@dataclass
class Me:
    user: str


@dataclass
class UploadCreate:
    __pydantic_config__ = {"extra": "forbid"}

    size: int
    sha256: str
    filename: str = "dataset.tar"
    kind: str = "dataset"


@dataclass
class UploadView:
    id: str
    kind: str
    filename: str
    size: int
    sha256: str
    received: int
    state: str
    created: float
    updated: float
    error: Optional[str] = None
    summary: Optional[dict[str, Any]] = None

    @classmethod
    def of(cls, record: UploadRecord) -> "UploadView":
        data = asdict(record)
        data.pop("user")
        return cls(**data)


@dataclass
class JobView:
    id: str
    kind: str
    state: str
    params: dict[str, Any]
    created: float
    started: Optional[float] = None
    finished: Optional[float] = None
    attempts: int = 0
    exit_code: Optional[int] = None
    error: Optional[str] = None
    progress: Optional[dict[str, Any]] = None
    artifacts: list[Artifact] = field(default_factory=list)
    devices: Optional[list[str]] = None
    cancel_requested: bool = False
    queue_position: Optional[int] = None


@dataclass
class LogChunk:
    offset: int
    next_offset: int
    size: int
    text: str
    complete: bool  # the job has ended and everything up to ``size`` was returned


@dataclass
class EventsChunk:
    events: list[dict[str, Any]]
    next_offset: int
    complete: bool


# ---------------------------------------------------------------------------------------------
# Data directory layout
# ---------------------------------------------------------------------------------------------


class DataDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        for sub in ("uploads", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

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


# ---------------------------------------------------------------------------------------------
# Archive safety
# ---------------------------------------------------------------------------------------------


def _check_member_name(name: str) -> PurePosixPath:
    if not name or "\x00" in name:
        raise UploadError(f"archive member with an empty or invalid name: {name!r}")
    if "\\" in name:
        raise UploadError(f"archive member {name!r} uses backslashes; use '/' separated paths")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/"):
        raise UploadError(f"archive member {name!r} has an absolute path; archives must hold relative paths")
    if any(part == ".." for part in path.parts):
        raise UploadError(f"archive member {name!r} points outside the archive ('..')")
    if path.parts and re.fullmatch(r"[A-Za-z]:.*", path.parts[0]):
        raise UploadError(f"archive member {name!r} has a drive letter")
    return PurePosixPath(*[p for p in path.parts if p != "."])


@dataclass
class _Member:
    path: PurePosixPath
    size: int
    is_dir: bool
    source: Any  # TarInfo or ZipInfo


def inspect_archive(path: Path, max_members: int = 200_000) -> tuple[str, list[_Member]]:
    """List a tar (any compression) or zip archive, refusing anything that is not a plain file or
    folder with a safe relative name. Nothing is extracted here."""
    members: list[_Member] = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if len(infos) > max_members:
                raise UploadError(f"archive holds {len(infos)} members; at most {max_members} are accepted")
            for info in infos:
                rel = _check_member_name(info.filename)
                # Unix file type bits, when the writer set them (many zip writers leave them 0).
                mode = info.external_attr >> 16
                is_dir = info.is_dir()
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                    kind = "a symbolic link" if stat.S_ISLNK(mode) else "a special file"
                    raise UploadError(f"archive member {info.filename!r} is {kind}; only files and folders are accepted")
                members.append(_Member(rel, 0 if is_dir else info.file_size, is_dir, info))
        return "zip", members
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as error:
        raise UploadError(f"the upload is neither a tar nor a zip archive ({error})") from None
    with archive:
        try:
            for info in archive:
                if len(members) >= max_members:
                    raise UploadError(f"archive holds more than {max_members} members")
                rel = _check_member_name(info.name)
                if info.issym() or info.islnk():
                    raise UploadError(f"archive member {info.name!r} is a link; only files and folders are accepted")
                if not (info.isreg() or info.isdir()):
                    raise UploadError(f"archive member {info.name!r} is a device, FIFO or other special file")
                members.append(_Member(rel, info.size if info.isreg() else 0, info.isdir(), info))
        except (tarfile.TarError, EOFError, OSError) as error:
            raise UploadError(f"the archive is damaged: {error}") from None
    return "tar", members


def extract_archive(path: Path, dest: Path, members: list[_Member], fmt: str) -> None:
    """Extract checked members into ``dest`` (which must not exist).

    Files are created with ``O_EXCL | O_NOFOLLOW``, so a duplicate member or anything that is
    not a fresh regular file inside ``dest`` fails instead of being written through.
    """
    dest.mkdir(parents=True)
    root = dest.resolve()

    def target(rel: PurePosixPath) -> Path:
        out = (root / Path(*rel.parts)).resolve() if rel.parts else root
        if out != root and root not in out.parents:
            raise UploadError(f"archive member {rel} escapes the extraction folder")
        return out

    def copy(stream: Any, out: Path, size: int) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        written = 0
        with os.fdopen(fd, "wb") as handle:
            for block in iter(lambda: stream.read(MiB), b""):
                written += len(block)
                if written > size:  # the header lied about the size (zip bomb guard)
                    raise UploadError(f"archive member {out.name} is larger than its header says")
                handle.write(block)

    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as archive:
                for member in members:
                    out = target(member.path)
                    if member.is_dir:
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    with archive.open(member.source) as stream:
                        copy(stream, out, member.size)
        else:
            with tarfile.open(path, "r:*") as archive:
                for member in members:
                    out = target(member.path)
                    if member.is_dir:
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    stream = archive.extractfile(member.source)
                    if stream is None:
                        raise UploadError(f"archive member {member.path} cannot be read")
                    with stream:
                        copy(stream, out, member.size)
    except FileExistsError as error:
        raise UploadError(f"archive holds the same file twice: {Path(error.filename).name}") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as error:
        raise UploadError(f"the archive is damaged: {error}") from None


def find_dataset_root(folder: Path) -> Path:
    """The folder holding ``dataset.json``: the archive's root or its single top folder."""
    if (folder / "dataset.json").is_file():
        return folder
    found = sorted(p.parent for p in folder.glob("*/dataset.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UploadError("no dataset.json in the archive (expected an MSD task or nnU-Net raw dataset folder)")
    raise UploadError(f"the archive holds several datasets ({', '.join(p.name for p in found)}); upload one")


def find_images_root(folder: Path) -> tuple[Path, int]:
    """The folder holding images named ``<case>_<XXXX>.<ext>`` (nnU-Net's input naming)."""
    pattern = re.compile(r"^(.+)_(\d{4})(" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES) + ")$")
    best: tuple[Optional[Path], int] = (None, 0)
    for candidate in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        count = sum(1 for p in candidate.iterdir() if p.is_file() and pattern.match(p.name))
        if count > best[1]:
            best = (candidate, count)
    if best[0] is None:
        raise UploadError("no images named <case>_0000.nii.gz (nnU-Net naming) in the archive")
    return best[0], best[1]


# ---------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------


class _ChunkSink:
    """Writes and checksums a chunk's bytes in a worker thread while the next bytes arrive.

    Receiving (HTTP parsing) runs on the event loop; writing and hashing run in a thread (hashlib
    and zlib release the GIL), one block at a time and in order, so the two overlap on two cores
    and at most two blocks are in memory.
    """

    BLOCK = 1 << 20

    def __init__(self, fd: int, digest: Any, crc: bool, total: Any):
        self.fd = fd
        self.digest = digest
        self.use_crc = crc
        self.crc = 0
        self.total = total
        self.received = 0

    def _process(self, pieces: list[bytes]) -> None:
        # The pieces as received: one writev and no concatenation, so no extra copy of the data.
        views = [memoryview(p) for p in pieces]
        while views:
            written = os.writev(self.fd, views[:512])  # within IOV_MAX even for tiny pieces
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
        for piece in pieces:
            if self.digest is not None:
                self.digest.update(piece)
            if self.use_crc:
                self.crc = zlib.crc32(piece, self.crc)
            if self.total is not None:
                self.total.update(piece)

    async def consume(self, chunks: AsyncIterator[bytes], limit: int) -> None:
        pending: Optional[asyncio.Future] = None
        block: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        try:
            async for piece in chunks:
                if not piece:
                    continue
                self.received += len(piece)
                if self.received > limit:
                    raise ApiError(413, "chunk goes past the declared size or the chunk limit")
                block.append(piece)
                size += len(piece)
                if size >= self.BLOCK:
                    if pending is not None:
                        await pending
                    pending = loop.run_in_executor(None, self._process, block)
                    block, size = [], 0
            if pending is not None:
                await pending
                pending = None
            if block:
                await loop.run_in_executor(None, self._process, block)
        finally:
            if pending is not None:  # don't let the caller truncate the file under a running write
                with contextlib.suppress(Exception):
                    await pending


class UploadService:
    """Receives, checks and validates uploaded archives."""

    def __init__(self, settings: ServerSettings, store: Store, paths: DataDir):
        self.settings = settings
        self.store = store
        self.paths = paths
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        # Running SHA-256 of each upload up to its committed offset, so ``complete`` needs no
        # second pass over a large file. Lost on restart; then the file is hashed once.
        self._hashers: dict[str, tuple[int, Any]] = {}
        self._validator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload-validate")

    def own(self, user: str, upload_id: str) -> UploadRecord:
        record = self.store.get_upload(upload_id, user=user) if ID_RE.match(upload_id) else None
        if record is None:
            raise ApiError(404, f"no upload {upload_id!r} for user {user!r}")
        return record

    def create(self, user: str, body: UploadCreate) -> tuple[UploadRecord, bool]:
        if body.kind not in UPLOAD_KINDS:
            raise ApiError(422, f"upload kind must be one of {', '.join(UPLOAD_KINDS)}")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", body.sha256 or ""):
            raise ApiError(422, "sha256 must be the 64 hex digits of the archive's SHA-256")
        if not 0 < body.size:
            raise ApiError(422, "size must be a positive number of bytes")
        if body.size > self.settings.max_upload_bytes:
            raise ApiError(413, f"upload of {_human(body.size)} exceeds the server's limit of "
                                f"{_human(self.settings.max_upload_bytes)}")
        sha = body.sha256.lower()
        existing = self.store.find_upload(user, body.kind, sha, body.size)
        if existing is not None:  # resume (or reuse) instead of receiving the same bytes twice
            return existing, False
        # Archive + extracted copy + the dataset built from it: about three times the archive.
        needed = 3 * body.size + self.settings.min_free_bytes
        free = shutil.disk_usage(self.paths.root).free
        if free < needed:
            raise ApiError(507, f"not enough free disk space on the server for {_human(body.size)}: "
                                f"needs {_human(needed)}, has {_human(free)}")
        filename = PurePosixPath(body.filename.replace("\\", "/")).name[:200] or "dataset.tar"
        record = self.store.create_upload(user, body.kind, filename, body.size, sha)
        self.paths.upload(record.id).mkdir(parents=True, exist_ok=True)
        return record, True

    async def write_chunk(self, user: str, upload_id: str, offset: int, chunks: AsyncIterator[bytes],
                          content_length: Optional[int], chunk_sha256: Optional[str],
                          chunk_crc32: Optional[str] = None) -> UploadRecord:
        """Append one chunk at ``offset`` (which must be the committed offset).

        A chunk may carry its SHA-256 or, cheaper, its CRC32 (8 hex digits): either detects damage
        in transit, and a damaged chunk is dropped so the client can send it again. The CRC is
        the default of our client because the server already pays one SHA-256 over every byte
        (the whole file's, checked at ``complete``, which catches anything a CRC could miss).
        """
        # SQLite calls block (a commit may wait for the disk): keep them off the event loop.
        record = await asyncio.to_thread(self.own, user, upload_id)
        if record.state != "receiving":
            raise ApiError(409, f"upload {upload_id} is {record.state}; it accepts no more data")
        if offset != record.received:
            raise ApiError(409, f"chunk offset {offset} does not match the server's offset {record.received}; "
                                f"resume from {record.received}", {"Upload-Offset": str(record.received)})
        if content_length is not None and offset + content_length > record.size:
            raise ApiError(413, f"chunk of {content_length} bytes at offset {offset} goes past the declared size "
                                f"{record.size}")
        if content_length is not None and content_length > self.settings.max_chunk_bytes:
            raise ApiError(413, f"chunks may be at most {_human(self.settings.max_chunk_bytes)}")
        if chunk_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", chunk_sha256):
            raise ApiError(422, "X-Chunk-SHA256 must be 64 hex digits")
        if chunk_crc32 is not None and not re.fullmatch(r"[0-9a-fA-F]{8}", chunk_crc32):
            raise ApiError(422, "X-Chunk-CRC32 must be 8 hex digits")
        with self._busy_lock:
            if upload_id in self._busy:
                raise ApiError(409, f"another chunk of upload {upload_id} is being written")
            self._busy.add(upload_id)
        path = self.paths.upload_part(upload_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        committed = False
        try:
            # Bytes past the committed offset are a chunk that was cut off (dropped connection,
            # killed server): never part of the upload.
            if os.fstat(fd).st_size != offset:
                os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
            cached = self._hashers.get(upload_id)
            sink = _ChunkSink(fd, hashlib.sha256() if chunk_sha256 is not None else None, chunk_crc32 is not None,
                              cached[1].copy() if cached and cached[0] == offset else None)
            limit = min(record.size - offset, self.settings.max_chunk_bytes)
            await sink.consume(chunks, limit)
            if (sink.digest is not None and sink.digest.hexdigest() != chunk_sha256.lower()) or (
                    chunk_crc32 is not None and sink.crc != int(chunk_crc32, 16)):
                kind = "SHA-256" if sink.digest is not None else "CRC32"
                raise ApiError(422, f"chunk at offset {offset} failed its {kind} check (corrupted in transit); "
                                    "send it again")
            end = offset + sink.received
            if not await asyncio.to_thread(self.store.advance_upload, upload_id, offset, end):
                raise ApiError(409, f"upload {upload_id} changed while this chunk was written; query its offset")
            committed = True
            if sink.total is not None:
                self._hashers[upload_id] = (end, sink.total)
        finally:
            if not committed:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, offset)
            os.close(fd)
            with self._busy_lock:
                self._busy.discard(upload_id)
        updated = await asyncio.to_thread(self.store.get_upload, upload_id)
        assert updated is not None
        return updated

    def complete(self, user: str, upload_id: str) -> UploadRecord:
        record = self.own(user, upload_id)
        if record.state in ("validating", "ready"):
            return record
        if record.state == "invalid":
            raise ApiError(409, f"upload {upload_id} is invalid: {record.error}")
        if record.received != record.size:
            raise ApiError(409, f"upload {upload_id} is incomplete: {record.received} of {record.size} bytes "
                                f"received; resume from offset {record.received}",
                           {"Upload-Offset": str(record.received)})
        part = self.paths.upload_part(upload_id)
        cached = self._hashers.pop(upload_id, None)
        digest = cached[1].hexdigest() if cached and cached[0] == record.size else sha256_file(part)
        if digest != record.sha256:
            self.store.set_upload_state(upload_id, "invalid", error=f"SHA-256 mismatch: received data hashes to "
                                        f"{digest}, expected {record.sha256}; upload the archive again")
            with contextlib.suppress(OSError):
                part.unlink()
            raise ApiError(422, f"upload {upload_id} failed its SHA-256 check (expected {record.sha256}, got "
                                f"{digest}); start a new upload")
        os.replace(part, self.paths.upload_archive(upload_id))
        self.store.set_upload_state(upload_id, "validating", expect="receiving")
        self._validator.submit(self.validate, upload_id)
        updated = self.store.get_upload(upload_id)
        assert updated is not None
        return updated

    def recover(self) -> None:
        """After a restart: validations that were interrupted run again."""
        for record in self.store.list_uploads(state="validating"):
            self._validator.submit(self.validate, record.id)

    def validate(self, upload_id: str) -> None:
        record = self.store.get_upload(upload_id)
        if record is None or record.state != "validating":
            return
        try:
            summary = self._validate(record)
        except UploadError as error:
            log.info("upload %s rejected: %s", upload_id, error)
            self._clear_extracted(upload_id)
            self.store.set_upload_state(upload_id, "invalid", error=str(error))
            return
        except Exception as error:  # keep the server alive; the user sees what went wrong
            log.exception("validation of upload %s failed", upload_id)
            self._clear_extracted(upload_id)
            self.store.set_upload_state(upload_id, "invalid", error=f"validation failed: {error}")
            return
        self.store.set_upload_state(upload_id, "ready", summary=summary, expect="validating")

    def _clear_extracted(self, upload_id: str) -> None:
        for path in (self.paths.upload_content(upload_id), self.paths.upload_workspace(upload_id)):
            shutil.rmtree(path, ignore_errors=True)

    def _run_cli(self, upload_id: str, argv: list[str]) -> tuple[int, str]:
        log_path = self.paths.upload(upload_id) / "validate.log"
        with open(log_path, "ab") as out:
            code = subprocess.call([self.settings.python, "-m", "AutoNNUNetLib", *argv], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = log_path.read_text(errors="replace").strip().splitlines()
        # The CLI prints user errors as one line "autonnunet VERB: error: message".
        errors = [line.split(": error: ", 1)[1] for line in lines if ": error: " in line]
        return code, errors[-1] if errors else (lines[-1] if lines else "")

    def _validate(self, record: UploadRecord) -> dict[str, Any]:
        archive = self.paths.upload_archive(record.id)
        # Make the archive durable here, off the client's request: flushing a large file takes
        # seconds, and until validation ends nothing depends on it.
        with open(archive, "rb+") as handle:
            os.fsync(handle.fileno())
        self._clear_extracted(record.id)
        workspace = self.paths.upload_workspace(record.id)
        if record.kind == "model":
            if not zipfile.is_zipfile(archive):
                raise UploadError("a model upload must be a zip written by `autonnunet export-model`")
            code, message = self._run_cli(record.id, ["import-model", str(archive), str(workspace / "model")])
            if code != 0:
                raise UploadError(f"not a usable model archive: {message}")
            return {"model": True}
        fmt, members = inspect_archive(archive)
        total = sum(m.size for m in members)
        if total > self.settings.max_expansion * max(record.size, MiB):
            raise UploadError(f"the archive expands to {_human(total)}, more than {self.settings.max_expansion:g} "
                              "times its size; refusing it")
        free = shutil.disk_usage(self.paths.root).free
        if free < 2 * total + self.settings.min_free_bytes:
            raise UploadError(f"not enough free disk space to extract {_human(total)} (free: {_human(free)})")
        content = self.paths.upload_content(record.id)
        extract_archive(archive, content, members, fmt)
        if record.kind == "images":
            folder, count = find_images_root(content)
            return {"images": count, "folder": str(folder.relative_to(content))}
        source = find_dataset_root(content)
        code, message = self._run_cli(record.id, ["dataset", str(source), "--workdir", str(workspace), "--overwrite"])
        if code != 0:
            raise UploadError(f"not a valid dataset: {message}")
        datasets = sorted((workspace / "nnUNet_raw").glob("Dataset*/dataset.json"))
        if len(datasets) != 1:
            raise UploadError("dataset building produced no dataset")
        meta = json.loads(datasets[0].read_text())
        return {
            "dataset": datasets[0].parent.name,
            "cases": meta.get("numTraining"),
            "channels": meta.get("channel_names"),
            "labels": meta.get("labels"),
            "file_ending": meta.get("file_ending"),
        }

    def delete(self, user: str, upload_id: str, jobs: "JobQueue") -> None:
        record = self.own(user, upload_id)
        if record.state == "validating":  # the validation thread is writing into its folder
            raise ApiError(409, f"upload {upload_id} is being validated; delete it when that has ended")
        active = [j.id for j in self.store.jobs_using_upload(upload_id) if j.state not in FINAL_JOB_STATES]
        if active:
            raise ApiError(409, f"upload {upload_id} is used by unfinished job(s) {', '.join(active)}")
        with self._busy_lock:
            if upload_id in self._busy:
                raise ApiError(409, f"upload {upload_id} is receiving a chunk")
        self.store.delete_upload(record.id)
        self._hashers.pop(upload_id, None)
        shutil.rmtree(self.paths.upload(upload_id), ignore_errors=True)

    def shutdown(self) -> None:
        self._validator.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Jobs: queue, supervisor processes, progress
# ---------------------------------------------------------------------------------------------


class JobQueue:
    """FIFO queue with one slot per GPU; a background thread starts, watches and finishes jobs."""

    def __init__(self, settings: ServerSettings, store: Store, paths: DataDir):
        self.settings = settings
        self.store = store
        self.paths = paths
        self.lock = threading.RLock()
        self.handles: dict[str, LocalJob] = {}
        self.trackers: dict[str, ProgressTracker] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="job-queue", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; running jobs keep running and are re-attached by the next server."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the queue must survive a bad job; the error is in the server log
                log.exception("job queue tick failed")
            self._wake.wait(self.settings.poll_interval)
            self._wake.clear()

    # -- submit ---------------------------------------------------------------------------------
    def own(self, user: str, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id, user=user) if ID_RE.match(job_id) else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r} for user {user!r}")
        return job

    def _ready_upload(self, user: str, upload_id: str, kind: str) -> UploadRecord:
        record = self.store.get_upload(upload_id, user=user) if ID_RE.match(upload_id or "") else None
        if record is None:
            raise ApiError(404, f"no upload {upload_id!r} for user {user!r}")
        if record.kind != kind:
            raise ApiError(422, f"upload {upload_id} holds a {record.kind}, this job needs a {kind}")
        if record.state != "ready":
            detail = f": {record.error}" if record.error else ""
            raise ApiError(409, f"upload {upload_id} is {record.state}{detail}; a job needs a ready upload")
        return record

    def submit(self, user: str, kind: str, params: Union[SearchParams, TrainParams, PredictParams],
               idempotency_key: Optional[str]) -> tuple[JobRecord, bool]:
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
            raise ApiError(422, "Idempotency-Key must be 1 to 200 characters")
        slots = 1
        if isinstance(params, SearchParams):
            self._ready_upload(user, params.upload_id, "dataset")
            slots = params.workers
        elif isinstance(params, TrainParams):
            self._ready_upload(user, params.upload_id, "dataset")
        else:
            self._ready_upload(user, params.images_upload_id, "images")
            if params.model_upload_id is not None:
                self._ready_upload(user, params.model_upload_id, "model")
            else:
                source = self.own(user, params.model_job_id or "")
                if source.kind not in ("search", "train") or source.state != "succeeded":
                    raise ApiError(409, f"job {source.id} is a {source.state} {source.kind} job; predicting needs a "
                                        "succeeded search or train job")
                if not (self.paths.job(source.id) / ARTIFACTS_DIR / "model.zip").is_file():
                    raise ApiError(409, f"job {source.id} has no model artifact")
        if slots > len(self.settings.devices):
            raise ApiError(422, f"the job asks for {slots} workers but this server has {len(self.settings.devices)} "
                                f"slot(s) ({'GPUs ' + ','.join(self.settings.gpus) if self.settings.gpus else 'CPU'})")
        try:
            job, created = self.store.create_job(user, kind, asdict(params), slots=slots,
                                                 idempotency_key=idempotency_key)
        except IdempotencyConflict as error:
            raise ApiError(422, str(error)) from None
        if created:
            self.wake()
        return job, created

    # -- the loop -------------------------------------------------------------------------------
    def tick(self) -> None:
        with self.lock:
            for job in self.store.list_jobs(states=("running",)):
                self._watch(job)
            self._start_queued()

    def _watch(self, job: JobRecord) -> None:
        job_dir = self.paths.job(job.id)
        handle = self.handles.get(job.id)
        if handle is None:
            # Not started by this server process: the server was restarted while the job ran.
            handle = LocalJob.attach(job_dir, job.pid)
            if handle is None:
                ended = read_exit(job_dir)
                if ended is None:
                    self._interrupted(job)
                else:
                    self._finish(job, ended)
                return
            self.handles[job.id] = handle
            self._note(job.id, "server restarted; re-attached to the running job")
        ended = handle.poll()
        self._update_progress(job)
        if ended is not None:
            self._finish(job, ended)

    def _tracker(self, job_id: str) -> ProgressTracker:
        tracker = self.trackers.get(job_id)
        if tracker is None:
            tracker = self.trackers[job_id] = ProgressTracker(self.paths.job(job_id) / EVENTS_NAME)
        return tracker

    def _update_progress(self, job: JobRecord) -> None:
        tracker = self._tracker(job.id)
        if tracker.poll():
            self.store.update_job(job.id, progress=tracker.progress.to_dict(), events_offset=tracker.offset)

    def _note(self, job_id: str, message: str, event: bool = True) -> None:
        """A line in the job's log (and a stage event) so users see what the server did to it."""
        job_dir = self.paths.job(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        with open(job_dir / LOG_NAME, "ab") as handle:
            handle.write(f"[autonnunet server] {time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n".encode())
        if event:
            from .events import EventWriter

            EventWriter(job_dir / EVENTS_NAME).emit("stage", name="server", message=message)

    def _interrupted(self, job: JobRecord) -> None:
        """The job's processes are gone without an end record (server and job were killed)."""
        # Workers may outlive a supervisor that was killed alone; end them before re-running,
        # but only if the group still is this job's (pids get reused after a reboot).
        if job.pid and _group_runs_job(job.pid, job.id) and kill_process_group(job.pid, grace=2.0) is False:
            log.warning("job %s: processes of group %s survive SIGKILL", job.id, job.pid)
        if job.cancel_requested:
            self._finish(job, JobExit("cancelled", None, "cancelled"))
            return
        if job.attempts >= self.settings.max_attempts:
            self._finish(job, JobExit("failed", None, f"interrupted {job.attempts} times; giving up"))
            return
        self._note(job.id, f"job was interrupted (attempt {job.attempts}); queued to resume where it stopped")
        self.store.update_job(job.id, expect_state="running", state="queued", pid=None, devices=None)
        self.handles.pop(job.id, None)

    def _start_queued(self) -> None:
        running = self.store.list_jobs(states=("running",))
        busy = {d for job in running for d in (job.devices or [])}
        free = [d for d in self.settings.devices if d not in busy]
        for job in self.store.list_jobs(states=("queued",)):
            if job.cancel_requested:
                self.store.update_job(job.id, expect_state="queued", state="cancelled", finished=time.time())
                continue
            if job.slots > len(free):
                break  # strict FIFO: a job needing several GPUs is not starved by smaller ones
            devices, free = free[: job.slots], free[job.slots:]
            try:
                spec = self.build_spec(job, devices)
                resumed = job.attempts > 0
                handle = LocalJob.start(
                    spec, banner=f"attempt {job.attempts + 1}" + (" (resuming)" if resumed else ""))
            except Exception as error:
                log.exception("job %s could not start", job.id)
                self.store.update_job(job.id, expect_state="queued", state="failed", finished=time.time(),
                                      error=f"could not start: {error}")
                free = devices + free
                continue
            self.handles[job.id] = handle
            self.store.update_job(job.id, expect_state="queued", state="running", pid=handle.pid,
                                  devices=devices, attempts=job.attempts + 1,
                                  started=job.started or time.time())

    def _finish(self, job: JobRecord, ended: JobExit) -> None:
        state = "cancelled" if job.cancel_requested else ended.state
        artifacts = self._collect_artifacts(job.id) if state == "succeeded" else []
        if state == "succeeded" and not artifacts:
            state, ended = "failed", JobExit("failed", ended.exit_code, "the job produced no artifacts")
        self._update_progress(job)
        self.store.update_job(job.id, state=state, finished=time.time(), exit_code=ended.exit_code,
                              error=ended.message if state == "failed" else None, artifacts=artifacts)
        self.handles.pop(job.id, None)
        self.trackers.pop(job.id, None)
        self.wake()

    def _collect_artifacts(self, job_id: str) -> list[Artifact]:
        folder = self.paths.job(job_id) / ARTIFACTS_DIR
        if not folder.is_dir():
            return []
        descriptions = {"model.zip": "the incumbent model (nnU-Net results layout, zip)",
                        "results.json": "search results: trials and incumbent",
                        "trials.csv": "table of all trials", "report.zip": "search report (HTML and plots)",
                        "record.json": "training record", "predictions.zip": "predicted label maps"}
        return [
            Artifact(path.name, path.stat().st_size, sha256_file(path), descriptions.get(path.name, ""))
            for path in sorted(folder.iterdir())
            if path.is_file() and not path.name.startswith(".") and not path.name.endswith((".tmp", ".sha256"))
        ]

    # -- cancel ---------------------------------------------------------------------------------
    def cancel(self, user: str, job_id: str) -> JobRecord:
        job = self.own(user, job_id)
        if job.state in FINAL_JOB_STATES:
            return job
        self.store.update_job(job.id, cancel_requested=True)
        if self.store.update_job(job.id, expect_state="queued", state="cancelled", finished=time.time()):
            return self.own(user, job_id)
        with self.lock:
            handle = self.handles.get(job.id) or LocalJob.attach(self.paths.job(job.id), job.pid)
        # Kill outside the queue lock: status polling and other jobs go on during the grace period.
        if handle is not None:
            handle.cancel()
        elif job.pid and _group_runs_job(job.pid, job.id):
            kill_process_group(job.pid)
        with self.lock:
            current = self.store.get_job(job.id)
            if current is not None and current.state == "running":
                self._note(job.id, "cancelled by the user", event=False)
                self._finish(current, JobExit("cancelled", None, "cancelled"))
        return self.own(user, job_id)

    def delete(self, user: str, job_id: str) -> None:
        job = self.own(user, job_id)
        if job.state not in FINAL_JOB_STATES:
            raise ApiError(409, f"job {job_id} is {job.state}; cancel it first")
        with self.store.transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
        shutil.rmtree(self.paths.job(job.id), ignore_errors=True)

    # -- views ----------------------------------------------------------------------------------
    def view(self, job: JobRecord) -> JobView:
        position = None
        if job.state == "queued":
            position = sum(1 for other in self.store.list_jobs(states=("queued",)) if other.seq < job.seq)
        return JobView(
            id=job.id, kind=job.kind, state=job.state, params=job.params, created=job.created, started=job.started,
            finished=job.finished, attempts=job.attempts, exit_code=job.exit_code, error=job.error,
            progress=job.progress, artifacts=job.artifacts, devices=job.devices,
            cancel_requested=job.cancel_requested, queue_position=position,
        )

    # -- what a job runs ------------------------------------------------------------------------
    def _device_env(self, devices: list[str]) -> tuple[list[dict[str, str]], str]:
        """One environment overlay per worker, and the ``--device`` to pass."""
        if self.settings.uses_gpus:
            return [{"CUDA_VISIBLE_DEVICES": d} for d in devices], "cuda"
        return [{"CUDA_VISIBLE_DEVICES": ""} for _ in devices], "cpu"

    def build_spec(self, job: JobRecord, devices: list[str]) -> JobSpec:
        job_dir = self.paths.job(job.id)
        job_dir.mkdir(parents=True, exist_ok=True)
        artifacts = job_dir / ARTIFACTS_DIR
        events = str(job_dir / EVENTS_NAME)
        workers, device = self._device_env(devices)
        steps: list[Step] = []

        def plan_step(workspace: Path) -> Step:
            # Planning is per upload, shared by its jobs: a lock so two jobs don't plan at once,
            # a marker so it runs once (also across a server restart).
            return Step(name="plan", argv=["fingerprint", "--workdir", str(workspace)],
                        lock=str(workspace / ".plan.lock"), done_marker=str(workspace / ".planned"),
                        message="fingerprint, plan and preprocess the dataset")

        if job.kind == "search":
            params = SearchParams(**job.params)
            workspace = self.paths.upload_workspace(params.upload_id)
            root = job_dir / "root"
            # The search verb runs its own NePS workers (one per visible GPU, or submitit/Slurm
            # jobs), so the job gives it all its GPUs in one CUDA_VISIBLE_DEVICES and the worker
            # count; exit code 3 means a budget such as the wall-clock limit stopped it: success.
            argv = params.to_argv(workspace, root) + ["--device", device, "--events", events, "--quiet",
                                                      "--workers", str(params.workers)]
            if self.settings.executor in ("slurm", "submitit-local"):
                argv += ["--launcher", "submitit", "--executor",
                         "slurm" if self.settings.executor == "slurm" else "local"]
                if self.settings.executor == "slurm" and self.settings.slurm.partition:
                    argv += ["--slurm-partition", self.settings.slurm.partition]
            search_env = {"CUDA_VISIBLE_DEVICES": ",".join(devices) if self.settings.uses_gpus else ""}
            steps += [
                plan_step(workspace),
                Step(name="search", argv=argv, env=search_env, ok_codes=[0, 3],
                     message=f"PriorBand search with {params.workers} worker(s)"),
                Step(name="export", builtin="export_model",
                     kwargs={"source": str(root / "incumbent"), "dest": str(artifacts / "model.zip")},
                     message="export the incumbent model"),
                Step(name="results", builtin="copy",
                     kwargs={"source": str(root / "results.json"), "dest": str(artifacts / "results.json"),
                             "missing_ok": True}),
                Step(name="trials", builtin="trials_table", optional=True,
                     kwargs={"results": str(root / "results.json"), "dest": str(artifacts / "trials.csv")}),
            ]
            if importlib.util.find_spec("AutoNNUNetLib.report") is not None:
                steps += [
                    Step(name="report", argv=["report", str(root), "--out", str(job_dir / "report")],
                         optional=True, message="write the search report"),
                    Step(name="report-zip", builtin="zip_folder", optional=True,
                         kwargs={"source": str(job_dir / "report"), "dest": str(artifacts / "report.zip")}),
                ]
        elif job.kind == "train":
            params = TrainParams(**job.params)
            workspace = self.paths.upload_workspace(params.upload_id)
            output = job_dir / "output"
            config_file = None
            if params.config is not None:
                config_file = job_dir / "config.json"
                config_file.write_text(json.dumps(params.config))
            argv = params.to_argv(workspace, output, config_file) + ["--device", device, "--events", events]
            steps += [
                plan_step(workspace),
                Step(name="train", argv=argv, workers=workers[:1], remote=True, message="train nnU-Net"),
                Step(name="export", builtin="export_model",
                     kwargs={"source": str(output), "dest": str(artifacts / "model.zip")}),
                Step(name="record", builtin="copy",
                     kwargs={"source": str(output / "autonnunet.json"), "dest": str(artifacts / "record.json"),
                             "missing_ok": True}),
            ]
        elif job.kind == "predict":
            params = PredictParams(**job.params)
            if params.model_upload_id is not None:
                model_zip = self.paths.upload_archive(params.model_upload_id)
            else:
                model_zip = self.paths.job(params.model_job_id or "") / ARTIFACTS_DIR / "model.zip"
            images_upload = self.store.get_upload(params.images_upload_id)
            if images_upload is None or not images_upload.summary:
                raise ApiError(409, f"upload {params.images_upload_id} is gone")
            images = self.paths.upload_content(params.images_upload_id) / images_upload.summary.get("folder", ".")
            model_dir = job_dir / "model"
            output = job_dir / "predictions"
            argv = params.to_argv(MODEL_DIR_PREFIX + str(model_dir), images, output) + ["--device", device]
            steps += [
                Step(name="model", builtin="import_model", kwargs={"source": str(model_zip), "dest": str(model_dir)},
                     done_marker=str(job_dir / ".model-imported")),
                Step(name="predict", argv=argv, workers=workers[:1], remote=True, message="segment the images"),
                Step(name="collect", builtin="zip_folder",
                     kwargs={"source": str(output), "dest": str(artifacts / "predictions.zip")}),
            ]
        else:
            raise ApiError(422, f"unknown job kind {job.kind!r}")
        return JobSpec(job_dir=str(job_dir), steps=steps, executor=self.settings.executor,
                       slurm=self.settings.slurm, python=self.settings.python,
                       env={"AUTONNUNET_JOB_ID": job.id})


def read_events_page(path: Path, offset: int, limit: int) -> tuple[list[Any], int]:
    """Like :func:`events.read_events`, but reads at most ``limit`` bytes (long searches write
    megabytes of events; a client pages through them). A line longer than ``limit`` is read whole."""
    data, _ = read_log(path, offset, limit)
    end = data.rfind(b"\n")
    if end < 0 and len(data) == limit:  # one very long line: take it whole
        return read_events(path, offset)
    if end < 0:
        return [], offset
    events = []
    for line in data[: end + 1].splitlines():
        if line.strip():
            try:
                events.append(ProgressEvent.from_json(line.decode("utf-8")))
            except (ValueError, KeyError):
                continue
    return events, offset + end + 1


def _group_runs_job(pgid: int, job_id: str) -> bool:
    """Whether a process of group ``pgid`` carries this job's ``AUTONNUNET_JOB_ID`` (every
    process a job's steps start inherits it)."""
    marker = f"AUTONNUNET_JOB_ID={job_id}".encode()
    for pid in process_group_members(pgid):
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return True
        except OSError:
            continue
    return False


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _decode_text(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, leaving a character cut at the end of a page for the next page."""
    for cut in range(0, 4):
        try:
            return data[: len(data) - cut].decode("utf-8"), len(data) - cut
        except UnicodeDecodeError as error:
            if error.start < len(data) - 4:
                break
    return data.decode("utf-8", errors="replace"), len(data)


# ---------------------------------------------------------------------------------------------
# The FastAPI application
# ---------------------------------------------------------------------------------------------


class Server:
    """Everything one server process owns: store, upload service, job queue."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.paths = DataDir(settings.data_dir)
        self.store = Store(self.paths.db)
        self.uploads = UploadService(settings, self.store, self.paths)
        self.queue = JobQueue(settings, self.store, self.paths)

    def start(self) -> None:
        self.uploads.recover()
        self.queue.tick()  # re-attach or re-queue jobs before the first request is served
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        self.uploads.shutdown()


def create_app(settings: ServerSettings):  # -> fastapi.FastAPI (imported lazily)
    """The FastAPI app of a server over ``settings.data_dir``."""
    from fastapi import Depends, FastAPI, Header, Path as PathParam, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    server = Server(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(
        title="AutoNNUNet job server",
        version=__version__,
        description="Upload labeled volumes, run nnU-Net searches and trainings on this machine's GPUs, "
                    "download the best model. All endpoints but /v1/health need `Authorization: Bearer <token>` "
                    "(create one with `autonnunet token create --user NAME`).",
        lifespan=lifespan,
    )
    app.state.server = server
    bearer = HTTPBearer(auto_error=False, description="token from `autonnunet token create`")

    def auth_error() -> ApiError:
        return ApiError(401, "missing or invalid token: send `Authorization: Bearer <token>`; a token is created "
                             "on the server with `autonnunet token create --user NAME`",
                        {"WWW-Authenticate": "Bearer"})

    def current_user(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> str:
        if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
            raise auth_error()
        user = server.store.user_for_token(credentials.credentials)
        if user is None:
            raise auth_error()
        return user

    # -- errors: one JSON shape, {"detail": message}, with a readable message -------------------
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
            if item.get("type") == "json_invalid":
                reason = item.get("ctx", {}).get("error", "")
                problems.append(f"malformed JSON in the request body ({reason})" if reason else
                                "malformed JSON in the request body")
            else:
                problems.append(f"{where}: {item.get('msg', 'invalid')}")
        return JSONResponse(
            {"detail": "invalid request: " + "; ".join(problems),
             "errors": [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                         "type": str(e.get("type", ""))} for e in error.errors()]},
            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(error.detail)}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse({"detail": f"internal server error: {type(error).__name__}; see the server log"},
                            status_code=500)

    upload_id_param = PathParam(..., max_length=64, description="upload id")
    job_id_param = PathParam(..., max_length=64, description="job id")

    # -- meta -----------------------------------------------------------------------------------
    @app.get(API_PREFIX + "/health", response_model=Health, tags=["meta"])
    def health() -> Health:
        return Health("ok", __version__, settings.executor, len(settings.devices), list(settings.gpus))

    @app.get(API_PREFIX + "/me", response_model=Me, tags=["meta"])
    def me(user: str = Depends(current_user)) -> Me:
        return Me(user)

    # -- uploads --------------------------------------------------------------------------------
    @app.post(API_PREFIX + "/uploads", response_model=UploadView, status_code=201, tags=["uploads"],
              responses={200: {"description": "an upload of the same content exists: resume or reuse it"},
                         413: {"description": "larger than the server accepts"},
                         507: {"description": "not enough free disk space"}})
    def create_upload(body: UploadCreate, user: str = Depends(current_user)) -> Any:
        record, created = server.uploads.create(user, body)
        view = UploadView.of(record)
        return view if created else JSONResponse(asdict(view), status_code=200)

    @app.get(API_PREFIX + "/uploads", response_model=list[UploadView], tags=["uploads"])
    def list_uploads(user: str = Depends(current_user)) -> list[UploadView]:
        return [UploadView.of(r) for r in server.store.list_uploads(user=user)]

    @app.get(API_PREFIX + "/uploads/{upload_id}", response_model=UploadView, tags=["uploads"])
    def get_upload(upload_id: str = upload_id_param, user: str = Depends(current_user)) -> UploadView:
        return UploadView.of(server.uploads.own(user, upload_id))

    @app.put(
        API_PREFIX + "/uploads/{upload_id}/chunks", response_model=UploadView, tags=["uploads"],
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
        responses={409: {"description": "wrong offset: resume from the server's offset (Upload-Offset header)"},
                   413: {"description": "the chunk goes past the declared size"},
                   422: {"description": "the chunk failed its SHA-256 check"}},
    )
    async def put_chunk(request: Request, upload_id: str = upload_id_param,
                        offset: int = Query(..., ge=0, le=1 << 50, description="byte offset of this chunk"),
                        x_chunk_sha256: Optional[str] = Header(None, max_length=128,
                                                                description="SHA-256 (hex) of this chunk"),
                        x_chunk_crc32: Optional[str] = Header(None, max_length=16,
                                                               description="or its CRC32 (8 hex digits)"),
                        user: str = Depends(current_user)) -> UploadView:
        length = request.headers.get("content-length")
        content_length = int(length) if length and length.isdigit() else None
        try:
            record = await server.uploads.write_chunk(user, upload_id, offset, request.stream(), content_length,
                                                      x_chunk_sha256, x_chunk_crc32)
        except ClientDisconnect:
            raise ApiError(400, "the connection dropped during the chunk; query the offset and resume") from None
        return UploadView.of(record)

    @app.post(API_PREFIX + "/uploads/{upload_id}/complete", response_model=UploadView, status_code=202,
              tags=["uploads"])
    def complete_upload(upload_id: str = upload_id_param, user: str = Depends(current_user)) -> UploadView:
        return UploadView.of(server.uploads.complete(user, upload_id))

    @app.delete(API_PREFIX + "/uploads/{upload_id}", status_code=204, tags=["uploads"])
    def delete_upload(upload_id: str = upload_id_param, user: str = Depends(current_user)) -> None:
        server.uploads.delete(user, upload_id, server.queue)

    # -- jobs -----------------------------------------------------------------------------------
    def submit(kind: str, params: Any, user: str, key: Optional[str]) -> Any:
        job, created = server.queue.submit(user, kind, params, key)
        view = server.queue.view(job)
        return view if created else JSONResponse(asdict(view), status_code=200)

    key_header = Header(None, alias="Idempotency-Key", max_length=200,
                        description="a retried request with the same key returns the first job instead of a new one")

    @app.post(API_PREFIX + "/jobs/search", response_model=JobView, status_code=201, tags=["jobs"])
    def submit_search(params: SearchParams, user: str = Depends(current_user),
                      idempotency_key: Optional[str] = key_header) -> Any:
        return submit("search", params, user, idempotency_key)

    @app.post(API_PREFIX + "/jobs/train", response_model=JobView, status_code=201, tags=["jobs"])
    def submit_train(params: TrainParams, user: str = Depends(current_user),
                     idempotency_key: Optional[str] = key_header) -> Any:
        return submit("train", params, user, idempotency_key)

    @app.post(API_PREFIX + "/jobs/predict", response_model=JobView, status_code=201, tags=["jobs"])
    def submit_predict(params: PredictParams, user: str = Depends(current_user),
                       idempotency_key: Optional[str] = key_header) -> Any:
        return submit("predict", params, user, idempotency_key)

    @app.get(API_PREFIX + "/jobs", response_model=list[JobView], tags=["jobs"])
    def list_jobs(state: Optional[str] = Query(None, max_length=20, description="only jobs in this state"),
                  user: str = Depends(current_user)) -> list[JobView]:
        jobs = server.store.list_jobs(user=user, states=(state,) if state else None)
        return [server.queue.view(job) for job in jobs]

    @app.get(API_PREFIX + "/jobs/{job_id}", response_model=JobView, tags=["jobs"])
    def get_job(job_id: str = job_id_param, user: str = Depends(current_user)) -> JobView:
        return server.queue.view(server.queue.own(user, job_id))

    @app.post(API_PREFIX + "/jobs/{job_id}/cancel", response_model=JobView, tags=["jobs"])
    def cancel_job(job_id: str = job_id_param, user: str = Depends(current_user)) -> JobView:
        return server.queue.view(server.queue.cancel(user, job_id))

    @app.delete(API_PREFIX + "/jobs/{job_id}", status_code=204, tags=["jobs"])
    def delete_job(job_id: str = job_id_param, user: str = Depends(current_user)) -> None:
        server.queue.delete(user, job_id)

    @app.get(API_PREFIX + "/jobs/{job_id}/log", response_model=LogChunk, tags=["jobs"])
    def job_log(job_id: str = job_id_param, offset: int = Query(0, ge=0, le=1 << 50),
                limit: int = Query(65536, ge=1, le=4 * MiB), user: str = Depends(current_user)) -> LogChunk:
        job = server.queue.own(user, job_id)
        path = server.paths.job(job.id) / LOG_NAME
        size = path.stat().st_size if path.exists() else 0
        data, _ = read_log(path, offset, limit)
        text, used = _decode_text(data)
        next_offset = offset + used
        return LogChunk(offset, next_offset, size, text, job.state in FINAL_JOB_STATES and next_offset >= size)

    @app.get(API_PREFIX + "/jobs/{job_id}/events", response_model=EventsChunk, tags=["jobs"])
    def job_events(job_id: str = job_id_param, offset: int = Query(0, ge=0, le=1 << 50),
                   limit: int = Query(1 << 20, ge=1024, le=16 * MiB, description="bytes of events to read at most"),
                   user: str = Depends(current_user)) -> EventsChunk:
        job = server.queue.own(user, job_id)
        path = server.paths.job(job.id) / EVENTS_NAME
        events, next_offset = read_events_page(path, offset, limit)
        size = path.stat().st_size if path.exists() else 0
        return EventsChunk([{"kind": e.kind, "time": e.time, "data": e.data} for e in events], next_offset,
                           job.state in FINAL_JOB_STATES and next_offset >= size)

    @app.get(API_PREFIX + "/jobs/{job_id}/artifacts", response_model=list[Artifact], tags=["jobs"])
    def job_artifacts(job_id: str = job_id_param, user: str = Depends(current_user)) -> list[Artifact]:
        return server.queue.own(user, job_id).artifacts

    @app.get(API_PREFIX + "/jobs/{job_id}/artifacts/{name}", tags=["jobs"],
             responses={200: {"content": {"application/octet-stream": {}},
                              "description": "the file; `X-Checksum-SHA256` header, Range requests supported"},
                        206: {"description": "partial content (Range)"}})
    def download_artifact(job_id: str = job_id_param, name: str = PathParam(..., max_length=100),
                          user: str = Depends(current_user)) -> Any:
        job = server.queue.own(user, job_id)
        artifact = next((a for a in job.artifacts if a.name == name), None)
        if artifact is None:
            raise ApiError(404, f"job {job_id} has no artifact {name!r}"
                                + ("" if job.state == "succeeded" else f" (the job is {job.state})"))
        path = server.paths.job(job.id) / ARTIFACTS_DIR / artifact.name
        return FileResponse(path, filename=artifact.name, media_type="application/octet-stream",
                            headers={"X-Checksum-SHA256": artifact.sha256, "ETag": f'"{artifact.sha256}"'})

    return app


# ---------------------------------------------------------------------------------------------
# CLI: autonnunet serve / autonnunet token
# ---------------------------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the job server (remote GPU runner)",
        description="Serve the AutoNNUNet job API on this machine. Jobs keep running when the server stops; "
                    "a restarted server re-attaches to them or resumes them.")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: %(default)s; put a TLS proxy in front for other hosts)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--data-dir", type=Path, default=None,
                       help="where uploads, jobs and the database live (default: $AUTONNUNET_DATA_DIR or "
                            "~/.local/share/autonnunet-server)")
    serve.add_argument("--gpus", default="", help="GPU ids for the queue, e.g. 0,1 (one job slot each); "
                                                  "'' or cpu for a CPU-only server")
    serve.add_argument("--cpu-slots", type=int, default=1, help="parallel jobs on a CPU-only server")
    serve.add_argument("--executor", choices=["local", "slurm", "submitit-local"], default="local",
                       help="where workers run: local processes (default) or Slurm jobs through submitit")
    serve.add_argument("--slurm-partition")
    serve.add_argument("--slurm-timeout-min", type=int, default=24 * 60)
    serve.add_argument("--slurm-cpus-per-task", type=int, default=8)
    serve.add_argument("--slurm-mem-gb", type=int)
    serve.add_argument("--slurm-account")
    serve.add_argument("--max-upload-gb", type=float, default=50.0)
    serve.add_argument("--min-free-gb", type=float, default=1.0, help="disk space always kept free")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"],
                       help="uvicorn's HTTP parser; auto = httptools when installed (faster uploads), else h11")
    serve.set_defaults(func=_cmd_serve)

    token = subparsers.add_parser("token", help="manage the job server's access tokens")
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = token_sub.add_parser("create", help="create a token for a user (printed once)")
    create.add_argument("--user", required=True)
    create.add_argument("--label", default="", help="a note, e.g. the machine the token is for")
    create.add_argument("--data-dir", type=Path, default=None)
    create.set_defaults(func=_cmd_token_create)
    listing = token_sub.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--data-dir", type=Path, default=None)
    listing.set_defaults(func=_cmd_token_list)
    revoke = token_sub.add_parser("revoke", help="revoke a user's tokens or one token by id")
    revoke.add_argument("--user")
    revoke.add_argument("--id", dest="token_id")
    revoke.add_argument("--data-dir", type=Path, default=None)
    revoke.set_defaults(func=_cmd_token_revoke)


def _store_for(data_dir: Optional[Path]) -> Store:
    root = Path(data_dir or default_data_dir()).expanduser().resolve()
    return Store(DataDir(root).db)


def _cmd_token_create(args: argparse.Namespace) -> int:
    secret = _store_for(args.data_dir).create_token(args.user, args.label)
    print(secret)
    print(f"token for user {args.user!r} created; it is shown only this once. Clients use it with "
          f"--token or AUTONNUNET_TOKEN.", file=sys.stderr)
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    for token in _store_for(args.data_dir).list_tokens():
        state = "revoked" if token["revoked"] else "active"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(token["created"]))
        print(f"{token['id']}  {token['user']:<16} {state:<8} {created}  {token['label']}")
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    count = _store_for(args.data_dir).revoke_tokens(user=args.user, token_id=args.token_id)
    print(f"revoked {count} token(s)")
    return 0


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    slurm = SlurmOptions(partition=args.slurm_partition, timeout_min=args.slurm_timeout_min,
                         cpus_per_task=args.slurm_cpus_per_task, mem_gb=args.slurm_mem_gb,
                         additional={"account": args.slurm_account} if args.slurm_account else {})
    return ServerSettings(
        data_dir=args.data_dir or default_data_dir(), gpus=parse_gpus(args.gpus), cpu_slots=args.cpu_slots,
        executor=args.executor, slurm=slurm, max_upload_bytes=int(args.max_upload_gb * GiB),
        min_free_bytes=int(args.min_free_gb * GiB),
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = settings_from_args(args)
    app = create_app(settings)
    where = f"GPUs {','.join(settings.gpus)}" if settings.gpus else f"CPU ({settings.cpu_slots} slot(s))"
    print(f"AutoNNUNet server {__version__}: http://{args.host}:{args.port}{API_PREFIX} (docs at /docs), "
          f"data in {settings.data_dir}, {where}, executor {settings.executor}", file=sys.stderr, flush=True)
    # A bounded graceful shutdown: a client stuck mid-chunk must not keep the server from
    # stopping (its partial chunk is discarded anyway).
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=30,
                timeout_graceful_shutdown=5, http=args.http)
    return 0
