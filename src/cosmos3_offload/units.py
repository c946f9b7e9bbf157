"""Byte units and how the reports print them: one home for KiB to PiB."""

from __future__ import annotations

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4
PIB = 1024**5
# The binary units, largest first: a size prints in the largest one it fills.
BINARY_UNITS = (("PiB", PIB), ("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB))


def format_bytes(value: int) -> str:
    """GiB with two decimals from 1 GiB up (TiB and PiB from theirs), MiB and KiB with one, bytes below 1 KiB."""
    for name, size in BINARY_UNITS:
        if abs(value) >= size:
            return f"{value / size:.2f} {name}" if size >= GIB else f"{value / size:.1f} {name}"
    return f"{value} B"


def format_budget(value: int) -> str:
    """A budget as a user writes one: one decimal in the largest unit it fills (8.0 GiB, 1.0 MiB, 1.0 PiB)."""
    for name, size in BINARY_UNITS:
        if abs(value) >= size:
            return f"{value / size:.1f} {name}"
    return f"{value} B"
