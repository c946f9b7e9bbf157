"""What /metrics reports, in Prometheus' text format (no client library: a handful of lines).

Queue length and jobs by state are read when asked; step and job times, and memory, are recorded by
the worker as jobs run. Each finished job also keeps its own figures (`stats`), which the job API
returns, so a client can follow device and host memory request by request.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from ..app.timer import PhaseTimer

PREFIX = "cosmos3"


def host_resident_bytes() -> int | None:
    """This process's resident memory now (Linux), None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _page_size()
    except (OSError, ValueError, IndexError):
        return None


def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


@dataclass
class _Totals:
    steps: int = 0
    step_seconds: float = 0.0
    jobs: int = 0
    job_seconds: float = 0.0
    failed: int = 0
    device_peak_bytes: int = 0


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = _Totals()
        self._last_step = 0.0

    def step(self, seconds: float) -> None:
        with self._lock:
            self._totals.steps += 1
            self._totals.step_seconds += seconds
            self._last_step = seconds

    def failed(self) -> None:
        with self._lock:
            self._totals.failed += 1

    def finished(self, timer: PhaseTimer, seconds: float, device: torch.device) -> dict:
        """Record a completed job; its own figures (seconds per phase, device peak, memory after it)."""
        peaks = [p.device_peak_bytes for p in timer.phases if p.device_peak_bytes is not None]
        peak = max(peaks) if peaks else None
        stats = {
            "seconds": round(seconds, 4),
            "phases": {p.name: round(p.seconds, 4) for p in timer.phases},
            "device_peak_bytes": peak,
            "device_allocated_bytes": torch.cuda.memory_allocated(device) if device.type == "cuda" else None,
            "host_resident_bytes": host_resident_bytes(),
        }
        with self._lock:
            self._totals.jobs += 1
            self._totals.job_seconds += seconds
            self._totals.device_peak_bytes = max(self._totals.device_peak_bytes, peak or 0)
        return stats

    def text(self, queue_length: int, states: dict[str, int], device: torch.device) -> str:
        with self._lock:
            t, last = _Totals(**vars(self._totals)), self._last_step
        cuda = device.type == "cuda"
        lines = [
            *_metric("queue_length", "gauge", "jobs waiting behind the running one", [("", queue_length)]),
            *_metric("jobs", "gauge", "jobs in the store by state", [(f'state="{s}"', n) for s, n in states.items()]),
            *_metric("step_seconds", "summary", "seconds per denoising step", []),
            f"{PREFIX}_step_seconds_sum {t.step_seconds:.6f}",
            f"{PREFIX}_step_seconds_count {t.steps}",
            *_metric("last_step_seconds", "gauge", "the last denoising step's seconds", [("", round(last, 6))]),
            *_metric("job_seconds", "summary", "seconds per completed job, queue wait excluded", []),
            f"{PREFIX}_job_seconds_sum {t.job_seconds:.6f}",
            f"{PREFIX}_job_seconds_count {t.jobs}",
            *_metric("jobs_failed_total", "counter", "jobs that ended without a file since start", [("", t.failed)]),
            *_metric(
                "device_peak_bytes", "gauge", "largest device memory a job allocated", [("", t.device_peak_bytes)]
            ),
            *_metric(
                "device_allocated_bytes",
                "gauge",
                "device memory allocated now",
                [("", torch.cuda.memory_allocated(device) if cuda else 0)],
            ),
            *_metric(
                "host_resident_bytes", "gauge", "this process's resident memory", [("", host_resident_bytes() or 0)]
            ),
        ]
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> list[str]:
    full = f"{PREFIX}_{name}"
    lines = [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
    lines += [f"{full}{{{labels}}} {value}" if labels else f"{full} {value}" for labels, value in samples]
    return lines
