"""Every stream and event the offload engine uses, in one place.

Copies run on one side stream. Each waits for an event marking the last compute that read its
destination, and compute waits for the copy's end event before using what it wrote: the host
never blocks. On the CPU every call is a plain synchronous copy or a no-op, so CI runs the same
logic.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from ..units import MIB
from .slabs import HostSlab, SlabLayout


@dataclass
class CopyRecord:
    """One copy's size and its timing events (CUDA) or measured seconds (CPU)."""

    nbytes: int
    start: torch.cuda.Event | None = None
    end: torch.cuda.Event | None = None
    cpu_seconds: float = 0.0

    def seconds_blocking(self) -> float:
        """Copy time; on CUDA this waits for the copy to finish."""
        if self.end is None:
            return self.cpu_seconds
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1000.0


class CopyEngine:
    """Host->device copies on one side stream, ordered against the compute stream with events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy_after_compute(self, dst: torch.Tensor, src: torch.Tensor) -> CopyRecord:
        """dst.copy_(src) once queued compute is done; later compute waits for it. Never blocks the host."""
        record = self.copy_after_event(dst, src, self.record_compute())
        self.compute_waits_for(record)
        return record

    def record_compute(self) -> torch.cuda.Event | None:
        """An event marking the work queued on the compute stream so far (None on the CPU)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy_after_event(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None) -> CopyRecord:
        """dst.copy_(src) on the copy stream once `after` has passed (the destination's last reader)."""
        nbytes = src.numel() * src.element_size()
        if self.stream is None:
            start = time.perf_counter()
            dst.copy_(src)
            return CopyRecord(nbytes, cpu_seconds=time.perf_counter() - start)
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("weight staging cannot run inside a CUDA graph capture; turn graphs off or staging off")
        record = CopyRecord(nbytes, torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        if after is not None:
            self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            record.start.record()
            dst.copy_(src, non_blocking=True)
            record.end.record()
        return record

    def compute_waits_for(self, record: CopyRecord) -> None:
        """Kernels queued on the compute stream from now on run after the copy."""
        if record.end is not None:
            torch.cuda.current_stream(self.device).wait_event(record.end)

    def host_waits_for(self, record: CopyRecord) -> None:
        """Block the host until the copy has finished (it has already, on the CPU)."""
        if record.end is not None:
            record.end.synchronize()


def measure_h2d_GBps(device: torch.device, nbytes: int = 256 * MIB, repeats: int = 3) -> float | None:
    """Bandwidth of one bulk copy from an exact-size pinned slab, as a staged group makes it (median of
    `repeats` after a warm-up; None on the CPU). Blocks for the copies."""
    if device.type != "cuda":
        return None
    slab = HostSlab(SlabLayout.pack([((("probe", "bytes"),), (nbytes,), torch.uint8)]))
    slab.buffer.fill_(1)
    slab.pin()
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    engine = CopyEngine(device)
    speeds = [
        nbytes / engine.copy_after_compute(target, slab.buffer).seconds_blocking() / 1e9 for _ in range(repeats + 1)
    ]
    return sorted(speeds[1:])[repeats // 2]


class HostLanding:
    """Device tensors copied into host tensors behind the compute.

    Each piece goes to a pinned buffer with a non-blocking copy (queued on the current stream after
    the kernels that made it) and is written to its destination `depth` pieces later, once that
    copy has finished, so the host keeps queueing work instead of waiting for each piece. On the
    CPU a piece is copied at once.
    """

    def __init__(self, depth: int = 4):
        self.depth = depth
        self.pending: deque[tuple[torch.cuda.Event, torch.Tensor, torch.Tensor]] = deque()

    def put(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if src.device.type != "cuda":
            dst.copy_(src)
            return
        bounce = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)  # the caching host allocator reuses these
        bounce.copy_(src, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record(torch.cuda.current_stream(src.device))
        self.pending.append((landed, bounce, dst))
        while len(self.pending) > self.depth:
            self._land()

    def drain(self) -> None:
        while self.pending:
            self._land()

    def _land(self) -> None:
        landed, bounce, dst = self.pending.popleft()
        landed.synchronize()
        dst.copy_(bounce)
