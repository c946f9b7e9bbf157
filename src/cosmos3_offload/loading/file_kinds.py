"""Every file read from a checkpoint is a regular file: looked at first, refused in one line otherwise.

A folder from elsewhere may hold anything under a file's name: a link to `/dev/zero` (endless
bytes), a FIFO (a read waits forever for a writer), a device, a socket, a folder, a link to
nothing. Each is stat'ed (through its links) before it is opened and named for what it is; a
regular file is then opened without blocking and checked again on the open descriptor, so a name
swapped in between cannot make a read wait or run forever.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError

KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def present(path: Path) -> bool:
    """Something is at `path`, a broken link included (whether it can be read is `file_problem`'s)."""
    return os.path.lexists(path)


def file_problem(path: Path) -> str | None:
    """What `path` is instead of a readable regular file ("is missing", "is a FIFO (named pipe)", ...,
    naming a link's target), to follow its name in a message; None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"is a link to {os.readlink(path)!r}, which is missing" if path.is_symlink() else "is missing"
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"
    if stat.S_ISREG(mode):
        return None
    return _is(path, mode)


def open_regular(path: Path, what: str) -> BinaryIO:
    """`path` opened for reading in binary, or an InputError naming `what` and what it is instead."""
    problem = file_problem(path)
    if problem is not None:
        raise InputError(f"{what} {str(path)!r} {problem}")
    try:  # O_NONBLOCK: should a FIFO have been swapped in since the stat, the open does not wait for a writer
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise InputError(f"{what} {str(path)!r} cannot be read: {error.strerror or error}") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise InputError(f"{what} {str(path)!r} {_is(path, mode)}")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def _is(path: Path, mode: int) -> str:
    kind = next((name for test, name in KINDS if test(mode)), "not a regular file")
    link = f"a link to {os.readlink(path)!r}, " if path.is_symlink() else ""
    return f"is {link}{kind}, not a regular file; replace it with the file itself"
