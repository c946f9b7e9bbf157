"""Per-phase wall time and peak memory (device and host) for the end-of-run summary.

A run's phases are load, encode, prefill, denoise, decode, sound and write. Given `events` (app/events.py), the
timer tells them each phase's start and end, so a run's watchers see every phase. Host peak is the process's
resident-set high-water mark (VmHWM), reset at the start of each phase where the kernel allows it
(`/proc/self/clear_refs`), so each phase reports its own peak.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..units import format_bytes
from .events import RunEvents


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
class PhaseStats:
    name: str
    seconds: float
    device_peak_bytes: int | None
    host_peak_bytes: int | None
    device_reserved_peak_bytes: int | None = None


@dataclass
class PhaseTimer:
    """Collects one `PhaseStats` per `with timer.phase(name):` block, and tells `events` (when given) each
    phase's start and end, and each denoising step (`step`) and decode piece (`piece`)."""

    device: torch.device
    phases: list[PhaseStats] = field(default_factory=list)
    events: RunEvents | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wait_for_device(self.device)
        _reset_host_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.events is not None:
            self.events.phase_started(name)
        start = time.perf_counter()
        yield
        wait_for_device(self.device)
        seconds = time.perf_counter() - start
        if self.events is not None:
            self.events.phase_ended(name)
        cuda = self.device.type == "cuda"
        device_peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        reserved_peak = torch.cuda.max_memory_reserved(self.device) if cuda else None
        self.phases.append(PhaseStats(name, seconds, device_peak, _read_host_peak_bytes(), reserved_peak))

    def step(self, index: int, total: int) -> None:
        """Denoising step `index` (from 0) of `total` has been queued: with events, wait for it so its seconds are
        real (one wait per step: the next step's launches lose a few milliseconds' head start), and tell them."""
        if self.events is not None:
            wait_for_device(self.device)
            self.events.step(index, total)

    def piece(self, index: int, total: int) -> None:
        """Piece `index` (from 0) of the video decode's `total` is about to run."""
        if self.events is not None:
            self.events.piece(index, total)

    def summary(self) -> str:
        """A fixed-width table: one row per phase and a total row."""
        rows = [f"{'phase':<9} {'time':>9} {'device peak':>12} {'host peak':>10}"]
        for s in self.phases:
            rows.append(f"{s.name:<9} {s.seconds:>8.2f}s {_gib(s.device_peak_bytes):>12} {_gib(s.host_peak_bytes):>10}")
        rows.append(f"{'total':<9} {sum(s.seconds for s in self.phases):>8.2f}s")
        return "\n".join(rows)


def _gib(value: int | None) -> str:
    return "n/a" if value is None else format_bytes(value)
