"""The jobs, in SQLite under `--storage`, and their files in `--storage/jobs/<id>/`.

A job is queued, then in_progress, then completed (its file written whole) or failed (with an
error). What a restart finds queued or in progress was cut off by the stop: it is marked failed
("server_restarted") and its partial files removed; completed jobs and their files stay. One server
at a time may use a storage folder (an advisory lock), so two cannot hand out one job twice.
Every method may be called from any thread.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

QUEUED, IN_PROGRESS, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
STATES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED)
DATABASE, LOCK, JOBS = "jobs.sqlite3", ".lock", "jobs"
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
    stats TEXT
)
"""


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
        try:
            connection = sqlite3.connect(folder / DATABASE, check_same_thread=False, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(SCHEMA)
        except sqlite3.Error as error:
            os.close(lock_file)
            raise InputError(f"storage {str(folder)!r}: its job database cannot be used ({error})") from None
        store = cls(folder, connection, lock_file)
        store._fail_interrupted()
        return store

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._lock_file)  # releases the flock

    def folder_of(self, job_id: str) -> Path:
        return self.folder / JOBS / job_id

    def reserve(self, kind: str) -> str:
        """A new job id and its empty folder, for the request's files before the job is recorded."""
        job_id = f"{kind}_{secrets.token_hex(12)}"
        self.folder_of(job_id).mkdir()
        return job_id

    def insert(self, job_id: str, kind: str, request: dict[str, Any]) -> Job:
        """Record a reserved job as queued."""
        created = int(time.time())
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, kind, status, progress, created_at, request) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, kind, QUEUED, 0, created, json.dumps(request)),
            )
        return Job(job_id, kind, QUEUED, 0, created, None, request)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, kind: str, *, after: str | None = None, limit: int = 20, newest_first: bool = True) -> list[Job]:
        """Up to `limit` jobs of `kind` in creation order (newest first unless asked), after the job `after`."""
        order, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        query, values = f"SELECT {_COLUMNS} FROM jobs WHERE kind = ?", [kind]
        if after is not None:
            query += f" AND seq {compare} (SELECT seq FROM jobs WHERE id = ?)"
            values.append(after)
        query += f" ORDER BY seq {order} LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*values, limit)).fetchall()
        return [_job(row) for row in rows]

    def counts(self) -> dict[str, int]:
        """Jobs by state (every state present, 0 where none)."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return dict.fromkeys(STATES, 0) | dict(rows)

    def update(self, job_id: str, **values: Any) -> bool:
        """Set columns (status, progress, completed_at, error, file, stats); False when the job is gone."""
        encoded = {k: json.dumps(v) if k in ("error", "stats") and v is not None else v for k, v in values.items()}
        assignments = ", ".join(f"{name} = ?" for name in encoded)
        with self._lock:
            cursor = self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*encoded.values(), job_id))
        return cursor.rowcount == 1

    def fail(self, job_id: str, code: str, message: str) -> bool:
        return self.update(
            job_id, status=FAILED, completed_at=int(time.time()), error={"code": code, "message": message}
        )

    def delete(self, job_id: str, *, files: bool = True) -> bool:
        """Forget the job; with `files`, remove its folder too (False: its runner removes it when it stops)."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        if files:
            self.remove_files(job_id)
        return cursor.rowcount == 1

    def remove_files(self, job_id: str) -> None:
        shutil.rmtree(self.folder_of(job_id), ignore_errors=True)

    def _fail_interrupted(self) -> None:
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE status IN (?, ?)", (QUEUED, IN_PROGRESS)).fetchall()
        for (job_id,) in rows:
            self.fail(job_id, "server_restarted", "the server stopped before this job finished; submit it again")
            for path in self.folder_of(job_id).glob("*"):
                if not path.name.startswith("input"):
                    path.unlink(missing_ok=True)


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
