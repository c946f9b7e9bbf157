"""FP8 linear microbenchmark (issue 11): one Nano generator layer's linears at a 720p x 189f token
count, bf16 against W8A16 and W8A8 (static per-tensor input scale, and dynamic per row), on the
running GPU; plus the W8A8 GEMM checked against its emulation (same rounded operands, bf16 GEMM).

Example: python benchmarks/bench_fp8_linear.py --tokens 44160
Results: benchmarks/results/fp8-linear-<gpu>-<date>.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import ResultsFile, timed_ms

from cosmos3_offload.quant.fp8 import FP8_MAX, dequantize, quantize, w8a8_linear, w8a16_linear, weight_scales

HIDDEN, INTERMEDIATE, KV = 4096, 12288, 8 * 128  # Nano
SHAPES = {  # name: (out, in)
    "add_q_proj": (HIDDEN, HIDDEN),
    "add_k_proj": (KV, HIDDEN),
    "to_add_out": (HIDDEN, HIDDEN),
    "gate_proj": (INTERMEDIATE, HIDDEN),
    "down_proj": (HIDDEN, INTERMEDIATE),
}


def measure(name: str, out_features: int, in_features: int, tokens: int) -> dict:
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)
    weight = torch.randn(out_features, in_features, device=device, generator=generator) / in_features**0.5
    x = torch.randn(tokens, in_features, device=device, generator=generator).bfloat16()
    weight_bf16 = weight.bfloat16()
    scale = weight_scales(weight, per_channel=False)
    stored = quantize(weight, scale)
    input_scale = (x.abs().amax().float() / FP8_MAX).reshape(())
    flops = 2 * tokens * in_features * out_features
    run = {"linear": name, "out": out_features, "in": in_features, "tokens": tokens}
    cases = {
        "bf16": lambda: F.linear(x, weight_bf16),
        "w8a16": lambda: w8a16_linear(x, stored, scale, None),
        "w8a8_static": lambda: w8a8_linear(x, stored, scale, input_scale, None),
        "w8a8_dynamic": lambda: w8a8_linear(x, stored, scale, None, None),
    }
    for case, fn in cases.items():
        ms = timed_ms(fn, 10, torch.device("cuda"))
        run[f"{case}_ms"] = round(ms, 3)
        run[f"{case}_tflops"] = round(flops / ms / 1e9, 1)
    rounded = (x.float() / input_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    emulated = F.linear(rounded.bfloat16() * input_scale.bfloat16(), dequantize(stored, scale, torch.bfloat16))
    real = w8a8_linear(x, stored, scale, input_scale, None)
    reference = F.linear(x.float(), weight)
    run["w8a8_vs_emulated_rel"] = float((real.float() - emulated.float()).norm() / emulated.float().norm())
    for case, out in {"w8a16": w8a16_linear(x, stored, scale, None), "w8a8_static": real}.items():
        run[f"{case}_cosine"] = float(F.cosine_similarity(out.float().flatten(), reference.flatten(), dim=0))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=44160)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    results = ResultsFile(args.results, "fp8-linear", tokens=args.tokens)
    for name, (out_features, in_features) in SHAPES.items():
        results.add(measure(name, out_features, in_features, args.tokens))


if __name__ == "__main__":
    main()
