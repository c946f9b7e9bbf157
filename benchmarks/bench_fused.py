"""Fused elementwise kernels on one Nano generator layer (issue 12, part 2): eager against fused
(compiled) time per layer call, the compile time, how far the fused output is from eager, and a
profiler split of each one's kernel time (attention, GEMMs, other, copies).

A Nano-size random bf16 decoder layer on one GPU, 44,160 generator tokens (720p x 189f) attending
to a 256-token prompt memory. It also checks that the fused math run uncompiled
(COSMOS3_FUSED_EAGER=1) equals eager bit for bit on the GPU, and that a second token count and
prompt length reuse the compiled kernels. Not run in CI; about a minute on an H200.

Example: python benchmarks/bench_fused.py --out benchmarks/results/fused-H200-2026-11-28.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from bench_common import environment, timed_ms
from bench_profile import breakdown
from diffusers.models.transformers.transformer_cosmos3 import (
    Cosmos3VLTextMoTDecoderLayer,
    Cosmos3VLTextRotaryEmbedding,
)

from cosmos3_offload.kernels import fused
from cosmos3_offload.kernels.choice import EAGER, Kernels
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.split.denoise import generator_layer

FUSED = Kernels(fused=True)


def build_layer(spec: dict, device: torch.device, seed: int) -> Cosmos3VLTextMoTDecoderLayer:
    """A random bf16 decoder layer: linears N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2)."""
    with torch.device(device):
        layer = Cosmos3VLTextMoTDecoderLayer(
            hidden_size=spec["hidden_size"],
            head_dim=spec["head_dim"],
            num_attention_heads=spec["num_attention_heads"],
            num_key_value_heads=spec["num_key_value_heads"],
            intermediate_size=spec["intermediate_size"],
            attention_bias=False,
            rms_norm_eps=1e-6,
            hidden_act=spec.get("hidden_act", "silu"),
            qk_norm_for_text=spec.get("qk_norm_for_text", True),
            use_und_k_norm_for_gen=spec.get("use_und_k_norm_for_gen", False),
        )
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for param in layer.parameters():
            values = torch.randn(param.shape, device=device, generator=generator)
            param.copy_(values / param.shape[-1] ** 0.5 if param.ndim == 2 else 1 + 0.1 * values)
    return layer.to(torch.bfloat16).requires_grad_(False).eval()


def layer_inputs(spec: dict, tokens: int, prompt: int, device: torch.device, seed: int) -> tuple:
    """hidden [tokens, hidden], memory K/V [prompt, kv_heads, head_dim], cos/sin [tokens, 1, head_dim]."""
    generator = torch.Generator(device).manual_seed(seed)
    dtype = torch.bfloat16
    hidden = torch.randn(tokens, spec["hidden_size"], device=device, generator=generator).to(dtype)
    kv = (prompt, spec["num_key_value_heads"], spec["head_dim"])
    memory = [torch.randn(kv, device=device, generator=generator).to(dtype) for _ in range(2)]
    rope = Cosmos3VLTextRotaryEmbedding(spec["head_dim"], 5000000.0, (24, 20, 20)).to(device)
    ids = torch.arange(prompt, prompt + tokens, device=device).expand(3, 1, tokens)  # [3, 1, tokens]
    cos, sin = rope(position_ids=ids, device=device, dtype=dtype)
    return hidden, memory[0], memory[1], cos.squeeze(0).unsqueeze(1), sin.squeeze(0).unsqueeze(1)


def run(layer, inputs, kernels: Kernels) -> torch.Tensor:
    with torch.no_grad():
        return generator_layer(layer, *inputs, kernels=kernels)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # benchmark only: wall times must cover the kernels


def profiled(fn, calls: int, device: torch.device) -> dict:
    """Device kernel seconds per category for `calls` calls under torch.profiler, divided per call."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        wall = time.perf_counter() - started
    split = breakdown(profiler, wall)
    split["kernel_ms_per_call"] = {k: round(v * 1e3 / calls, 3) for k, v in split.pop("kernel_s").items()}
    return split


def differences(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    delta = (actual.float() - expected.float()).abs()
    relative = (actual.double() - expected.double()).norm() / expected.double().norm()
    return {
        "max_abs_diff": delta.max().item(),
        "relative_l2": relative.item(),
        "elements_differing": (actual != expected).float().mean().item(),
        "bit_identical": torch.equal(actual, expected),
    }


def uncompiled_fused(layer, inputs) -> torch.Tensor:
    """The fused math without torch.compile (COSMOS3_FUSED_EAGER=1 for this call only)."""
    previous = os.environ.get(fused.FORCE_EAGER_ENV)
    os.environ[fused.FORCE_EAGER_ENV] = "1"
    try:
        return run(layer, inputs, FUSED)
    finally:
        if previous is None:
            del os.environ[fused.FORCE_EAGER_ENV]
        else:
            os.environ[fused.FORCE_EAGER_ENV] = previous


def check(layer, spec: dict, inputs, args, device: torch.device) -> dict:
    """Compile (the first fused call), then compare fused and uncompiled fused against eager, and see
    whether another token count and prompt length recompile."""
    eager = run(layer, inputs, EAGER)
    result = {"uncompiled_fused_vs_eager": differences(uncompiled_fused(layer, inputs), eager)}
    synchronize(device)
    started = time.perf_counter()
    first = run(layer, inputs, FUSED)
    synchronize(device)
    result["first_fused_call_s"] = round(time.perf_counter() - started, 2)
    result["compile_s"] = round(fused.compile_seconds(), 2)
    result["graphs_compiled"] = fused.compile_count()
    result["compiled"] = not fused.compile_failed()
    result["fused_vs_eager"] = differences(first, eager)
    del first, eager
    other = layer_inputs(spec, args.tokens - args.tokens // 8, args.prompt_tokens + 37, device, seed=2)
    run(layer, other, FUSED)
    result["recompiled_for_new_shape"] = fused.compile_count() != result["graphs_compiled"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano")
    parser.add_argument("--tokens", type=int, default=44160, help="generator tokens (720p x 189f: 44160)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (times, no kernel split)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = model_spec(args.model).transformer
    layer = build_layer(spec, device, seed=0)
    inputs = layer_inputs(spec, args.tokens, args.prompt_tokens, device, seed=1)
    result = {"benchmark": "fused", **environment(), "model": args.model, "tokens": args.tokens}
    result.update(prompt_tokens=args.prompt_tokens, **check(layer, spec, inputs, args, device))
    # One step runs every layer once per CFG branch.
    calls_per_step = spec["num_hidden_layers"] * 2
    for name, kernels in (("eager", EAGER), ("fused", FUSED)):
        call = lambda k=kernels: run(layer, inputs, k)  # noqa: E731
        result[f"{name}_ms"] = round(timed_ms(call, args.repeats, device), 3)
        result[f"{name}_profile"] = profiled(call, calls=2, device=device)
        other_ms = result[f"{name}_profile"]["kernel_ms_per_call"]["other"]
        result[f"{name}_other_s_per_step"] = round(other_ms * calls_per_step / 1e3, 3)
    if device.type == "cuda":
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_profile")}, indent=1), flush=True)


if __name__ == "__main__":
    main()
