"""Every stream and event the staging engine uses, in one place.

`CopyEngine.copy_after_compute` orders a host->device copy on a side stream after the work
already queued on the compute stream (which may still read the destination) and makes the
compute stream wait for the copy: the host never blocks. On the CPU the same call is a plain
synchronous copy, so CI runs the same logic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


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
        nbytes = src.numel() * src.element_size()
        if self.stream is None:
            start = time.perf_counter()
            dst.copy_(src)
            return CopyRecord(nbytes, cpu_seconds=time.perf_counter() - start)
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("weight staging cannot run inside a CUDA graph capture; turn graphs off or staging off")
        compute = torch.cuda.current_stream(self.device)
        record = CopyRecord(nbytes, torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        # The destination may still be read by kernels queued earlier (the previous phase).
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            record.start.record()
            dst.copy_(src, non_blocking=True)
            record.end.record()
        # Kernels queued from now on see the new weights.
        compute.wait_stream(self.stream)
        return record
