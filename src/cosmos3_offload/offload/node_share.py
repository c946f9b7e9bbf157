"""One host copy of the offloaded weights per node, for processes that start at different times.

serve's replicas load the same model on one node, but not together: each starts when Ray places it,
and Ray restarts a dead one later, so `HostShare`'s protocol (every process present, two barriers)
does not fit them. A `NodeShare` is a folder on a tmpfs (`/dev/shm` by default), named for one model
load, that outlives the processes using it:

- `lock`: the process holding an exclusive `flock` on it owns the share and fills it. The kernel
  drops the lock when its holder dies (killed, OOM, any exit), so the next claimant takes a dead
  owner's share over at once: no pid to test for life, none reused, no race between two claimants.
- `slab-<key>`: one exact-size file per host slab, mapped `MAP_SHARED` by every process;
- `complete`: the slabs' manifest (key -> bytes), written last by the owner, after flushing every
  slab file, by an atomic rename: once it exists, every value is in place and never changes.

`open_files()` (called by the load before placing) makes this process a reader if `complete` exists;
else it takes the lock and becomes the owner, removing what a dead owner left half-filled; else
another process is filling the share: it waits for `complete` (or for the lock, if that owner dies),
up to `timeout_s`. A reader maps only complete files, so an owner never truncates a mapped file.

Nothing deletes a share but `remove_node_share` (serve calls it at shutdown): processes that still
map it keep their copy until they exit. `name` must differ for every model load whose bytes differ
(`node_share_name`); a share found with other slab sizes than the load's is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..units import format_bytes
from .shared import PREFIX, SAFE_NAME, check_room

logger = logging.getLogger(__name__)

LOCK = "lock"
COMPLETE = "complete"
SLAB = "slab-"
POLL_S = 0.1  # how often a waiting process looks for the owner's marker


def node_share_name(run_id: str, *load: object) -> str:
    """The share name of one model load in one serve run: `run_id` plus a digest of everything that decides
    the slabs' bytes (the model or checkpoint, the plan, the dtype, the FP8 options, sound, actions)."""
    digest = hashlib.sha256(repr(load).encode()).hexdigest()[:16]
    return f"{run_id}-{digest}"


@dataclass(frozen=True)
class NodeShare:
    """The node's shared host copy of one model load: `name` (see `node_share_name`), the tmpfs `directory`
    holding its folder, and how long a process waits for another one to fill it."""

    name: str
    directory: Path = Path("/dev/shm")
    timeout_s: float = 1800.0

    def __post_init__(self):
        if not SAFE_NAME.match(self.name):
            raise InputError(
                f"node share name {self.name!r} must be letters, digits, '.', '_', '-' or '@' (it names a folder)"
            )
        if not self.timeout_s > 0:
            raise InputError(f"the node share's wait must be a positive number of seconds, got {self.timeout_s}")

    @property
    def folder(self) -> Path:
        return node_share_folder(self.name, self.directory)

    def open_files(self) -> NodeFiles:
        """This process's files of the share: the owner's (it fills them) or a reader's of a complete copy.
        Blocks while another live process fills the share (see the module docstring)."""
        check_room(self.directory, 0)
        self.folder.mkdir(mode=0o700, exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        while True:
            manifest = _read_manifest(self.folder)
            if manifest is not None:
                return NodeFiles(self, manifest=manifest)
            lock = _try_lock(self.folder / LOCK)
            if lock is not None:
                manifest = _read_manifest(self.folder)  # completed between the two looks: its owner let go
                if manifest is None:
                    return NodeFiles(self, lock=lock)
                os.close(lock)
                return NodeFiles(self, manifest=manifest)
            if time.monotonic() > deadline:
                owner = (self.folder / LOCK).read_text().strip() or "?"
                raise InputError(
                    f"the node's shared host copy {self.name!r} is still being filled by process {owner} after "
                    f"{self.timeout_s:.0f} s: wait longer (NodeShare.timeout_s), or end that process"
                )
            time.sleep(POLL_S)


class NodeFiles:
    """The slab files of one `NodeShare` as this process uses them: `owner` creates and fills them, then
    publishes the manifest; a reader maps the complete files. See offload/shared.py's `SlabFiles`."""

    def __init__(self, share: NodeShare, *, lock: int | None = None, manifest: dict[str, int] | None = None):
        assert (lock is None) != (manifest is None)
        self.share = share
        self.owner = lock is not None
        self._lock = lock
        self.manifest = manifest if manifest is not None else {}  # the owner's grows as it maps
        self.paths: list[Path] = []
        self.nbytes = 0
        if self.owner:
            os.ftruncate(lock, 0)
            os.write(lock, f"{os.getpid()}\n".encode())  # for a waiting process's message
            left = _remove_slabs(share.folder)  # a dead owner's half-filled copy: nobody maps it
            logger.info("filling the node's shared host copy %s%s", share.name, " (taken over)" if left else "")

    def map(self, key: str, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of exactly `nbytes` mapped from slab `key`'s file (the owner creates it)."""
        assert SAFE_NAME.match(key), key
        path = self.share.folder / f"{SLAB}{key}"
        assert path not in self.paths, f"slab {key!r} mapped twice"
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)  # nothing to share, and an empty file cannot be mapped
        if self.owner:
            check_room(self.share.folder, self.nbytes + nbytes)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(descriptor, nbytes)
            finally:
                os.close(descriptor)
            self.manifest[key] = nbytes
        elif self.manifest.get(key) != nbytes or path.stat().st_size != nbytes:
            raise InputError(
                f"the node's shared host copy {self.share.name!r} holds another load (slab {key}: "
                f"{self.manifest.get(key, 0)} bytes, this load's {nbytes}): give each model load its own share name"
            )
        self.paths.append(path)
        self.nbytes += nbytes
        return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)

    def wait_all_mapped(self) -> None:
        """Nothing to wait for: a reader maps complete files only, and the files stay for later processes."""

    def wait_filled(self) -> None:
        """The owner publishes the copy: every slab file flushed, then the manifest, then the lock let go.
        A reader's copy was complete before it mapped it."""
        if not self.owner:
            return
        for path in self.paths:
            _fsync(path)
        folder = self.share.folder
        draft = folder / f"{COMPLETE}.{os.getpid()}"
        draft.write_text(json.dumps({"slabs": self.manifest, "filled_by": os.getpid()}))
        _fsync(draft)
        os.replace(draft, folder / COMPLETE)  # atomic: a reader sees no manifest, or all of it
        _fsync(folder)
        self._release()
        logger.info("filled the node's shared host copy %s (%s)", self.share.name, format_bytes(self.nbytes))

    def abandon(self) -> None:
        """The load failed: an owner removes its half-filled files and lets the next process claim the share."""
        if self.owner and self._lock is not None:
            _remove_slabs(self.share.folder)
            self._release()

    def _release(self) -> None:
        os.close(self._lock)  # closing the descriptor drops the flock
        self._lock = None


def node_share_folder(name: str, directory: Path = Path("/dev/shm")) -> Path:
    """The folder holding share `name`'s files."""
    return directory / f"{PREFIX}-node-{name}"


def remove_node_share(name: str, directory: Path = Path("/dev/shm")) -> None:
    """Delete share `name`'s files (serve calls it at shutdown, once its replicas are gone). Processes that
    still map the share keep their copy until they exit; a process that opens it later fills a new one."""
    folder = node_share_folder(name, directory)
    shutil.rmtree(folder, ignore_errors=True)
    logger.debug("removed the node's shared host copy %s", folder)


def _try_lock(path: Path) -> int | None:
    """A descriptor holding the exclusive flock on `path`, or None while another process holds it."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def _read_manifest(folder: Path) -> dict[str, int] | None:
    """The slabs of a complete share (key -> bytes), or None while it is not complete."""
    try:
        return json.loads((folder / COMPLETE).read_text())["slabs"]
    except FileNotFoundError:
        return None


def _remove_slabs(folder: Path) -> int:
    """Delete every slab file and manifest draft in `folder`; how many there were."""
    left = [p for p in folder.iterdir() if p.name.startswith((SLAB, f"{COMPLETE}."))]
    for path in left:
        path.unlink(missing_ok=True)
    return len(left)


def _fsync(path: Path) -> None:
    """Flush `path` (a file or a folder) to its filesystem: the owner's values before its marker."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
