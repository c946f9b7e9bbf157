"""GPU check of the attention implementations and the kernel probe (issue 12).

1. The probe at a head layout (default Nano's: 32/8 heads of 128, 16k x 16k non-causal) with an
   empty cache: which implementations are exact, their TFLOP/s, the bf16 GEMM rate, how long the
   probe took and how long reading it back from the cache takes; then the planner's profile.
2. Generation on a small random model (--model) with each implementation the probe kept at that
   model's layout: the latents after --steps steps against the default attention (diffusers'
   dispatcher). The bf16 tolerance is relative: an implementation passes when its relative L2
   error is at most 4x that of SDPA's math kernel (which rounds only its result) against the same
   default, and at least 2**-8 (bf16's unit roundoff).

Writes JSON to --out; exits 1 when an implementation the probe kept does not match. Random models
of head dim 128 (Cosmos3's): --model edge or nano. Example:
    python benchmarks/check_attention_gpu.py --out benchmarks/results/attention-check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import PROMPT, environment

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.device_profile import device_setup, probe_shape
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.kernels.attention import flash_attn_4_version
from cosmos3_offload.kernels.choice import EAGER, Kernels
from cosmos3_offload.kernels.probe import (
    EXACTNESS_FACTOR,
    KernelRates,
    ProbeShape,
    choose_attention,
    kernel_rates,
)
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.model.specs import MODEL_SPECS, model_spec
from cosmos3_offload.planning.plan import Plan

CUDA = torch.device("cuda")
BF16_UNIT_ROUNDOFF = 2**-8


def timed_rates(shape: ProbeShape, folder: Path) -> tuple[KernelRates, float]:
    start = time.perf_counter()
    rates = kernel_rates(CUDA, shape, folder=folder)
    return rates, time.perf_counter() - start


def describe(rates: KernelRates, seconds: float) -> dict:
    measured = rates.measured
    print(
        f"{rates.key.gpu} {rates.key.shape.heads}/{rates.key.shape.kv_heads}x{rates.key.shape.head_dim}: "
        f"{'read' if rates.from_cache else 'measured'} in {seconds:.2f} s; best {measured.best_attention}; "
        + ", ".join(f"{name} {rate:.0f}" for name, rate in measured.attention_TFLOPs.items())
        + f" TFLOP/s; linear {measured.linear_TFLOPs:.0f} TFLOP/s",
        flush=True,
    )
    for name, reason in measured.rejected.items():
        print(f"  dropped {name}: {reason}", flush=True)
    return {
        **rates.to_json(),
        "best_attention": measured.best_attention,
        "seconds": round(seconds, 3),
        "from_cache": rates.from_cache,
        "cache_path": str(rates.cache_path),
    }


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def check_generation(args: argparse.Namespace, rates: KernelRates) -> tuple[list[dict], bool]:
    """Latents with each exact implementation against the default attention's."""
    components = load_components(None, CUDA, torch.bfloat16, Plan(), random_model=args.model)
    config = GenerationConfig(
        prompt=PROMPT, frames=args.frames, resolution=args.tier, steps=args.steps, output=Path("/tmp/attention.mp4")
    )

    def latents(kernels: Kernels) -> tuple[torch.Tensor, float]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate_video(config, components, PhaseTimer(CUDA), progress=False, kernels=kernels).latents
        torch.cuda.synchronize()
        return out, time.perf_counter() - start

    default, default_s = latents(EAGER)
    outputs, errors = {}, {}
    for name in rates.measured.attention_TFLOPs:
        try:
            outputs[name] = latents(choose_attention(CUDA, name, dtype=torch.bfloat16, rates=rates))
        except Exception as error:  # reported, and a failure of the check
            errors[name] = f"{type(error).__name__}: {error}"
    math_error = relative_error(outputs["math"][0], default) if "math" in outputs else float("nan")
    tolerance = max(EXACTNESS_FACTOR * math_error, BF16_UNIT_ROUNDOFF)
    runs = [{"name": "ours-diffusers-attention", "attention": "diffusers", "generate_s": round(default_s, 3)}]
    passed = not errors and "math" in outputs
    for name in rates.measured.attention_TFLOPs:
        run = {"name": f"ours-{name}-attention", "attention": name, "error": errors.get(name)}
        if name in outputs:
            out, seconds = outputs[name]
            error = relative_error(out, default)
            run |= {
                "rel_err_vs_default": error,
                "tolerance": tolerance,
                "within_tolerance": error <= tolerance,
                "bit_identical": torch.equal(out, default),
                "generate_s": round(seconds, 3),
            }
            passed &= error <= tolerance
        print(json.dumps(run), flush=True)
        runs.append(run)
    return runs, passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--model", default="tiny-deep", choices=list(MODEL_SPECS), help="random model to generate with")
    parser.add_argument("--tier", type=int, default=256)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=16384, help="queries and keys of the timed attention")
    parser.add_argument("--cache-dir", type=Path, default=None, help="probe cache (default: a new empty folder)")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    folder = args.cache_dir or Path(tempfile.mkdtemp(prefix="kernel-rates-"))
    shape = ProbeShape(
        heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, queries=args.tokens, keys=args.tokens
    )
    rates, seconds = timed_rates(shape, folder)
    probe = describe(rates, seconds)
    again, seconds = timed_rates(shape, folder)
    cached = describe(again, seconds)
    setup = device_setup(CUDA, attention="auto", shape=shape, dtype=torch.bfloat16, folder=folder)
    print(f"auto: {setup.kernels.attention_name}; profile: {setup.profile.source}", flush=True)
    model_rates, seconds = timed_rates(probe_shape(model_spec(args.model).transformer), folder)
    model_probe = describe(model_rates, seconds)
    runs, passed = check_generation(args, model_rates)
    result = {
        "benchmark": "attention-check",
        **environment(),
        "flash_attn_4": flash_attn_4_version(),
        "model": args.model,
        "height_tier": args.tier,
        "frames": args.frames,
        "steps": args.steps,
        "probe": probe,
        "probe_from_cache": cached,
        "auto_attention": setup.kernels.attention_name,
        "profile": dataclasses.asdict(setup.profile),
        "model_probe": model_probe,
        "runs": runs,
        "passed": passed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'PASSED' if passed else 'FAILED'}; wrote {args.out}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
