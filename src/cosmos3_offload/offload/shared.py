"""One host copy of the offloaded weights, shared by the processes of one host (one GPU each).

Each host slab of a shared run is a file in a shared-memory folder (`/dev/shm` by default) that
every process of the host maps (`MAP_SHARED`), so the host holds the weights once, whatever the
number of processes. One process per host, the owner, writes the values; the others only read.

The protocol, for one load (see loading/components.py):

1. every process places its weights: for each host slab it opens the slab's file, creating it if
   no other process has yet (`O_CREAT` without `O_EXCL`: whoever comes first creates it, the
   others open the same file), sizes it exactly (`ftruncate` to the same size is idempotent, and
   nothing is written yet) and maps it;
2. `wait()`: every process has mapped every file;
3. every process unlinks the files it mapped (the first unlink removes the name, the others find
   it gone): the mappings stay valid, and nothing is left in the folder, even if a process dies
   later. A process that fails before step 2 unlinks what it created or opened, too;
4. the owner writes the shared slabs; every process writes its own device-resident weights;
5. `wait()`: the owner has filled every shared slab, so no process reads (or pins) one before.

A process that fails after step 3 leaves nothing behind; the others stop at their next `wait()`
(its timeout, or the launcher, ends them). Only a process killed during step 1 can leave files.

`name` must be the same on the processes of one host and unique per run: two runs of one name at
once would write into each other's weights.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..units import format_bytes

logger = logging.getLogger(__name__)

PREFIX = "cosmos3-offload"
_SAFE = re.compile(r"^[A-Za-z0-9_.@-]+$")  # what a name or key may hold: one file name, no folder
FIX = "grow it (docker run --shm-size=...), point the share at a larger folder, or run on one GPU"


@dataclass(frozen=True)
class HostShare:
    """Who shares the host copy of the weights: `owner` is true on exactly one process of the host (the one
    that fills it); `wait` is a barrier over the host's processes (a torch.distributed barrier, or a
    multiprocessing.Barrier's `wait`); `directory` holds the shared files (best a tmpfs)."""

    name: str
    owner: bool
    wait: Callable[[], None]
    directory: Path = Path("/dev/shm")

    def __post_init__(self):
        if not _SAFE.match(self.name):
            raise InputError(
                f"host share name {self.name!r} must be letters, digits, '.', '_', '-' or '@' (it names files)"
            )

    def path(self, key: str) -> Path:
        """The file holding slab `key` (a group name, say `generator@3`)."""
        assert _SAFE.match(key), key
        return self.directory / f"{PREFIX}-{self.name}-{key}"


class SharedFiles:
    """The files of one `HostShare` this process has mapped; `unlink()` removes all of them."""

    def __init__(self, share: HostShare):
        self.share = share
        self.paths: list[Path] = []
        self.nbytes = 0  # of every file mapped so far: tmpfs files are sparse until the owner fills them

    def map(self, key: str, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of exactly `nbytes`, mapped from slab `key`'s shared file (created if no process
        has yet). Every process of the host must map the same keys with the same sizes."""
        path = self.share.path(key)
        assert path not in self.paths, f"slab {key!r} mapped twice"
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)  # nothing to share, and an empty file cannot be mapped
        self._check_room(nbytes)
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise InputError(
                f"cannot create {path} for the shared host copy of the weights ({error.strerror}): {FIX}"
            ) from None
        self.paths.append(path)
        try:
            os.ftruncate(descriptor, nbytes)
        finally:
            os.close(descriptor)
        self.nbytes += nbytes
        return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)

    def unlink(self) -> None:
        """Remove every file mapped so far (the mappings stay valid); the other processes may have already."""
        for path in self.paths:
            path.unlink(missing_ok=True)
        logger.debug("unlinked %d shared slab files (%s)", len(self.paths), format_bytes(self.nbytes))
        self.paths.clear()

    def _check_room(self, nbytes: int) -> None:
        """The folder exists, is writable and has room for every file so far: a full tmpfs kills the owner
        with SIGBUS when it writes the page that does not fit."""
        directory = self.share.directory
        if not directory.is_dir():
            raise InputError(f"{directory} is not a folder, so the host copy of the weights cannot be shared: {FIX}")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise InputError(f"{directory} is not writable, so the host copy of the weights cannot be shared: {FIX}")
        stat = os.statvfs(directory)
        free = stat.f_bavail * stat.f_frsize
        needed = self.nbytes + nbytes
        if needed > free:
            raise InputError(
                f"{directory} has {format_bytes(free)} free, and the shared host copy of the weights needs "
                f"{format_bytes(needed)} or more: {FIX}"
            )
