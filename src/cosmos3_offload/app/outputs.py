"""The output file: checked before anything runs, held for the run, written whole or not at all.

- `check_output` refuses, before anything loads, a wrong suffix, a missing or unwritable folder,
  a folder in the file's place and a read-only existing file (its mode is the user's word, even
  for root, who could write it anyway).
- A symlink is followed: the video lands in the file it points to, and the link stays.
- `OutputLock` holds an advisory lock (`flock`) on a lock file beside the target for the whole
  run, so a second run to the same output is refused at its start instead of both reporting
  success while one video is lost. Taking the lock also removes the temporary files of killed
  runs for that output (nobody else can be writing them while the lock is held).
- `write_output` encodes into a temporary file in the target's folder and renames it over the
  target only when complete, with the existing file's mode (or the umask's for a new file).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from pathlib import Path
from types import TracebackType

import numpy as np

from ..errors import InputError
from .video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, encode_frames

PARTIAL_MARK = ".partial"


def resolve_target(path: Path) -> Path:
    """The file a write to `path` should replace: symlinks followed, the link itself left in place."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_output(path: Path, frames: int) -> None:
    """Refuse an output that cannot be written as asked, before anything is loaded."""
    suffixes = IMAGE_SUFFIXES if frames == 1 else VIDEO_SUFFIXES
    kind = "an image (1 frame)" if frames == 1 else "a video"
    if path.suffix.lower() not in suffixes:
        raise InputError(f"output {str(path)!r} is {kind}: give it one of the suffixes {', '.join(suffixes)}")
    target = resolve_target(path)
    folder = target.parent
    if not folder.is_dir():
        raise InputError(f"output folder {str(folder)!r} does not exist; create it first")
    if target.is_dir():
        raise InputError(f"output {str(path)!r} is a folder; give a file name")
    if target.exists():
        if not target.is_file():
            raise InputError(f"output {str(path)!r} is not a regular file; choose another --output")
        if not target.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise InputError(f"output {str(path)!r} exists and is read-only; remove it or choose another --output")
    # Try it: permission bits say nothing to root, and read-only mounts say nothing to os.access.
    probe = folder / f".{target.name}.{secrets.token_hex(4)}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        raise InputError(f"output folder {str(folder)!r} is not writable; choose another --output") from None
    probe.unlink(missing_ok=True)


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _partial_files(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{target.name}.*{PARTIAL_MARK}{target.suffix}"))


class OutputLock:
    """`with OutputLock(path):` holds the output for this run; a second holder is refused at once."""

    def __init__(self, path: Path):
        self.target = resolve_target(path)
        self.lock_file = _lock_path(self.target)
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        while True:
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                raise InputError(f"cannot create a lock file beside {str(self.target)!r}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise InputError(
                    f"another run is writing {str(self.target)!r}; wait for it or choose another --output"
                ) from None
            # The holder before us may have removed the file after we opened it: then lock anew.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_file))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                break
            os.close(fd)
        for stale in _partial_files(self.target):  # left by killed runs: nobody else can be writing them
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        assert self.fd is not None
        self.lock_file.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def write_output(frames: np.ndarray, path: Path, fps: float) -> None:
    """Write `frames` to `path` (through a symlink to its target) whole or not at all."""
    target = resolve_target(path)
    temporary = target.parent / f".{target.name}.{secrets.token_hex(4)}{PARTIAL_MARK}{target.suffix}"
    try:
        encode_frames(frames, temporary, fps)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_current_umask()
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
