"""A folder on a disk of a few MiB that a test can fill: a tmpfs mounted for the test (root only; CI runs as
root), so "No space left on device" is real, not mocked.

    with small_disk(tmp_path / "disk", size="8M") as folder:
        fill(folder)              # leave `leave` bytes free (0: none)
        ...                       # the disk is full now
        free(folder)              # give the space back

Without root (or where mounting is not allowed) the test is skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = "filler.bin"


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "8M") -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a full disk is tested on a tmpfs, which only root may mount")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full disk: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int = 0) -> None:
    """Write a filler file in `folder` until at most `leave` bytes are free on its disk."""
    path = folder / FILLER
    with open(path, "ab") as out:
        while True:
            free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
            if free <= leave:
                break
            try:
                out.write(b"\0" * min(free - leave, 1 << 20))
                out.flush()
            except OSError:
                break


def free(folder: Path) -> None:
    """Remove the filler: the disk has its space back."""
    (folder / FILLER).unlink(missing_ok=True)
