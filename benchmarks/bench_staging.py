"""Stage-offload benchmark (issue 3): ours with each staging plan against diffusers' own modes.

Parts (each one device call; results in benchmarks/results/staging-<part>-<gpu>-<date>.json):

- `ours`: pinned H2D bandwidth; ours all-resident and with `generator`, `reasoner vae`,
  `reasoner generator vae` staged; and diffusers' `apply_group_offloading` (block level, stream),
  whose setup time is the load figure ours must beat in the same call.
- `peers`: diffusers resident and `enable_model_cpu_offload`.
- `caps`: all groups staged, the largest frame count that runs (1 step + decode) under each cap.

Random weights of the named model size (seeded), bf16, the full-size Wan2.2 VAE.
Example: python benchmarks/bench_staging.py --part ours --model nano --shapes 480x93 720x189 --steps 3
"""

from __future__ import annotations

import os

# Fewer, growable segments: less fragmentation under a memory cap (set before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import gc
import time
from pathlib import Path

import torch
from bench_common import (
    PROMPT,
    HostPeakSampler,
    ResultsFile,
    gib,
    measure_pinned_h2d,
    random_model,
    reset_device,
    set_cap,
)
from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, Cosmos3OmniTransformer
from diffusers.hooks import apply_group_offloading

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.schedule import flow_scheduler
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.model.groups import PLANNED_GROUPS
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.model.tiny_tokenizer import build_tiny_tokenizer
from cosmos3_offload.planning.plan import Plan

CUDA = torch.device("cuda")
OURS_PLANS = [(), ("generator",), ("reasoner", "vae"), ("reasoner", "generator", "vae")]
CAP_LADDERS = {720: [189, 141, 93, 61, 33, 17], 480: [389, 293, 189, 93, 45]}


def parse_shape(text: str) -> tuple[int, int]:
    tier, frames = text.split("x")
    return int(tier), int(frames)


def measure_ours(components, tier: int, frames: int, steps: int, cap_gib: float | None) -> dict:
    """One generation (prefill, steps, decode) with per-step times, per-phase peaks and staging throughput."""
    set_cap(cap_gib)
    config = GenerationConfig(
        prompt=PROMPT, frames=frames, resolution=tier, steps=steps, output=Path("/tmp/cosmos3-bench.mp4")
    )
    timer = PhaseTimer(CUDA)
    stamps: list[float] = []

    def on_step(index: int) -> None:
        torch.cuda.synchronize()  # benchmark only: make each step's wall time real
        stamps.append(time.perf_counter())

    placements = components.engine.placements
    copies_before = {name: len(p.copies) for name, p in placements.items()}
    run = {"height": config.height, "width": config.width, "frames": frames, "steps": steps, "cap_gib": cap_gib}
    try:
        generate_video(config, components, timer, progress=False, on_step=on_step)
    except torch.OutOfMemoryError as error:
        # The JSON keeps its field names ("stages") so results from before and after the rename read alike.
        done = {s.name: round(s.seconds, 3) for s in timer.phases}
        peaks = {s.name: gib(s.device_peak_bytes) for s in timer.phases}
        reset_device()
        message = f"out of memory after stages {list(done)}: {str(error).splitlines()[0]}"
        return {**run, "completed_stages_s": done, "completed_stage_peaks_gib": peaks, "error": message}
    phases = {s.name: s for s in timer.phases}
    rest = [b - a for a, b in zip(stamps, stamps[1:])]
    staging = {}
    for name, placement in placements.items():
        if not placement.arena_bytes:
            continue  # weights that never move (resident groups, the host-side embedding table)
        new = placement.copies[copies_before[name] :]
        if not new:
            continue  # a group that was not used (the encoder without conditioning)
        seconds = sum(c.seconds_blocking() for c in new)
        moved = sum(c.nbytes for c in new)
        staging[name] = {"GiB": gib(moved), "s": round(seconds, 4), "GBps": round(moved / seconds / 1e9, 2)}
    moved_total = sum(v["GiB"] for v in staging.values()) * 1024**3
    seconds_total = sum(v["s"] for v in staging.values())
    return {
        **run,
        "prefill_s": round(phases["prefill"].seconds, 3),
        "step_s": [round(phases["denoise"].seconds - sum(rest), 3)] + [round(r, 3) for r in rest],
        "decode_s": round(phases["decode"].seconds, 3),
        "peak_allocated_gib": gib(max(s.device_peak_bytes for s in phases.values())),
        "peak_reserved_gib": gib(max(s.device_reserved_peak_bytes for s in phases.values())),
        "peak_allocated_no_decode_gib": gib(max(phases[n].device_peak_bytes for n in ("prefill", "denoise"))),
        "decode_peak_allocated_gib": gib(phases["decode"].device_peak_bytes),
        "staging": staging,
        "h2d_GBps": round(moved_total / seconds_total / 1e9, 2) if seconds_total else None,
        "error": None,
    }


def load_ours(model: str, plan: Plan):
    reset_device()
    with HostPeakSampler() as host:
        start = time.perf_counter()
        components = load_components(None, CUDA, torch.bfloat16, plan, random_model=model)
        torch.cuda.synchronize()
        load_s = time.perf_counter() - start
    info = {
        "system": "ours",
        "model": model,
        "plan": plan.describe(),
        "load_s": round(load_s, 2),
        "host_peak_private_gib": host.peak_gib,
        "pinned_gib": gib(components.engine.pinned_bytes),
        "device_after_load_gib": gib(torch.cuda.memory_allocated()),
    }
    return components, info


def part_ours(args, results: ResultsFile) -> None:
    for offload in OURS_PLANS:
        components, info = load_ours(args.model, Plan.from_offload(offload))
        for tier, frames in args.shapes:
            name = f"ours-{'+'.join(offload) or 'resident'}-{tier}p-{frames}f"
            results.add({"name": name, **info, **measure_ours(components, tier, frames, args.steps, None)})
        del components
        gc.collect()
    part_peer(args, results, "diffusers-group-offload")


def part_peers(args, results: ResultsFile) -> None:
    for mode in ("diffusers-resident", "diffusers-model-offload"):
        part_peer(args, results, mode)


def part_peer(args, results: ResultsFile, mode: str) -> None:
    """diffusers' own pipeline (joint forward every pass) in one of its memory modes; latents only."""
    reset_device()
    spec = model_spec(args.model)
    home = CUDA if mode == "diffusers-resident" else torch.device("cpu")
    with HostPeakSampler() as host:
        start = time.perf_counter()
        transformer = random_model(Cosmos3OmniTransformer, spec.transformer, home, torch.bfloat16)
        # The pipeline encodes an all-zero video for t2v, so the VAE must sit where its input is.
        vae = random_model(
            AutoencoderKLWan, spec.vae, CUDA if mode != "diffusers-model-offload" else home, torch.bfloat16
        )
        load_s = time.perf_counter() - start
        scheduler = flow_scheduler(10.0)
        pipe = Cosmos3OmniPipeline(
            transformer=transformer,
            text_tokenizer=build_tiny_tokenizer(),
            vae=vae,
            scheduler=scheduler,
            enable_safety_checker=False,
        )
        start = time.perf_counter()
        if mode == "diffusers-model-offload":
            pipe.enable_model_cpu_offload(device=CUDA)
        elif mode == "diffusers-group-offload":
            apply_group_offloading(
                transformer,
                onload_device=CUDA,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
            )
        torch.cuda.synchronize()
        setup_s = time.perf_counter() - start
    info = {"system": mode, "model": args.model, "plan": mode, "load_s": round(load_s, 2), "setup_s": round(setup_s, 2)}
    info["host_peak_private_gib"] = host.peak_gib
    for tier, frames in args.shapes:
        results.add({"name": f"{mode}-{tier}p-{frames}f", **info, **measure_peer(pipe, tier, frames, args.steps)})
    del pipe, transformer, vae
    gc.collect()


def measure_peer(pipe, tier: int, frames: int, steps: int) -> dict:
    config = GenerationConfig(
        prompt=PROMPT, frames=frames, resolution=tier, steps=steps, output=Path("/tmp/cosmos3-bench.mp4")
    )
    pipe.scheduler = flow_scheduler(config.flow_shift)
    reset_device()
    stamps = [time.perf_counter()]

    def on_step(_pipe, index, timestep, kwargs):
        torch.cuda.synchronize()  # benchmark only
        stamps.append(time.perf_counter())
        return {}

    run = {"height": config.height, "width": config.width, "frames": frames, "steps": steps, "cap_gib": None}
    try:
        pipe(
            prompt=PROMPT,
            num_frames=frames,
            height=config.height,
            width=config.width,
            num_inference_steps=steps,
            guidance_scale=config.guidance,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
            enable_safety_check=False,
            callback_on_step_end=on_step,
        )
    except torch.OutOfMemoryError as error:
        reset_device()
        return {**run, "error": f"out of memory: {str(error).splitlines()[0]}"}
    return {
        **run,
        "prefill_s": None,
        "step_s": [round(b - a, 3) for a, b in zip(stamps, stamps[1:])],
        "step_s_note": "step 0 includes tokenization, latent preparation (a VAE encode of zeros) and warm-up",
        "decode_s": None,
        "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
        "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()),
        "error": None,
    }


def part_caps(args, results: ResultsFile) -> None:
    components, info = load_ours(args.model, Plan.from_offload(PLANNED_GROUPS))
    for cap in args.caps:
        for tier, ladder in CAP_LADDERS.items():
            for frames in ladder:
                run = measure_ours(components, tier, frames, 1, cap)
                results.add({"name": f"ours-staged-cap{cap:g}-{tier}p-{frames}f", **info, **run})
                if run["error"] is None:
                    break
    set_cap(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["ours", "peers", "caps"], required=True)
    parser.add_argument("--model", default="nano")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(480, 93), (720, 189)])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--caps", nargs="+", type=float, default=[16, 24, 32])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results = ResultsFile(args.out, f"staging-{args.part}", h2d_pinned_GBps=measure_pinned_h2d())
    {"ours": part_ours, "peers": part_peers, "caps": part_caps}[args.part](args, results)
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
