"""What /metrics reports, in Prometheus' text format (no client library: a handful of lines).

Queue length and jobs by state are read when asked; step and job times, and memory, are recorded by
the worker as jobs run. With replicas (serve/replicas/) each replica also has its gauges, labelled with its
Serve id: whether it runs a job, the jobs it completed and its largest device peak. Each finished job also
keeps its own figures (`stats`), which the job API returns, so a client can follow device and host memory
request by request.
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


@dataclass
class _Replica:
    busy: bool = False
    jobs: int = 0
    device_peak_bytes: int = 0


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = _Totals()
        self._last_step = 0.0
        self._replicas: dict[str, _Replica] = {}

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
        self.record(stats)
        return stats

    def record(self, stats: dict) -> None:
        """Count a completed job from its `stats` (`finished`'s, a replica's with its `replica` id)."""
        peak = stats.get("device_peak_bytes") or 0
        with self._lock:
            self._totals.jobs += 1
            self._totals.job_seconds += stats["seconds"]
            self._totals.device_peak_bytes = max(self._totals.device_peak_bytes, peak)
            if stats.get("replica") is not None:
                replica = self._replicas.setdefault(stats["replica"], _Replica())
                replica.jobs += 1
                replica.device_peak_bytes = max(replica.device_peak_bytes, peak)

    def replica_busy(self, replica: str, busy: bool) -> None:
        """The replica `replica` took a job (True) or ended it."""
        with self._lock:
            self._replicas.setdefault(replica, _Replica()).busy = busy

    def text(self, queue_length: int, states: dict[str, int], device: torch.device) -> str:
        with self._lock:
            t, last = _Totals(**vars(self._totals)), self._last_step
            replicas = {name: _Replica(**vars(figures)) for name, figures in sorted(self._replicas.items())}
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
        if replicas:
            lines += _replica_lines(replicas)
        return "\n".join(lines) + "\n"


def _replica_lines(replicas: dict[str, _Replica]) -> list[str]:
    def each(field: str) -> list[tuple[str, float]]:
        return [(f'replica="{name}"', int(getattr(figures, field))) for name, figures in replicas.items()]

    return [
        *_metric("replica_busy", "gauge", "whether the replica runs a job now", each("busy")),
        *_metric("replica_jobs_total", "counter", "jobs the replica completed", each("jobs")),
        *_metric(
            "replica_device_peak_bytes", "gauge", "largest device memory a job allocated", each("device_peak_bytes")
        ),
    ]


def _metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> list[str]:
    full = f"{PREFIX}_{name}"
    lines = [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
    lines += [f"{full}{{{labels}}} {value}" if labels else f"{full} {value}" for labels, value in samples]
    return lines
