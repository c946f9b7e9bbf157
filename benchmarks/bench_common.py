"""Shared pieces of the GPU benchmarks: environment, results file, memory probes, random models.

Results follow ../shared/BENCHMARKS.md: one JSON per benchmark run, rewritten after every
measured run so a call that is cut short still leaves what it measured.
"""

from __future__ import annotations

import datetime
import json
import shlex
import sys
import threading
import time
from pathlib import Path

import diffusers
import torch
from torch import nn

from cosmos3_offload.loading.random_weights import RandomValues
from cosmos3_offload.offload.materialize import (
    allocate_on_device,
    build_on_meta,
    group_layouts,
    keep_fp32_dtype,
    move_buffers,
)
from cosmos3_offload.offload.placements import bind_views
from cosmos3_offload.offload.streams import measure_h2d_GBps
from cosmos3_offload.units import GIB

PROMPT = "A red fox trots through fresh snow at the edge of a pine forest at dawn, steam rising from its breath."


def environment() -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }


class ResultsFile:
    """benchmarks/results/<name>-<gpu>-<date>.json, rewritten after each run."""

    def __init__(self, folder: Path, benchmark: str, **extra):
        self.data = {"benchmark": benchmark, **environment(), **extra, "runs": []}
        gpu = self.data["gpu"].replace("NVIDIA ", "").replace(" ", "-")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{benchmark}-{gpu}-{self.data['date']}.json"

    def add(self, run: dict) -> None:
        self.data["runs"].append(run)
        self.path.write_text(json.dumps(self.data, indent=1))
        print(json.dumps({k: v for k, v in run.items() if k not in ("predicted",)}), flush=True)


def gib(value: float | None) -> float | None:
    return None if value is None else round(value / GIB, 3)


def read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class HostPeakSampler:
    """Samples anonymous resident memory (which includes pinned pages) every 20 ms while active."""

    def __init__(self):
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, read_status_kib("RssAnon"))
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, read_status_kib("RssAnon"))

    @property
    def peak_gib(self) -> float:
        return round(self.peak_kib * 1024 / GIB, 3)


def measure_pinned_h2d() -> float:
    """GB/s of a 2 GiB bulk copy from an exact-size pinned slab (the library's own probe, larger)."""
    return round(measure_h2d_GBps(torch.device("cuda"), nbytes=2 * GIB, repeats=5), 2)


def random_model(model_cls: type, config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A complete diffusers model (every weight, lm_head included) with our seeded values, for the peers."""
    model = build_on_meta(model_cls, config)
    layout = group_layouts(model, lambda name: "all", keep_fp32_dtype(model_cls, dtype))["all"]
    homes = {entry: allocate_on_device(entry, device) for entry in layout.entries}
    bind_views(model, layout, homes.__getitem__)
    RandomValues(seed).fill(list(homes.items()))
    move_buffers(model, device)
    return model


def reset_device() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_per_process_memory_fraction(1.0)


def set_cap(cap_gib: float | None) -> None:
    reset_device()
    if cap_gib is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))


def timed_ms(fn, repeats: int, device: torch.device) -> float:
    """Milliseconds per call (CUDA events on a GPU), after two warm-up calls."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - started) * 1e3 / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats
