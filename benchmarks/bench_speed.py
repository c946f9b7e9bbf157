"""Denoising speed (issue 12): diffusers' resident step against ours with each kernel change, all
resident and under a VRAM cap, with the profile split of each; SeaCache's computed steps.

Parts (each one process, results appended to one JSON per part):
- `peers`: diffusers 0.42.1 `Cosmos3OmniPipeline`, everything resident (its joint forward every
  pass; its `TextKVCacheConfig` hooks NucleusMoE blocks only, so it does not apply to Cosmos3).
- `ours`: one resident load; per shape, the step with each kernel variant: `eager` (as before this
  issue: diffusers' modules and its attention dispatcher), `fused` (--compile), `attention` (the
  probe's fastest exact backend), `both`; then a profiled step of `eager` and `both`.
- `capped`: the planner's plan for --cap GiB at 720p x 189f, run under that cap with `eager` and `both`.
- `seacache`: a whole --seacache-steps request at 480p x 93f (the decode included), uncached and
  with `--cache seacache`: steps computed and reused, request time. Random weights make the skip pattern meaningless for
  quality (the gate reads only the latents); it is reported anyway.

Nano-size random bf16 weights. Step i's time is from the end of step i-1 to the end of step i
(synchronized, benchmark only); step 0 includes compilation and warm-up and is reported apart.
Results: benchmarks/results/speed-<part>-<gpu>-<date>.json.

Example: python benchmarks/bench_speed.py --part ours --shapes 480x93 720x189
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

import argparse
import gc
import math
import time
from pathlib import Path

import torch
from bench_common import PROMPT, ResultsFile, gib, random_model, reset_device, set_cap
from bench_profile import profile_step
from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, Cosmos3OmniTransformer

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.device_profile import device_setup, probe_shape
from cosmos3_offload.app.feasibility import request_of
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.schedule import flow_scheduler
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.kernels.choice import EAGER, Kernels
from cosmos3_offload.kernels.fused import compile_seconds
from cosmos3_offload.loading.components import load_components, model_configs
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.model.tiny_tokenizer import build_tiny_tokenizer
from cosmos3_offload.planning.search import choose_plan
from cosmos3_offload.units import GIB

CUDA = torch.device("cuda")


def setup(model: str):
    """The probe's choice (fastest exact attention) and the device profile, as a run makes them."""
    return device_setup(CUDA, attention="auto", shape=probe_shape(model_configs(None, model)[0]), dtype=torch.bfloat16)


class _Stop(Exception):
    """Raised after the last timed step: the decode is not part of this benchmark."""


def config_for(tier: int, frames: int, steps: int, **extra) -> GenerationConfig:
    return GenerationConfig(
        prompt=PROMPT, frames=frames, resolution=tier, steps=steps, output=Path("/tmp/speed.mp4"), **extra
    )


def kernel_variants(attention: Kernels) -> dict[str, Kernels]:
    both = Kernels(attention=attention.attention, attention_name=attention.attention_name, fused=True)
    return {"eager": EAGER, "fused": Kernels(fused=True), "attention": attention, "both": both}


def timed_steps(components, config: GenerationConfig, kernels: Kernels, *, stop_after: int | None) -> dict:
    """Step times of one request (stopping after step `stop_after`, before the decode)."""
    stamps: list[float] = []
    compiled_before = compile_seconds()

    def on_step(index: int) -> None:
        torch.cuda.synchronize()  # benchmark only: each step's wall time is real
        stamps.append(time.perf_counter())
        if stop_after is not None and index == stop_after:
            raise _Stop

    reset_device()
    timer = PhaseTimer(CUDA)
    video = None
    start = time.perf_counter()
    try:
        video = generate_video(config, components, timer, progress=False, on_step=on_step, kernels=kernels)
    except _Stop:
        pass
    except torch.OutOfMemoryError as error:
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}
    prefill = next((p.seconds for p in timer.phases if p.name == "prefill"), None)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "prefill_s": None if prefill is None else round(prefill, 3),
        "first_step_s": round(stamps[0] - start - (prefill or 0.0), 3),
        "step_s": [round(s, 4) for s in steps],
        "mean_step_s": round(sum(steps) / len(steps), 4) if steps else None,
        "compile_s": round(compile_seconds() - compiled_before, 2),
        "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
        "step_cache": None if video is None or video.step_cache is None else video.step_cache.summary(),
        "error": None,
    }


def shape_name(tier: int, frames: int) -> str:
    return f"{tier}p-{frames}f"


def part_ours(args, results: ResultsFile) -> None:
    chosen = setup(args.model)
    attention = chosen.kernels
    results.data["device_profile"] = chosen.profile.source
    results.data["attention_TFLOPs"] = chosen.rates.measured.attention_TFLOPs
    results.data["linear_TFLOPs"] = chosen.rates.measured.linear_TFLOPs
    start = time.perf_counter()
    components = load_components(None, CUDA, torch.bfloat16, random_model=args.model)
    load_s = round(time.perf_counter() - start, 2)
    for tier, frames in args.shapes:
        config = config_for(tier, frames, args.steps)
        for name, kernels in kernel_variants(attention).items():
            run = timed_steps(components, config, kernels, stop_after=args.steps - 1)
            results.add(
                {
                    "name": f"ours-{name}-{shape_name(tier, frames)}",
                    "variant": name,
                    "plan": "resident",
                    "attention": kernels.attention_name,
                    "fused": kernels.fused,
                    "load_s": load_s,
                    **run,
                }
            )
        for name in ("eager", "both"):
            kernels = kernel_variants(attention)[name]
            results.add(
                {
                    "name": f"profile-{name}-{shape_name(tier, frames)}",
                    "variant": name,
                    **profile_step(components, tier, frames, CUDA, kernels),
                }
            )


def part_capped(args, results: ResultsFile) -> None:
    chosen = setup(args.model)
    attention, profile = chosen.kernels, chosen.profile
    results.data["device_profile"] = profile.source
    tier, frames = args.shapes[-1]
    config = config_for(tier, frames, args.steps)
    transformer_config, vae_config = model_configs(None, args.model)
    sizes = model_sizes(transformer_config, vae_config, dtype_bytes=2)
    choice = choose_plan(sizes, request_of(config), int(args.cap * GIB), profile)
    components = load_components(None, CUDA, torch.bfloat16, choice.plan, random_model=args.model)
    for name in ("eager", "both"):
        set_cap(args.cap)
        run = timed_steps(components, config, kernel_variants(attention)[name], stop_after=args.steps - 1)
        set_cap(None)
        results.add(
            {
                "name": f"ours-{name}-cap{args.cap:g}-{shape_name(tier, frames)}",
                "variant": name,
                "cap_gib": args.cap,
                "plan": choice.plan.describe(),
                "predicted_step_s": round(choice.prediction.times.step, 3),
                **run,
            }
        )


def part_seacache(args, results: ResultsFile) -> None:
    attention = setup(args.model).kernels
    tier, frames = args.shapes[0]
    components = load_components(None, CUDA, torch.bfloat16, random_model=args.model)
    kernels = kernel_variants(attention)["both"]
    for cache in ("none", "seacache"):
        config = config_for(tier, frames, args.seacache_steps, cache=cache)
        start = time.perf_counter()
        run = timed_steps(components, config, kernels, stop_after=None)  # to the end: the summary counts steps
        run["loop_s"] = round(time.perf_counter() - start, 2)
        results.add({"name": f"ours-{cache}-{shape_name(tier, frames)}-{args.seacache_steps}steps", **run})


def part_peers(args, results: ResultsFile) -> None:
    """diffusers' pipeline, everything resident; step times from its step-end callback."""
    spec = model_spec(args.model)
    transformer = random_model(Cosmos3OmniTransformer, spec.transformer, CUDA, torch.bfloat16)
    vae = random_model(AutoencoderKLWan, spec.vae, CUDA, torch.bfloat16)
    pipe = Cosmos3OmniPipeline(
        transformer=transformer,
        text_tokenizer=build_tiny_tokenizer(),
        vae=vae,
        scheduler=flow_scheduler(10.0),
        enable_safety_checker=False,
    )
    for tier, frames in args.shapes:
        config = config_for(tier, frames, args.steps)
        pipe.scheduler = flow_scheduler(config.flow_shift)
        reset_device()
        stamps = [time.perf_counter()]

        def on_step(_pipe, index, timestep, kwargs, stamps=stamps):
            torch.cuda.synchronize()  # benchmark only
            stamps.append(time.perf_counter())
            return {}

        pipe(
            prompt=PROMPT,
            num_frames=frames,
            height=config.height,
            width=config.width,
            num_inference_steps=args.steps,
            guidance_scale=config.guidance,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
            enable_safety_check=False,
            callback_on_step_end=on_step,
        )
        steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # step 0 includes the pipeline's setup
        results.add(
            {
                "name": f"diffusers-resident-{shape_name(tier, frames)}",
                "plan": "diffusers resident",
                "first_step_s": round(stamps[1] - stamps[0], 3),
                "step_s": [round(s, 4) for s in steps],
                "mean_step_s": round(sum(steps) / len(steps), 4),
                "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
            }
        )
    del pipe, transformer, vae
    gc.collect()


def parse_shape(text: str) -> tuple[int, int]:
    tier, frames = (int(part) for part in text.split("x"))
    return tier, frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["peers", "ours", "capped", "seacache"], required=True)
    parser.add_argument("--model", default="nano")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(480, 93), (720, 189)])
    parser.add_argument("--steps", type=int, default=3, help="steps per timed run (step 0 warms up)")
    parser.add_argument("--cap", type=float, default=8.0, help="GiB for the capped part")
    parser.add_argument("--seacache-steps", type=int, default=35)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    assert args.steps >= 2 and math.isfinite(args.cap)
    results = ResultsFile(args.out, f"speed-{args.part}", model=args.model)
    {"peers": part_peers, "ours": part_ours, "capped": part_capped, "seacache": part_seacache}[args.part](args, results)
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
