"""The jobs, in SQLite under `--storage`, and their files in `--storage/jobs/<id>/`.

A job is queued, then in_progress, then completed (its file written whole) or failed (with an
error). What a restart finds queued or in progress was cut off by the stop: it is marked failed
("server_restarted") and its partial files removed; completed jobs and their files stay, and a job
folder without a job (a stop between a delete's two halves, or during a request) is removed. One
server at a time may use a storage folder (an advisory lock), so two cannot hand out one job twice.
A database that cannot be read whole or written is refused at the open, not at the first request.

A job id carries its place in the order (`video_<16 hex: position><16 hex: random>`), so a list
that pages `after` a job deleted since still starts where it should. A write the disk refuses is a
`StorageFull` (else a `StorageError`); a job's failure that cannot be written is kept in memory,
reported as if stored, and written by the next write that succeeds. Every method may be called from
any thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..app.serve_settings import Retention
from ..errors import InputError, first_line
from .storage_errors import StorageError, storage_error

logger = logging.getLogger(__name__)

QUEUED, IN_PROGRESS, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
STATES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED)
KINDS = ("video", "image")
DATABASE, LOCK, JOBS, PROBE = "jobs.sqlite3", ".lock", "jobs", ".probe"
PROBE_BYTES = 4096  # one page: a disk with no page left refuses it
SCHEMA_VERSION = 2  # 2: the `position` column
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    request TEXT NOT NULL,
    error TEXT,
    file TEXT,
    stats TEXT,
    position INTEGER
)
"""
# A job folder's name: what the start may sweep when no job has it (nothing else in jobs/ is touched).
JOB_FOLDER = re.compile(r"(video|image)_[0-9a-f]{24,32}")


@dataclass(frozen=True)
class Job:
    """One job as stored: `request` holds the resolved parameters (size, seconds, frames, steps, seed...),
    `file` the finished file's name in the job's folder, `stats` what the run measured."""

    id: str
    kind: str  # "video" or "image"
    status: str
    progress: int
    created_at: int
    completed_at: int | None
    request: dict[str, Any]
    error: dict[str, Any] | None = None
    file: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class JobStore:
    """Open with `JobStore.open(folder)`; `close` releases the folder for the next server."""

    def __init__(self, folder: Path, connection: sqlite3.Connection, lock_file: int) -> None:
        self.folder = folder
        self._db = connection
        self._lock_file = lock_file
        self._lock = threading.Lock()
        self._unrecorded: dict[str, dict[str, Any]] = {}  # job id -> a failure the database refused
        (last,) = connection.execute("SELECT COALESCE(MAX(position), 0) FROM jobs").fetchone()
        self._last_position = last

    @classmethod
    def open(cls, folder: Path) -> JobStore:
        """Create or reopen `folder`; a folder another server holds, or one we may not write, is refused."""
        folder = Path(folder)
        try:
            folder.mkdir(exist_ok=True)
            (folder / JOBS).mkdir(exist_ok=True)
            lock_file = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise InputError(f"storage {str(folder)!r} cannot be used: {error.strerror}") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(lock_file)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise InputError(
                    f"storage {str(folder)!r} is in use by another server; pass another --storage"
                ) from None
            raise
        connection = None
        try:
            connection = _open_database(folder / DATABASE)
            store = cls(folder, connection, lock_file)
            store._fail_interrupted()
            store._sweep_orphans()
        except (sqlite3.Error, StorageError, OSError) as error:
            if connection is not None:
                connection.close()
            os.close(lock_file)
            reason = str(error) if isinstance(error, StorageError) else first_line(error)
            raise InputError(
                f"storage {str(folder)!r}: its job database cannot be used ({reason}); make it writable, "
                f"free space on its disk, or move {DATABASE} away to start with no jobs"
            ) from None
        return store

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._lock_file)  # releases the flock

    def folder_of(self, job_id: str) -> Path:
        return self.folder / JOBS / job_id

    def reserve(self, kind: str) -> str:
        """A new job id and its empty folder, for the request's files before the job is recorded."""
        assert kind in KINDS, kind
        with self._lock:  # strictly increasing, so the ids' order is the order they were handed out
            self._last_position = max(time.time_ns() // 1000, self._last_position + 1)
            position = self._last_position
        job_id = f"{kind}_{position:016x}{secrets.token_hex(8)}"
        try:
            self.folder_of(job_id).mkdir()
        except OSError as error:
            raise storage_error(error, "a job's folder") from None
        return job_id

    def insert(self, jobs: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Record reserved jobs (id, kind, request) as queued: all of them, or none."""
        created = int(time.time())
        rows = [
            (job_id, kind, QUEUED, 0, created, json.dumps(request), position_of(job_id))
            for job_id, kind, request in jobs
        ]
        with self._writing("a new job"), self._transaction():
            self._db.executemany(
                "INSERT INTO jobs (id, kind, status, progress, created_at, request, position) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else self._job(row)

    def cursor(self, kind: str, job_id: str) -> int | None:
        """The place in the list of the job `job_id` of `kind`, stored or deleted since; None for no such id."""
        with self._lock:
            row = self._db.execute("SELECT position FROM jobs WHERE id = ? AND kind = ?", (job_id, kind)).fetchone()
        if row is not None:
            return row[0]
        return position_of(job_id) if job_id.startswith(f"{kind}_") else None

    def list(self, kind: str, *, after: int | None = None, limit: int = 20, newest_first: bool = True) -> list[Job]:
        """Up to `limit` jobs of `kind` in creation order (newest first unless asked), after the place `after`
        (a `cursor`)."""
        order, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        query, values = f"SELECT {_COLUMNS} FROM jobs WHERE kind = ?", [kind]
        if after is not None:
            query += f" AND position {compare} ?"
            values.append(after)
        query += f" ORDER BY position {order} LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*values, limit)).fetchall()
            return [self._job(row) for row in rows]

    def counts(self) -> dict[str, int]:
        """Jobs by state (every state present, 0 where none)."""
        with self._lock:
            rows = self._db.execute("SELECT id, status FROM jobs").fetchall()
            statuses = [self._unrecorded.get(job_id, {}).get("status", status) for job_id, status in rows]
        return {state: statuses.count(state) for state in STATES}

    def update(self, job_id: str, **values: Any) -> bool:
        """Set columns (status, progress, completed_at, error, file, stats); False when the job is gone."""
        encoded = {k: json.dumps(v) if k in ("error", "stats") and v is not None else v for k, v in values.items()}
        assignments = ", ".join(f"{name} = ?" for name in encoded)
        with self._writing("a job's state"):
            cursor = self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*encoded.values(), job_id))
        return cursor.rowcount == 1

    def fail(self, job_id: str, code: str, message: str) -> None:
        """Mark the job failed with `code`; a database that refuses it (a full disk) leaves it in memory."""
        values = {"status": FAILED, "completed_at": int(time.time()), "error": {"code": code, "message": message}}
        try:
            self.update(job_id, **values)
        except StorageError as error:
            logger.error("job %s failed (%s) and %s: kept in memory until it can be written", job_id, code, error)
            with self._lock:
                self._unrecorded[job_id] = values

    def delete(self, job_id: str, *, files: bool = True) -> bool:
        """Forget the job; with `files`, remove its folder first (False: its runner removes it when it stops).
        Files before the row: a stop between the two leaves a job without its file, never files without a job."""
        if files:
            self.remove_files(job_id)
        with self._writing("a job's removal"):
            cursor = self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._unrecorded.pop(job_id, None)
        return cursor.rowcount == 1

    def remove_files(self, job_id: str) -> None:
        shutil.rmtree(self.folder_of(job_id), ignore_errors=True)

    def remove_outputs(self, job_id: str) -> None:
        """Remove what a run wrote in the job's folder (its file, partial files, locks); its inputs stay."""
        for path in self.folder_of(job_id).glob("*"):
            if not path.name.startswith("input"):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)

    def expired(self, kind: str, retention: Retention, *, now: float, keep: set[str] = frozenset()) -> list[str]:
        """The finished jobs of `kind` past `retention` at `now`: beyond the newest `count`, or ended more than
        `seconds` ago; those in `keep` are never named (they still count among the newest)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, completed_at FROM jobs WHERE kind = ? AND status IN (?, ?) ORDER BY position DESC",
                (kind, COMPLETED, FAILED),
            ).fetchall()
        oldest = None if retention.seconds is None else now - retention.seconds
        return [
            job_id
            for rank, (job_id, ended) in enumerate(rows)
            if job_id not in keep
            and (
                (retention.count is not None and rank >= retention.count)
                or (oldest is not None and (ended or 0) < oldest)
            )
        ]

    def check_room(self) -> None:
        """Raise StorageFull (or StorageError) unless a page can be written in the storage now: a request on
        a full disk is refused at once, not queued to fail."""
        try:
            self._write_probe(sync=False)
        except OSError as error:
            raise storage_error(error, "a new job") from None

    def problem(self) -> str | None:
        """Why the store cannot take a write now (a probe file of one page, a database write), or None."""
        try:
            self._write_probe(sync=True)
        except OSError as error:
            return str(storage_error(error, "a probe file"))
        try:
            with self._writing("a probe write"):
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except StorageError as error:
            return str(error)
        return None

    def _write_probe(self, *, sync: bool) -> None:
        # In jobs/, where every job's files go (a probe of the storage root would pass with jobs/ unusable);
        # its name is no job folder's, so the start's sweep never takes it. One per thread: probes may overlap.
        probe = self.folder / JOBS / f"{PROBE}.{threading.get_ident()}"
        try:
            with open(probe, "wb") as out:
                out.write(b"\0" * PROBE_BYTES)
                out.flush()
                if sync:
                    os.fsync(out.fileno())
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _writing(self, doing: str) -> Iterator[None]:
        """Hold the lock for a write, after the failures kept in memory are written (if they can be); a
        refused write is a StorageError (StorageFull: no room)."""
        with self._lock:
            self._write_unrecorded()
            try:
                yield
            except (sqlite3.Error, OSError) as error:
                raise storage_error(error, doing) from error

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:  # sqlite may have rolled it back itself (a full disk)
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _write_unrecorded(self) -> None:
        for job_id, values in list(self._unrecorded.items()):
            encoded = {**values, "error": json.dumps(values["error"])}
            assignments = ", ".join(f"{name} = ?" for name in encoded)
            try:
                self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*encoded.values(), job_id))
            except sqlite3.Error:
                return  # still refused: kept for the next write
            del self._unrecorded[job_id]
            logger.info("job %s: its failure, kept in memory, is written now", job_id)

    def _job(self, row: tuple) -> Job:
        job = _job(row)
        unrecorded = self._unrecorded.get(job.id)
        return job if unrecorded is None else dataclasses.replace(job, **unrecorded)

    def _fail_interrupted(self) -> None:
        rows = self._db.execute("SELECT id FROM jobs WHERE status IN (?, ?)", (QUEUED, IN_PROGRESS)).fetchall()
        for (job_id,) in rows:
            self.update(
                job_id,
                status=FAILED,
                completed_at=int(time.time()),
                error={
                    "code": "server_restarted",
                    "message": "the server stopped before this job finished; submit it again",
                },
            )
            self.remove_outputs(job_id)

    def _sweep_orphans(self) -> None:
        """Remove the job folders no job has (only names of a job folder's form)."""
        known = {job_id for (job_id,) in self._db.execute("SELECT id FROM jobs")}
        for path in (self.folder / JOBS).iterdir():
            if JOB_FOLDER.fullmatch(path.name) and path.name not in known:
                logger.info("removing %s: no job has it", path)
                shutil.rmtree(path, ignore_errors=True)


def position_of(job_id: str) -> int | None:
    """The place an id of this store's form carries (None for an id of another form)."""
    match = re.fullmatch(r"[a-z]+_([0-7][0-9a-f]{15})[0-9a-f]{16}", job_id)  # below 2**63: SQLite's INTEGER
    return None if match is None else int(match[1], 16)


def _open_database(path: Path) -> sqlite3.Connection:
    """The job database, checked whole and written once (a read-only or corrupt one is refused here, not at the
    first job), with the columns of the current schema."""
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(SCHEMA)
        try:
            (check,) = connection.execute("PRAGMA quick_check(1)").fetchone()
        except sqlite3.DatabaseError as error:
            check = str(error)
        if check != "ok":  # "*** in database main ***\nPage 11: btreeInitPage() returns error code 11"
            said = "; ".join(line for line in check.splitlines() if line and not line.startswith("***"))
            raise sqlite3.DatabaseError(f"it is damaged: {said or check}")
        columns = {row[1] for row in connection.execute("PRAGMA table_info(jobs)")}
        if "position" not in columns:  # a database of schema 1: ids without a place; their order is seq's
            connection.execute("ALTER TABLE jobs ADD COLUMN position INTEGER")
            connection.execute("UPDATE jobs SET position = seq")
        connection.execute("CREATE INDEX IF NOT EXISTS jobs_by_place ON jobs (kind, position)")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")  # the write that proves it writable
    except BaseException:
        connection.close()
        raise
    return connection


_COLUMNS = "id, kind, status, progress, created_at, completed_at, request, error, file, stats"


def _job(row: tuple) -> Job:
    job_id, kind, status, progress, created, completed, request, error, file, stats = row
    return Job(
        job_id,
        kind,
        status,
        progress,
        created,
        completed,
        json.loads(request),
        None if error is None else json.loads(error),
        file,
        {} if stats is None else json.loads(stats),
    )
