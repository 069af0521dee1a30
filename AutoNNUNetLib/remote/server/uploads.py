"""Uploads: resumable chunked receiving, checksums, archive checks, extraction and validation.

Chunks are streamed to disk at explicit offsets (nothing is held whole in memory); ``complete``
checks the whole file's SHA-256; validation runs in a worker thread: the archive is checked and
extracted by the one safe-extraction rule (:mod:`AutoNNUNetLib.archives`), and the dataset is built with the
library's validation (``autonnunet dataset``) in a child process before a job may use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional

from ...archives import ArchiveError, Member, check_expansion, extract_members, inspect_archive
from ...files import sha256_file
from .settings import ID_RE, IMAGE_SUFFIXES, ApiError, DataDir, ServerSettings, UploadError, _human
from .store import Store, UploadRecord
from .views import UploadCreate

if TYPE_CHECKING:
    from .queue import JobQueue

log = logging.getLogger("AutoNNUNetLib.remote.server")

#: errno values of a full disk (or a used-up quota): answered 507, which clients do not retry.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(root: Path) -> str:
    free = shutil.disk_usage(root).free
    return (f"the server's disk is full ({_human(free)} free): the upload cannot be stored. Ask the server's "
            "administrator to free space, then resume the upload")


def reserve_bytes(size: int) -> int:
    """Disk an upload of ``size`` bytes needs: the archive, its extracted copy and the dataset
    built from it, about three times the archive."""
    return 3 * size

#: Run in a child process: the dataset readers' containment check against the upload folder.
CHECK_INSIDE = """
import sys
from AutoNNUNetLib.errors import AutoNNUNetError
from AutoNNUNetLib.dataset import detect_source
try:
    detect_source(sys.argv[1], root=sys.argv[2])
except AutoNNUNetError as error:
    print(f"autonnunet upload: error: {error}")
    sys.exit(2)
"""


def check_extracted(content: Path) -> None:
    """Every entry below ``content`` is a plain file or folder that resolves inside it (no link
    slipped through extraction, nothing created since)."""
    root = content.resolve()
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise UploadError(f"archive member {path.relative_to(root)} is not a plain file or folder")
            if not path.resolve().is_relative_to(root):
                raise UploadError(f"archive member {path.relative_to(root)} points outside the upload")


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
        self._create_lock = threading.Lock()
        self._complete_lock = threading.Lock()

    def own(self, user: str, upload_id: str) -> UploadRecord:
        record = self.store.get_upload(upload_id, user=user) if ID_RE.match(upload_id) else None
        if record is None:
            raise ApiError(404, f"no upload {upload_id!r} for user {user!r}")
        return record

    def create(self, user: str, body: UploadCreate) -> tuple[UploadRecord, bool]:
        # The record's field rules (size, hash, kind) were checked when the body was parsed.
        if body.size > self.settings.max_upload_bytes:
            raise ApiError(413, f"upload of {_human(body.size)} exceeds the server's limit of "
                                f"{_human(self.settings.max_upload_bytes)}")
        sha = body.sha256.lower()
        # One at a time: the free-space check counts the space other open uploads reserved, and
        # two creates checking at once would both count the same free bytes.
        with self._create_lock:
            existing = self.store.find_upload(user, body.kind, sha, body.size)
            if existing is not None:  # resume (or reuse) instead of receiving the same bytes twice
                return existing, False
            open_uploads = self.store.open_uploads()
            mine = sum(1 for record in open_uploads if record.user == user)
            if mine >= self.settings.max_open_uploads:
                raise ApiError(429, f"user {user!r} has {mine} unfinished uploads, the most this server allows; "
                                    "finish or delete one first")
            needed = reserve_bytes(body.size) + self.settings.min_free_bytes
            reserved = sum(reserve_bytes(record.size) - self._on_disk(record) for record in open_uploads)
            free = shutil.disk_usage(self.paths.root).free - max(0, reserved)
            if free < needed:
                raise ApiError(507, f"not enough free disk space on the server for an upload of {_human(body.size)}: "
                                    f"it needs {_human(needed)} (archive, extracted copy, dataset and the "
                                    f"{_human(self.settings.min_free_bytes)} always kept free), "
                                    f"{_human(max(0, free))} is free after what other unfinished uploads hold")
            filename = PurePosixPath(body.filename.replace("\\", "/")).name[:200] or "dataset.tar"
            record = self.store.create_upload(user, body.kind, filename, body.size, sha)
        self.paths.upload(record.id).mkdir(parents=True, exist_ok=True)
        return record, True

    def _on_disk(self, record: UploadRecord) -> int:
        """Bytes an open upload already wrote (they left the free space; its reserve shrinks)."""
        total = 0
        for folder, _dirs, files in os.walk(self.paths.upload(record.id)):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
        return min(total, reserve_bytes(record.size))

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
            try:
                await sink.consume(chunks, limit)
            except OSError as error:
                if error.errno in DISK_FULL:
                    raise ApiError(507, disk_full_message(self.paths.root)) from None
                raise
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
        """Check the whole file and start its validation; a repeated (or concurrent) call returns
        the upload as it is: the second of two concurrent calls waits for the first."""
        with self._complete_lock:
            return self._complete(user, upload_id)

    def _complete(self, user: str, upload_id: str) -> UploadRecord:
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
        except (UploadError, ArchiveError) as error:
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

    def _run_cli(self, upload_id: str, argv: list[str], module: bool = True) -> tuple[int, str]:
        log_path = self.paths.upload(upload_id) / "validate.log"
        with open(log_path, "ab") as out:
            command = [self.settings.python, *(["-m", "AutoNNUNetLib"] if module else []), *argv]
            code = subprocess.call(command, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = log_path.read_text(errors="replace").strip().splitlines()
        # The CLI prints user errors as one line "autonnunet VERB: error: message".
        errors = [line.split(": error: ", 1)[1] for line in lines if ": error: " in line]
        return code, errors[-1] if errors else (lines[-1] if lines else "")

    def _run_python(self, upload_id: str, code: str, *args: str) -> tuple[int, str]:
        return self._run_cli(upload_id, ["-c", code, *args], module=False)

    def _check_expansion(self, record: UploadRecord, members: list[Member]) -> None:
        """The one archive rule's size limits (zip bombs, free disk) with this server's settings;
        twice the size must fit: the extracted copy and what is built from it."""
        check_expansion(record.size, members, self.paths.root, max_ratio=self.settings.max_expansion,
                        min_free_bytes=self.settings.min_free_bytes, free_factor=2.0)

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
            # The import extracts the zip: the same expansion and free-space rule as a dataset first.
            self._check_expansion(record, inspect_archive(archive)[1])
            code, message = self._run_cli(record.id, ["import-model", str(archive), str(workspace / "model")])
            if code != 0:
                raise UploadError(f"not a usable model archive: {message}")
            return {"model": True}
        fmt, members = inspect_archive(archive)
        self._check_expansion(record, members)
        content = self.paths.upload_content(record.id)
        extract_members(archive, content, members, fmt)
        check_extracted(content)
        if record.kind == "images":
            folder, count = find_images_root(content)
            return {"images": count, "folder": str(folder.relative_to(content))}
        source = find_dataset_root(content)
        # Twice over for uploads: every file the dataset names must resolve inside the upload
        # (the dataset readers check their own folder too). In a child: it reads the volumes.
        code, message = self._run_python(record.id, CHECK_INSIDE, str(source), str(content))
        if code != 0:
            raise UploadError(f"not a valid dataset: {message}")
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
        active = jobs.unfinished_readers(upload_id)
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

