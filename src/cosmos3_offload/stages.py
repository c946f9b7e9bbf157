"""Per-stage wall time and peak memory (device and host) for the end-of-run summary.

Host peak is the process's resident-set high-water mark (VmHWM), reset at the start of each
stage where the kernel allows it (`/proc/self/clear_refs`), so each stage reports its own peak.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

GIB = 1024**3


def _read_host_peak_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_host_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then covers the process so far, which is still an upper bound


def wait_for_device(device: torch.device) -> None:
    """Block the host until the device has finished queued work, so wall times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class StageStats:
    name: str
    seconds: float
    device_peak_bytes: int | None
    host_peak_bytes: int | None
    device_reserved_peak_bytes: int | None = None


@dataclass
class StageRecorder:
    """Collects one `StageStats` per `with recorder.stage(name):` block."""

    device: torch.device
    stages: list[StageStats] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wait_for_device(self.device)
        _reset_host_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        wait_for_device(self.device)
        seconds = time.perf_counter() - start
        cuda = self.device.type == "cuda"
        device_peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        reserved_peak = torch.cuda.max_memory_reserved(self.device) if cuda else None
        self.stages.append(StageStats(name, seconds, device_peak, _read_host_peak_bytes(), reserved_peak))

    def summary(self) -> str:
        """A fixed-width table: one row per stage and a total row."""
        rows = [f"{'stage':<9} {'time':>9} {'device peak':>12} {'host peak':>10}"]
        for s in self.stages:
            rows.append(f"{s.name:<9} {s.seconds:>8.2f}s {_gib(s.device_peak_bytes):>12} {_gib(s.host_peak_bytes):>10}")
        rows.append(f"{'total':<9} {sum(s.seconds for s in self.stages):>8.2f}s")
        return "\n".join(rows)


def _gib(value: int | None) -> str:
    return "n/a" if value is None else format_bytes(value)


def format_bytes(value: int) -> str:
    """GiB with two decimals from 1 GiB up, MiB below."""
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 1024**2:.1f} MiB"
