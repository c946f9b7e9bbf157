"""The storage's own errors: a write the disk (or quota) refuses is a `StorageFull`, any other failed write
a `StorageError`, each with one line saying what did not fit or why. The server answers them 507
`storage_full` and 503 `storage_error`; a job they end fails with the same codes.
"""

from __future__ import annotations

import errno
import sqlite3

from ..errors import first_line

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StorageError(Exception):
    """The store could not write (the database or a job's folder); the message says why."""


class StorageFull(StorageError):
    """The storage's disk (or the user's quota) has no room left."""


def is_disk_full(error: BaseException | None) -> bool:
    """True when `error`, or an error it was raised from, says the disk or quota is full."""
    seen = 0
    while error is not None and seen < 16:
        if isinstance(error, StorageFull):
            return True
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(error, sqlite3.Error) and (
            getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(error)
        ):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def storage_error(error: BaseException, doing: str) -> StorageError:
    """`error` (an OSError or sqlite3.Error met while `doing`) as the store's own error."""
    if is_disk_full(error):
        return StorageFull(f"the server's storage is full ({doing} did not fit); delete finished jobs or free space")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
    return StorageError(f"the server's storage cannot be written ({doing}: {reason})")
