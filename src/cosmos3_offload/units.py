"""Byte units and how the reports print them: one home for GiB and MiB."""

from __future__ import annotations

MIB = 1024**2
GIB = 1024**3


def format_bytes(value: int) -> str:
    """GiB with two decimals from 1 GiB up, MiB below."""
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.1f} MiB"
