"""Durable state of the job server: tokens, uploads, jobs and idempotency keys in one SQLite file.

The server keeps nothing important in memory: everything a restarted server needs to find its
uploads and to resume its jobs lives here (plus the files in the data directory). SQLite runs in
WAL mode (``synchronous=NORMAL``) so a killed server (``kill -9``) never leaves a half-written row
or loses a commit, and readers (status polling) never wait for a writer.

Tokens are stored as the SHA-256 of the secret: the secret itself is printed once at creation and
never stored or logged, so a copied database does not grant access.

Only the standard library is used: the store is imported by the server and by the job queue, and
its records are plain dataclasses that FastAPI can render as response models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from ...errors import AutoNNUNetError
from ...files import PRIVATE_FILE_MODE
from ...states import JobState

#: Bump when the schema changes; :meth:`Store._migrate` brings older files forward.
SCHEMA_VERSION = 1

#: Prefix of generated tokens, so a leaked token is recognisable in a secret scanner.
TOKEN_PREFIX = "ann_"

UPLOAD_STATES = ("receiving", "validating", "ready", "invalid")
#: Upload states that hold disk space not yet written (reserved) and count as open per user.
OPEN_UPLOAD_STATES = ("receiving", "validating")
JOB_STATES = tuple(state.value for state in JobState)
FINAL_JOB_STATES = tuple(state.value for state in JobState if state.done)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,            -- sha256 hex of the secret
    user TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    kind TEXT NOT NULL,               -- dataset | images | model
    filename TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    received INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    error TEXT,
    summary TEXT,                     -- JSON: what validation found (cases, classes, ...)
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_user ON uploads(user, created);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- queue order
    id TEXT UNIQUE NOT NULL,
    user TEXT NOT NULL,
    kind TEXT NOT NULL,               -- search | train | predict
    params TEXT NOT NULL,             -- JSON of the validated parameters
    state TEXT NOT NULL,
    slots INTEGER NOT NULL DEFAULT 1, -- GPUs (or CPU slots) the job needs
    devices TEXT,                     -- JSON list of the devices it holds while running
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,                      -- supervisor pid = process group id while running
    exit_code INTEGER,
    error TEXT,
    progress TEXT,                    -- JSON of jobs.Progress
    events_offset INTEGER NOT NULL DEFAULT 0,
    artifacts TEXT,                   -- JSON list of Artifact
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_user ON jobs(user, seq);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE TABLE IF NOT EXISTS idempotency (
    user TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,       -- sha256 of the request body: a reused key with another body is an error
    job_id TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (user, key)
);
"""


class StoreError(AutoNNUNetError, RuntimeError):
    """The database refused an operation (conflict, missing row)."""


class IdempotencyConflict(StoreError):
    """An idempotency key was reused with a different request body."""


@dataclass
class Artifact:
    """A downloadable file produced by a job."""

    name: str
    size: int
    sha256: str
    description: str = ""


@dataclass
class UploadRecord:
    id: str
    user: str
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


@dataclass
class JobRecord:
    id: str
    user: str
    kind: str
    params: dict[str, Any]
    state: str
    created: float
    slots: int = 1
    devices: Optional[list[str]] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    attempts: int = 0
    pid: Optional[int] = None
    exit_code: Optional[int] = None
    error: Optional[str] = None
    progress: Optional[dict[str, Any]] = None
    events_offset: int = 0
    artifacts: list[Artifact] = field(default_factory=list)
    cancel_requested: bool = False
    seq: int = 0


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_id(prefix: str) -> str:
    """A random id that is safe as a folder name (ids become paths in the data directory)."""
    return f"{prefix}{secrets.token_hex(8)}"


class Store:
    """All durable server state; safe to use from several threads (one connection per thread)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # executescript commits on its own, so the schema is created outside our transaction
        # helper; every statement in it is idempotent (IF NOT EXISTS).
        self._connection().executescript(_SCHEMA)
        with self.transaction() as db:
            self._migrate(db)
        self._make_private()

    def _make_private(self) -> None:
        """The database and its WAL files hold token hashes and everyone's jobs: owner only."""
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(str(self.path) + suffix).chmod(PRIVATE_FILE_MODE)

    # -- connection handling -------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN ourselves, so a read-modify-write is one
            # IMMEDIATE transaction and two threads cannot interleave inside it.
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a killed process (kill -9); only a power
            # loss may roll back the last commits, to a state that is still consistent. Upload
            # data is not fsynced per chunk either, so an offset can never claim lost bytes.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self._connection().execute(sql, args).fetchall()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer AutoNNUNet (schema {version} > {SCHEMA_VERSION}); upgrade the server"
            )
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def integrity_check(self) -> str:
        """SQLite's own consistency check: ``"ok"`` for a healthy file."""
        return self._read("PRAGMA integrity_check")[0][0]

    # -- tokens -----------------------------------------------------------------------------------
    def create_token(self, user: str, label: str = "") -> str:
        """Create a token for ``user``; returns the secret, which is not stored anywhere."""
        if not user or not user.strip():
            raise ValueError("a token needs a user name")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.transaction() as db:
            db.execute(
                "INSERT INTO tokens(hash, user, label, created) VALUES (?, ?, ?, ?)",
                (hash_token(secret), user.strip(), label, time.time()),
            )
        return secret

    def user_for_token(self, secret: str) -> Optional[str]:
        rows = self._read("SELECT user FROM tokens WHERE hash = ? AND revoked = 0", (hash_token(secret),))
        return rows[0]["user"] if rows else None

    def list_tokens(self) -> list[dict[str, Any]]:
        # Only a short prefix of the hash is shown: enough to revoke, useless to authenticate.
        return [
            {"id": row["hash"][:12], "user": row["user"], "label": row["label"], "created": row["created"],
             "revoked": bool(row["revoked"])}
            for row in self._read("SELECT * FROM tokens ORDER BY created")
        ]

    def revoke_tokens(self, *, user: Optional[str] = None, token_id: Optional[str] = None) -> int:
        if not user and not token_id:
            raise ValueError("name a user or a token id to revoke")
        with self.transaction() as db:
            if token_id:
                # An id names one token: a prefix that matches several (``--id b``) revokes none.
                token_id = token_id.strip().lower()
                if not token_id:
                    raise StoreError("name a token id as `autonnunet token list` shows it")
                matches = db.execute("SELECT hash FROM tokens WHERE substr(hash, 1, ?) = ?",
                                     (len(token_id), token_id)).fetchall()
                if len(matches) != 1:
                    raise StoreError(f"token id {token_id!r} matches {len(matches)} tokens; give the id "
                                     "exactly as `autonnunet token list` shows it" if matches else
                                     f"no token with id {token_id!r}; `autonnunet token list` shows the ids")
                cur = db.execute("UPDATE tokens SET revoked = 1 WHERE hash = ?", (matches[0]["hash"],))
            else:
                cur = db.execute("UPDATE tokens SET revoked = 1 WHERE user = ?", (user,))
            return cur.rowcount

    # -- uploads ----------------------------------------------------------------------------------
    @staticmethod
    def _upload(row: sqlite3.Row) -> UploadRecord:
        data = dict(row)
        data["summary"] = json.loads(data["summary"]) if data["summary"] else None
        return UploadRecord(**data)

    def create_upload(self, user: str, kind: str, filename: str, size: int, sha256: str) -> UploadRecord:
        now = time.time()
        upload_id = new_id("u")
        with self.transaction() as db:
            db.execute(
                "INSERT INTO uploads(id, user, kind, filename, size, sha256, received, state, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, 0, 'receiving', ?, ?)",
                (upload_id, user, kind, filename, size, sha256, now, now),
            )
        record = self.get_upload(upload_id)
        assert record is not None
        return record

    def get_upload(self, upload_id: str, user: Optional[str] = None) -> Optional[UploadRecord]:
        """The upload, or None when it does not exist or belongs to another user."""
        rows = self._read("SELECT * FROM uploads WHERE id = ?", (upload_id,))
        if not rows or (user is not None and rows[0]["user"] != user):
            return None
        return self._upload(rows[0])

    def find_upload(self, user: str, kind: str, sha256: str, size: int) -> Optional[UploadRecord]:
        """A usable upload of the same content (resume or de-duplicate instead of sending twice)."""
        rows = self._read(
            "SELECT * FROM uploads WHERE user = ? AND kind = ? AND sha256 = ? AND size = ?"
            " AND state != 'invalid' ORDER BY created DESC LIMIT 1",
            (user, kind, sha256, size),
        )
        return self._upload(rows[0]) if rows else None

    def list_uploads(self, user: Optional[str] = None, state: Optional[str] = None) -> list[UploadRecord]:
        sql, args = "SELECT * FROM uploads WHERE 1=1", []
        if user is not None:
            sql += " AND user = ?"
            args.append(user)
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        return [self._upload(row) for row in self._read(sql + " ORDER BY created", tuple(args))]

    def open_uploads(self, user: Optional[str] = None) -> list[UploadRecord]:
        """Uploads still receiving or being validated (all users' with ``user=None``)."""
        sql = f"SELECT * FROM uploads WHERE state IN ({','.join('?' * len(OPEN_UPLOAD_STATES))})"
        args: list[Any] = list(OPEN_UPLOAD_STATES)
        if user is not None:
            sql += " AND user = ?"
            args.append(user)
        return [self._upload(row) for row in self._read(sql, tuple(args))]

    def advance_upload(self, upload_id: str, expected: int, received: int) -> bool:
        """Move the committed offset from ``expected`` to ``received``; False if another writer moved it."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE uploads SET received = ?, updated = ? WHERE id = ? AND received = ? AND state = 'receiving'",
                (received, time.time(), upload_id, expected),
            )
            return cur.rowcount == 1

    def set_upload_state(self, upload_id: str, state: str, *, error: Optional[str] = None,
                         summary: Optional[dict[str, Any]] = None, expect: Optional[str] = None) -> bool:
        """Change the state (optionally only from ``expect``); True when the row changed."""
        assert state in UPLOAD_STATES, state
        sql = "UPDATE uploads SET state = ?, error = ?, updated = ?"
        args: list[Any] = [state, error, time.time()]
        if summary is not None:
            sql += ", summary = ?"
            args.append(json.dumps(summary))
        sql += " WHERE id = ?"
        args.append(upload_id)
        if expect is not None:
            sql += " AND state = ?"
            args.append(expect)
        with self.transaction() as db:
            return db.execute(sql, tuple(args)).rowcount == 1

    def delete_upload(self, upload_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))

    # -- jobs -------------------------------------------------------------------------------------
    @staticmethod
    def _job(row: sqlite3.Row) -> JobRecord:
        data = dict(row)
        data["params"] = json.loads(data["params"])
        data["devices"] = json.loads(data["devices"]) if data["devices"] else None
        data["progress"] = json.loads(data["progress"]) if data["progress"] else None
        data["artifacts"] = [Artifact(**a) for a in json.loads(data["artifacts"])] if data["artifacts"] else []
        data["cancel_requested"] = bool(data["cancel_requested"])
        return JobRecord(**data)

    def create_job(self, user: str, kind: str, params: dict[str, Any], *, slots: int = 1,
                   idempotency_key: Optional[str] = None,
                   max_unfinished: Optional[int] = None) -> tuple[Optional[JobRecord], bool]:
        """Queue a job; returns ``(job, created)``.

        With an idempotency key, a repeated request returns the job of the first one instead of
        queueing a second (``created`` is False); the same key with a different body raises
        :class:`IdempotencyConflict`. Key lookup and insert share one transaction, so two
        concurrent retries cannot both create a job. With ``max_unfinished``, a user who already
        has that many queued or running jobs gets ``(None, False)``: the count and the insert
        share the transaction too, so parallel submits cannot pass the limit together.
        """
        body = json.dumps({"kind": kind, "params": params}, sort_keys=True)
        request_hash = hashlib.sha256(body.encode()).hexdigest()
        job_id = new_id("j")
        with self.transaction() as db:
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT request_hash, job_id FROM idempotency WHERE user = ? AND key = ?", (user, idempotency_key)
                ).fetchone()
                if row is not None:
                    if row["request_hash"] != request_hash:
                        raise IdempotencyConflict(
                            f"Idempotency-Key {idempotency_key!r} was already used for a different request"
                        )
                    existing = db.execute("SELECT * FROM jobs WHERE id = ?", (row["job_id"],)).fetchone()
                    if existing is not None:
                        return self._job(existing), False
            if max_unfinished is not None:
                unfinished = db.execute("SELECT COUNT(*) FROM jobs WHERE user = ? AND state IN ('queued', 'running')",
                                        (user,)).fetchone()[0]
                if unfinished >= max_unfinished:
                    return None, False
            db.execute(
                "INSERT INTO jobs(id, user, kind, params, state, slots, created) VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                (job_id, user, kind, json.dumps(params), slots, time.time()),
            )
            if idempotency_key is not None:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency(user, key, request_hash, job_id, created) VALUES (?, ?, ?, ?, ?)",
                    (user, idempotency_key, request_hash, job_id, time.time()),
                )
        job = self.get_job(job_id)
        assert job is not None
        return job, True

    def get_job(self, job_id: str, user: Optional[str] = None) -> Optional[JobRecord]:
        """The job, or None when it does not exist or belongs to another user."""
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows or (user is not None and rows[0]["user"] != user):
            return None
        return self._job(rows[0])

    def list_jobs(self, user: Optional[str] = None, states: Optional[tuple[str, ...]] = None,
                  limit: Optional[int] = None, offset: int = 0) -> list[JobRecord]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if user is not None:
            sql += " AND user = ?"
            args.append(user)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        sql += " ORDER BY seq"
        if limit is not None or offset:
            sql += " LIMIT ? OFFSET ?"
            args.extend([-1 if limit is None else int(limit), int(offset)])
        return [self._job(row) for row in self._read(sql, tuple(args))]

    def queue_position(self, seq: int) -> int:
        """How many queued jobs (of all users) are ahead of the job with this ``seq``."""
        return self._read("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?", (seq,))[0][0]

    def queue_positions(self, seqs: list[int]) -> dict[int, int]:
        """Queue positions of several queued jobs from one ordered scan of the queue (linear)."""
        wanted, positions = set(seqs), {}
        for index, row in enumerate(self._read("SELECT seq FROM jobs WHERE state = 'queued' ORDER BY seq")):
            if row[0] in wanted:
                positions[row[0]] = index
        return positions

    def delete_job(self, job_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    _JOB_COLUMNS = {
        "state", "devices", "started", "finished", "attempts", "pid", "exit_code", "error", "progress",
        "events_offset", "artifacts", "cancel_requested",
    }

    def update_job(self, job_id: str, *, expect_state: Optional[Union[str, tuple[str, ...]]] = None,
                   expect_cancel: Optional[bool] = None, **changes: Any) -> bool:
        """Set columns of a job; with ``expect_state`` (and ``expect_cancel``: whether a cancel was
        requested) only if the job still is so (compare-and-set). True when the row changed."""
        unknown = set(changes) - self._JOB_COLUMNS
        if unknown:
            raise StoreError(f"unknown job fields {sorted(unknown)}")
        if "state" in changes:
            assert changes["state"] in JOB_STATES, changes["state"]
        sets, args = [], []
        for name, value in changes.items():
            if name in ("devices", "progress") and value is not None:
                value = json.dumps(value)
            elif name == "artifacts":
                value = json.dumps([asdict(a) if isinstance(a, Artifact) else a for a in value])
            elif name == "cancel_requested":
                value = int(bool(value))
            sets.append(f"{name} = ?")
            args.append(value)
        sql = f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?"
        args.append(job_id)
        if expect_state is not None:
            states = (expect_state,) if isinstance(expect_state, str) else tuple(expect_state)
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        if expect_cancel is not None:
            sql += " AND cancel_requested = ?"
            args.append(int(expect_cancel))
        with self.transaction() as db:
            return db.execute(sql, tuple(args)).rowcount == 1

    def jobs_using_upload(self, upload_id: str) -> list[JobRecord]:
        rows = self._read("SELECT * FROM jobs WHERE params LIKE ? ORDER BY seq", (f'%"{upload_id}"%',))
        return [self._job(row) for row in rows]
