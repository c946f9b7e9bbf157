"""How much of a file-backed shared copy each process holds, read from /proc (Linux)."""

from __future__ import annotations

from pathlib import Path


def share_memory_kib(pid: int, folder: Path) -> tuple[int, int]:
    """(Rss, Pss) in KiB of process `pid`'s mappings of files in `folder` (from /proc/<pid>/smaps)."""
    rss = pss = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: address perms offset dev inode [path]
            inside = len(fields) >= 6 and fields[5].startswith(str(folder))
        elif inside and fields[0] == "Rss:":
            rss += int(fields[1])
        elif inside and fields[0] == "Pss:":
            pss += int(fields[1])
    return rss, pss
