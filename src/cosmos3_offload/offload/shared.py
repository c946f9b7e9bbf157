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

Processes that start at different times (serve's replicas, a restarted one) share a node's copy through
node_share.py instead; the load sees either through `SlabFiles`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import InputError
from ..units import format_bytes

logger = logging.getLogger(__name__)

PREFIX = "cosmos3-offload"
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.@-]+$")  # what a name or key may hold: one file name, no folder
FIX = "grow it (docker run --shm-size=...), point the share at a larger folder, or run on one GPU"


class SlabFiles(Protocol):
    """The host-slab files one load maps, shared with other processes (`SharedFiles`, node_share.NodeFiles).

    The load (loading/components.py) maps every host slab with `map`, calls `wait_all_mapped`, writes the
    values (the shared slabs only where `owner`), calls `wait_filled`, and only then reads or pins a shared
    slab; `abandon` if the load fails at any point."""

    owner: bool  # this process writes the shared slabs' values

    def map(self, key: str, nbytes: int) -> torch.Tensor: ...

    def wait_all_mapped(self) -> None: ...

    def wait_filled(self) -> None: ...

    def abandon(self) -> None: ...


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
        if not SAFE_NAME.match(self.name):
            raise InputError(
                f"host share name {self.name!r} must be letters, digits, '.', '_', '-' or '@' (it names files)"
            )

    def path(self, key: str) -> Path:
        """The file holding slab `key` (a group name, say `generator@3`)."""
        assert SAFE_NAME.match(key), key
        return self.directory / f"{PREFIX}-{self.name}-{key}"

    def open_files(self) -> SharedFiles:
        """The files of one load under this share (nothing is created until `map`)."""
        return SharedFiles(self)


class SharedFiles:
    """The files of one `HostShare` this process has mapped; `unlink()` removes all of them."""

    def __init__(self, share: HostShare):
        self.share = share
        self.paths: list[Path] = []
        self.owner = share.owner
        self.nbytes = 0  # of every file mapped so far: tmpfs files are sparse until the owner fills them

    def map(self, key: str, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of exactly `nbytes`, mapped from slab `key`'s shared file (created if no process
        has yet). Every process of the host must map the same keys with the same sizes."""
        path = self.share.path(key)
        assert path not in self.paths, f"slab {key!r} mapped twice"
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)  # nothing to share, and an empty file cannot be mapped
        check_room(self.share.directory, self.nbytes + nbytes)
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

    def wait_all_mapped(self) -> None:
        """Wait until every process of the host has mapped every file, then unlink them (error or not)."""
        try:
            self.share.wait()
        finally:
            self.unlink()

    def wait_filled(self) -> None:
        """Wait until the owner has filled every shared slab."""
        self.share.wait()

    def abandon(self) -> None:
        """The load failed: leave no file behind."""
        self.unlink()

    def unlink(self) -> None:
        """Remove every file mapped so far (the mappings stay valid); the other processes may have already."""
        for path in self.paths:
            path.unlink(missing_ok=True)
        logger.debug("unlinked %d shared slab files (%s)", len(self.paths), format_bytes(self.nbytes))
        self.paths.clear()


def check_room(directory: Path, needed: int) -> None:
    """`directory` exists, is writable and has `needed` bytes free for shared files: a full tmpfs kills the
    process that writes the page that does not fit with SIGBUS, so it is refused before."""
    if not directory.is_dir():
        raise InputError(f"{directory} is not a folder, so the host copy of the weights cannot be shared: {FIX}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(f"{directory} is not writable, so the host copy of the weights cannot be shared: {FIX}")
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if needed > free:
        raise InputError(
            f"{directory} has {format_bytes(free)} free, and the shared host copy of the weights needs "
            f"{format_bytes(needed)} or more: {FIX}"
        )
