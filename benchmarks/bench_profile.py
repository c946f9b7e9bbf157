"""Where a denoising step's time goes (issue 12, part 1): one step under `torch.profiler`, its device
kernels sorted into attention, GEMMs, other compute (norms, rotary, activations, residual adds,
casts), copies, and the idle gaps between kernels, for each shape and weight format.

Nano-size random weights, all resident, bf16 and FP8 W8A8 (`--quantize fp8`, `--fp8-mode w8a8`).
Step 0 warms up (and compiles FP8's quantizer); step 1 is profiled; the run stops after it.
Results: benchmarks/results/profile-<gpu>-<date>.json.

Example: python benchmarks/bench_profile.py --shapes 720x189 480x93 --formats bf16 fp8
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

import argparse
import gc
import time
from pathlib import Path

import torch
from bench_common import PROMPT, ResultsFile

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.kernels.choice import EAGER, Kernels
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.loading.quantization import Fp8Options

# Kernel names as they appear on Hopper with torch 2.11 (cuDNN/flash SDPA, cuBLAS/CUTLASS GEMMs).
ATTENTION = ("flash", "fmha", "cudnn", "sdpa", "attention", "attn")
GEMM = ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "cublas", "scaled_mm")
COPY = ("memcpy", "memset")
FORMATS = {"bf16": Fp8Options(), "fp8": Fp8Options(quantize="fp8", mode="w8a8")}


class _Profiled(Exception):
    """Raised after the profiled step: the decode is not part of this benchmark."""


def category(name: str) -> str:
    lowered = name.lower()
    for label, keys in (("copy", COPY), ("attention", ATTENTION), ("gemm", GEMM)):
        if any(key in lowered for key in keys):
            return label
    return "other"


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def breakdown(profiler, wall_s: float) -> dict:
    kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    seconds: dict[str, float] = {"attention": 0.0, "gemm": 0.0, "other": 0.0, "copy": 0.0}
    top: dict[str, float] = {}
    for event in kernels:
        span = event.time_range.end - event.time_range.start
        seconds[category(event.name)] += span / 1e6
        top[event.name[:120]] = top.get(event.name[:120], 0.0) + span / 1e6
    busy = union_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6
    return {
        "step_wall_s": round(wall_s, 4),
        "kernel_s": {k: round(v, 4) for k, v in seconds.items()},
        "busy_s": round(busy, 4),
        "idle_s": round(max(wall_s - busy, 0.0), 4),
        "kernels": len(kernels),
        "top_kernels_s": {k: round(v, 4) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]},
    }


def profile_step(components, tier: int, frames: int, device: torch.device, kernels: Kernels = EAGER) -> dict:
    config = GenerationConfig(prompt=PROMPT, frames=frames, resolution=tier, steps=2, output=Path("/tmp/profile.mp4"))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    started = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def on_step(index: int) -> None:
        sync()  # benchmark only: each step's wall time is real
        if index == 0:
            profiler.start()
            started["t"] = time.perf_counter()
        else:
            started["wall"] = time.perf_counter() - started["t"]
            profiler.stop()
            raise _Profiled

    try:
        generate_video(config, components, PhaseTimer(device), progress=False, on_step=on_step, kernels=kernels)
    except _Profiled:
        pass
    return {"height": config.height, "width": config.width, "frames": frames, **breakdown(profiler, started["wall"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="+", default=["720x189", "480x93"])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = ResultsFile(args.out, "profile", model=args.model)
    for name in args.formats:
        components = load_components(None, device, torch.bfloat16, random_model=args.model, fp8=FORMATS[name])
        for shape in args.shapes:
            tier, frames = (int(part) for part in shape.split("x"))
            results.add({"format": name, **profile_step(components, tier, frames, device)})
        del components
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
