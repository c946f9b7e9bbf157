"""Attention in the denoising step against the probe's rate, and the planner's step against the
measured one (issue 27, parts 1-3). One process, Nano-size random bf16 weights.

For each shape (--shapes, default 720p x 189f and 480p x 93f):
1. The step all resident with the run's kernels (the probe's attention, fused kernels): step 0
   warms up (compiles), step 1 is timed and profiled (bench_profile.profile_step): attention, GEMM
   and other kernel seconds, hence the in-step TFLOP/s. The q/k/v the step hands to attention are
   captured (shapes, strides, contiguity; the tensors of one call kept), the GPU's SM clock and
   power sampled (NVML) while it runs.
2. With --eager-join, at the first shape, the same step with the K/V join's two cats eager (the compiled join's cost).
3. Attention alone: on the captured step tensors, on contiguous copies of them, on [1, heads,
   tokens, head_dim]-contiguous copies, on fresh random tensors of the same shape, without the
   prompt's keys, at the probe's 32k x 32k, each on the kernels SDPA may pick; then one step's worth
   of back-to-back calls (is the rate sustained?) and the kernel names cuDNN runs at each shape.
4. The planner's predicted step for the same plan, from the probe at 32k and at the step's shape.
Then (--cap) the planner's plan for the first shape under that cap, timed and predicted at each shape.

Writes benchmarks/results/attention-step-<gpu>-<date>.json (bench_common.ResultsFile). On a CPU
(--device cpu --model tiny --shapes 256x9) it runs the same logic at toy sizes, to check the script.

Example: python benchmarks/check_attention_step.py --shapes 480x93 720x189 --cap 8
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

import argparse
import contextlib
import dataclasses
import gc
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import PROMPT, ResultsFile, gib, set_cap
from bench_profile import profile_step
from torch.nn.attention import SDPBackend, sdpa_kernel

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.device_profile import device_setup, probe_shape
from cosmos3_offload.app.feasibility import request_of
from cosmos3_offload.kernels.attention import ATTENTION_BACKENDS
from cosmos3_offload.kernels.choice import Kernels
from cosmos3_offload.kernels.probe import cuda_event_seconds, kernel_rates
from cosmos3_offload.loading.components import load_components, model_configs
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.planning.request import DeviceProfile
from cosmos3_offload.planning.search import choose_plan
from cosmos3_offload.planning.timing import ELEMENTWISE_GBps, elementwise_bytes_per_token, times
from cosmos3_offload.split import fused_layer
from cosmos3_offload.units import GIB


@dataclasses.dataclass
class Setup:
    kernels: Kernels
    profile: DeviceProfile
    transformer_config: dict
    real_profiles: dict = dataclasses.field(default_factory=dict)  # (tier, frames) -> profile probed there


class _Stop(Exception):
    """Raised after the last timed step: the decode is not part of this check."""


class Clocks:
    """SM clock (MHz), power (W) and throttle reasons sampled every 10 ms by NVML while a section runs."""

    REASONS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "power_brake"}

    def __init__(self, device: torch.device):
        self.nvml = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception as error:  # no NVML: the rest of the check still runs
            print(f"no clock samples: {type(error).__name__}: {error}", flush=True)
            self.nvml = None

    @contextlib.contextmanager
    def section(self, into: dict, name: str):
        if self.nvml is None:
            yield
            return
        samples: list[tuple[int, float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            nvml = self.nvml
            while not stop.is_set():
                try:
                    clock = nvml.nvmlDeviceGetClockInfo(self.handle, nvml.NVML_CLOCK_SM)
                    power = nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000
                    reasons = nvml.nvmlDeviceGetCurrentClocksThrottleReasons(self.handle)
                    samples.append((clock, power, reasons))
                except Exception:
                    pass
                time.sleep(0.01)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            if samples:
                clocks = sorted(s[0] for s in samples)
                seen = 0
                for s in samples:
                    seen |= s[2]
                into[name] = {
                    "samples": len(samples),
                    "sm_mhz_min": clocks[0],
                    "sm_mhz_median": statistics.median(clocks),
                    "sm_mhz_max": clocks[-1],
                    "power_w_median": round(statistics.median(s[1] for s in samples), 1),
                    "power_w_max": round(max(s[1] for s in samples), 1),
                    "throttle_reasons": [n for bit, n in self.REASONS.items() if seen & bit],
                }


class CapturingAttention:
    """The run's attention, recording every generator (non-causal) call's shapes and (`keep`) keeping
    the tensors of the first one as the step handed them over."""

    def __init__(self, kernels: Kernels, *, keep: bool):
        self.kernels = kernels
        self.keep = keep  # False under a cap: held tensors would add to the peak being measured
        self.first: tuple[torch.Tensor, ...] | None = None
        self.shapes: dict[str, int] = {}

    def __call__(self, q, k, v, *, causal):
        if not causal:
            key = f"{q.shape[0]}x{k.shape[0]}"
            self.shapes[key] = self.shapes.get(key, 0) + 1
            if self.keep and self.first is None:
                self.first = (q, k, v)
        return self.kernels.attention(q, k, v, causal=causal)

    def as_kernels(self) -> Kernels:
        return dataclasses.replace(self.kernels, attention=self)


def describe(t: torch.Tensor) -> dict:
    return {
        "shape": list(t.shape),
        "stride": list(t.stride()),
        "contiguous": t.is_contiguous(),
        "storage_offset": t.storage_offset(),
        "ptr_mod_256": t.data_ptr() % 256,
        "storage_elements": t.untyped_storage().nbytes() // t.element_size(),
    }


def config_for(tier: int, frames: int, steps: int) -> GenerationConfig:
    return GenerationConfig(prompt=PROMPT, frames=frames, resolution=tier, steps=steps, output=Path("/tmp/check.mp4"))


def seconds_of(fn, device) -> float:
    if device.type == "cuda":
        return cuda_event_seconds("check", fn, warmup=2, repeats=5)
    fn()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def per_call_seconds(fn, calls: int, device) -> list[float]:
    """Seconds of each of `calls` back-to-back calls (one step's worth of attention, with no gaps)."""
    if device.type != "cuda":
        return [seconds_of(fn, device)]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1000 for start, end in events]


def kernel_names(fn, device) -> dict[str, float]:
    """The device kernels one call of `fn` runs, with their milliseconds."""
    if device.type != "cuda":
        return {}
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        fn()
        torch.cuda.synchronize()
    return {
        e.name[:140]: round((e.time_range.end - e.time_range.start) / 1000, 3)
        for e in profiler.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    }


def bhsd(x: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, head_dim] -> [1, heads, tokens, head_dim], contiguous in that order."""
    return x.permute(1, 0, 2).unsqueeze(0).contiguous()


def attention_alone(captured, device, names: list[str], sustain_calls: int, clocks: Clocks) -> dict:
    """Attention on the step's own tensors and on variants of them (see the module docstring)."""
    q, k, v = captured
    flop = 4 * q.shape[0] * k.shape[0] * q.shape[1] * q.shape[2]
    prompt = k.shape[0] - q.shape[0]
    out: dict = {"q": describe(q), "k": describe(k), "v": describe(v), "prompt_tokens": prompt, "GFLOP": flop / 1e9}
    out["k_v_share_storage"] = k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    out["out"] = describe(ATTENTION_BACKENDS[names[0]].run(q, k, v, causal=False))  # flattened next: a view or a copy
    generator = torch.Generator(device).manual_seed(3)

    def randn_like(x):
        return torch.randn(x.shape, generator=generator, device=device).to(x.dtype)

    contiguous = tuple(x.contiguous() if not x.is_contiguous() else x.clone() for x in (q, k, v))
    fresh = tuple(randn_like(x) for x in (q, k, v))
    bq, bk, bv = (bhsd(x) for x in (q, k, v))
    side = 32768 if device.type == "cuda" else 256
    square = (randn_like(q.new_empty(side, *q.shape[1:])), *(randn_like(k.new_empty(side, *k.shape[1:])),) * 2)
    rates: dict[str, dict] = {}
    for name in names:
        run = ATTENTION_BACKENDS[name].run
        variants = {
            "step_tensors": (lambda run=run: run(q, k, v, causal=False), flop),
            "contiguous_copies": (lambda run=run: run(*contiguous, causal=False), flop),
            "fresh_random": (lambda run=run: run(*fresh, causal=False), flop),
            "no_prompt_keys": (
                lambda run=run: run(q, k[prompt:], v[prompt:], causal=False),
                flop * q.shape[0] / k.shape[0],
            ),
            "probe_32k": (lambda run=run: run(*square, causal=False), 4 * side * side * q.shape[1] * q.shape[2]),
        }
        if name in ("cudnn", "flash", "efficient"):
            backend = {
                "cudnn": SDPBackend.CUDNN_ATTENTION,
                "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION,
            }[name]

            def bhsd_run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(bq, bk, bv, enable_gqa=True)

            variants["bhsd_contiguous"] = (bhsd_run, flop)
        rates[name] = {}
        for variant, (fn, count) in variants.items():
            try:
                seconds = seconds_of(fn, device)
                rates[name][variant] = round(count / seconds / 1e12, 1)
            except Exception as error:
                rates[name][variant] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    out["TFLOPs"] = rates
    best = names[0]
    run = ATTENTION_BACKENDS[best].run
    with clocks.section(out, "clocks_sustained"):
        calls = per_call_seconds(lambda: run(q, k, v, causal=False), sustain_calls, device)
    out["sustained"] = {
        "calls": len(calls),
        "first3_TFLOPs": round(flop / statistics.median(calls[:3]) / 1e12, 1),
        "last10_TFLOPs": round(flop / statistics.median(calls[-10:]) / 1e12, 1),
        "median_TFLOPs": round(flop / statistics.median(calls) / 1e12, 1),
        "ms": [round(c * 1000, 2) for c in calls[:: max(1, len(calls) // 24)]],
    }
    out["kernels_step_shape"] = kernel_names(lambda: run(q, k, v, causal=False), device)
    out["kernels_32k"] = kernel_names(lambda: run(*square, causal=False), device)
    out["kernels_bhsd"] = kernel_names(lambda: F.scaled_dot_product_attention(bq, bk, bv, enable_gqa=True), device)
    return out


def linear_rates(device: torch.device, tokens: int, width: int, out: int) -> dict:
    """bf16 GEMM and FP8 W8A8 linear (rowwise scales, activations quantized in the call) TFLOP/s at
    [tokens, width] x [width, out], and `torch._scaled_mm` alone."""
    from cosmos3_offload.quant import fp8

    if device.type != "cuda":
        return {}
    generator = torch.Generator(device).manual_seed(5)
    x = torch.randn(tokens, width, generator=generator, device=device).to(torch.bfloat16)
    weight = torch.randn(out, width, generator=generator, device=device).to(torch.bfloat16)
    flop = 2 * tokens * width * out
    result = {
        "shape": [tokens, width, out],
        "bf16": round(flop / seconds_of(lambda: F.linear(x, weight), device) / 1e12, 1),
    }
    try:
        scale = fp8.weight_scales(weight, per_channel=True)
        stored = fp8.quantize(weight, scale)
        result["fp8_w8a8_linear"] = round(
            flop / seconds_of(lambda: fp8.w8a8_linear(x, stored, scale, None, None), device) / 1e12, 1
        )
        quantized, row_scale = fp8.quantize_activations(x, None)
        result["fp8_scaled_mm_alone"] = round(
            flop / seconds_of(lambda: fp8._scaled_matmul(quantized, stored, row_scale, scale, x.dtype), device) / 1e12,
            1,
        )
        result["fp8_quantize_ms"] = round(seconds_of(lambda: fp8.quantize_activations(x, None), device) * 1000, 3)
    except Exception as error:
        result["fp8_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return result


def eager_join(key_norm, memory_key, memory_value, key, value, cos, sin):
    """The K/V join with the new keys normed and rotated by the fused kernel, the two cats eager."""
    key = fused_layer.norm_rotary(key_norm, key, cos, sin)
    return torch.cat([memory_key, key]), torch.cat([memory_value, value])


def predicted(plan: Plan, sizes, config, profile) -> dict:
    request = request_of(config)
    t = times(plan, sizes, request, profile)
    layers, branches = sizes.layers, request.branches
    linear = 2 * request.tokens * sizes.layer_matmul_params * layers * branches
    attention = 4 * request.tokens * (request.tokens + request.prompt_tokens) * sizes.heads * sizes.head_dim
    attention *= layers * branches
    elementwise = request.tokens * elementwise_bytes_per_token(sizes) * layers * branches
    return {
        "step_s": round(t.step, 4),
        "linear_s": round(linear / profile.linear_TFLOPs / 1e12, 4),
        "attention_s": round(attention / profile.attention_TFLOPs / 1e12, 4),
        "elementwise_s": round(elementwise / ELEMENTWISE_GBps / 1e9, 4),
        "elementwise_GB": round(elementwise / 1e9, 2),
        "linear_PFLOP": round(linear / 1e15, 4),
        "attention_PFLOP": round(attention / 1e15, 4),
        "linear_TFLOPs": profile.linear_TFLOPs,
        "attention_TFLOPs": profile.attention_TFLOPs,
        "profile": profile.source,
        "request_tokens": request.tokens,
        "request_prompt_tokens": request.prompt_tokens,
    }


def in_step_rates(profile: dict, attention_flop: float, linear_flop: float) -> dict:
    seconds = profile["kernel_s"]
    return {
        "attention_TFLOPs": round(attention_flop / max(seconds["attention"], 1e-9) / 1e12, 1),
        "gemm_TFLOPs": round(linear_flop / max(seconds["gemm"], 1e-9) / 1e12, 1),
    }


def step_flop(sizes, tokens: int, shapes: dict[str, int]) -> tuple[float, float]:
    """(attention FLOP, GEMM FLOP) of one step from the captured call shapes (per layer call)."""
    heads, head_dim = sizes.heads, sizes.head_dim
    attention = 0.0
    for key, count in shapes.items():
        q, kv = (int(x) for x in key.split("x"))
        attention += count * 4 * q * kv * heads * head_dim
    calls = sum(shapes.values())
    linear = 2 * tokens * sizes.layer_matmul_params * calls
    return attention, linear


def run_shape(args, components, sizes, plan: Plan, tier: int, frames: int, setup, clocks, results, label: str):
    device = args.device
    config = config_for(tier, frames, 2)
    kernels = dataclasses.replace(setup.kernels, fused=True)
    capture = CapturingAttention(kernels, keep=label == "resident")
    run: dict = {"name": f"{label}-{tier}p-{frames}f", "plan": plan.describe() if plan else "resident"}
    if device.type == "cuda":
        torch.cuda.synchronize()  # not bench_common.reset_device: that lifts the cap of the capped runs
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with clocks.section(run, "clocks_steps"):  # step 0 warms up (compiles), step 1 is profiled and timed
        run["profile"] = profile_step(components, tier, frames, device, capture.as_kernels())
    run["step_s"] = run["profile"]["step_wall_s"]
    run["peak_gib"] = gib(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None
    run["attention_calls"] = {k: v // 2 for k, v in capture.shapes.items()}  # per step
    request = request_of(config)
    attention_flop, linear_flop = step_flop(sizes, request.tokens, run["attention_calls"])
    run["attention_PFLOP_per_step"] = round(attention_flop / 1e15, 4)
    run["in_step"] = in_step_rates(run["profile"], attention_flop, linear_flop)
    run["predicted_32k_probe"] = predicted(plan or Plan(), sizes, config, setup.profile)
    if label == "resident" and device.type == "cuda":  # the probe at this request's shape, as a run now probes
        started = time.perf_counter()
        rates = kernel_rates(device, probe_shape(setup.transformer_config, request), folder=args.cache)
        run["probe_real_seconds"] = round(time.perf_counter() - started, 2)
        run["probe_real"] = rates.to_json()
        setup.real_profiles[(tier, frames)] = dataclasses.replace(
            setup.profile,
            attention_TFLOPs=rates.measured.attention_TFLOPs.get(
                setup.kernels.attention_name, setup.profile.attention_TFLOPs
            ),
            linear_TFLOPs=rates.measured.linear_TFLOPs,
        )
    if (tier, frames) in setup.real_profiles:
        run["predicted_real_probe"] = predicted(plan or Plan(), sizes, config, setup.real_profiles[(tier, frames)])
        error = run["predicted_real_probe"]["step_s"] / run["step_s"] - 1
        run["prediction_error"] = round(error, 4)  # the planner's step (probed at this shape) over the measured one
        run["prediction_within_5pct"] = abs(error) <= 0.05
    if capture.first is not None and label == "resident":
        names = [setup.kernels.attention_name] + [
            n for n in ("cudnn", "flash", "efficient") if n != setup.kernels.attention_name
        ]
        if device.type != "cuda":
            names = ["sdpa"]
        calls = sum(run["attention_calls"].values())
        run["alone"] = attention_alone(capture.first, device, names, max(calls, 3), clocks)
        if args.eager_join and tier == args.shapes[0][0] and device.type == "cuda":
            original = fused_layer.join_memory
            fused_layer.join_memory = eager_join
            try:
                eager = profile_step(components, tier, frames, device, kernels)
                run["eager_join"] = {"step_s": eager["step_wall_s"], "profile": eager}
            finally:
                fused_layer.join_memory = original
    capture.first = None
    results.add(run)


def parse_shape(text: str) -> tuple[int, int]:
    tier, frames = (int(part) for part in text.split("x"))
    return tier, frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano")
    parser.add_argument("--device", type=torch.device, default=torch.device("cuda"))
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(720, 189), (480, 93)])
    parser.add_argument("--cap", type=float, default=8.0, help="GiB for the capped part (0: skip it)")
    parser.add_argument("--eager-join", action="store_true", help="also profile the last shape with eager K/V cats")
    parser.add_argument("--cache", type=Path, default=None, help="probe cache folder (default: a new empty one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.cache = args.cache or Path(tempfile.mkdtemp(prefix="kernel-rates-"))
    device = args.device
    results = ResultsFile(args.out, "attention-step", model=args.model)
    clocks = Clocks(device)
    transformer_config, vae_config = model_configs(None, args.model)
    shape = probe_shape(transformer_config)
    if device.type != "cuda":
        shape = dataclasses.replace(shape, queries=256, keys=256, gemm_tokens=64)
    started = time.perf_counter()
    chosen = device_setup(device, attention="auto", shape=shape, dtype=torch.bfloat16, folder=args.cache)
    results.data["probe_32k"] = None if chosen.rates is None else chosen.rates.to_json()
    results.data["probe_seconds"] = round(time.perf_counter() - started, 2)
    results.data["profile"] = chosen.profile.source
    kernels = chosen.kernels
    if kernels.attention is None:  # a CPU: diffusers' dispatcher; check the capture path with SDPA
        kernels = Kernels(attention=ATTENTION_BACKENDS["sdpa"].run, attention_name="sdpa")
    results.data["attention"] = kernels.attention_name
    setup = Setup(kernels=kernels, profile=chosen.profile, transformer_config=transformer_config)
    sizes = model_sizes(transformer_config, vae_config, dtype_bytes=2)
    tokens = request_of(config_for(*args.shapes[0], 2)).tokens
    results.data["linear"] = linear_rates(device, tokens, sizes.hidden, sizes.intermediate)
    results.data["linear_down"] = linear_rates(device, tokens, sizes.intermediate, sizes.hidden)
    print(results.data["linear"], results.data["linear_down"], flush=True)
    components = load_components(None, device, torch.bfloat16, random_model=args.model)
    for tier, frames in args.shapes:
        run_shape(args, components, sizes, None, tier, frames, setup, clocks, results, "resident")
    del components
    gc.collect()
    if args.cap > 0:
        tier, frames = args.shapes[0]
        profile = setup.real_profiles.get((tier, frames), setup.profile)  # as a run plans now
        choice = choose_plan(sizes, request_of(config_for(tier, frames, 2)), int(args.cap * GIB), profile)
        components = load_components(None, device, torch.bfloat16, choice.plan, random_model=args.model)
        for tier, frames in args.shapes:
            if device.type == "cuda":
                set_cap(args.cap)
            try:
                run_shape(
                    args, components, sizes, choice.plan, tier, frames, setup, clocks, results, f"cap{args.cap:g}"
                )
            finally:
                if device.type == "cuda":
                    set_cap(None)
    summary(results.data)
    print(f"wrote {results.path}")


def summary(data: dict) -> None:
    """The short table last: measured step, predicted (probe at 32k, probe at the step's shape), in-step
    attention rate against the probe's for the same implementation."""
    name = data.get("attention")
    at_32k = ((data.get("probe_32k") or {}).get("measured") or {}).get("attention_TFLOPs", {}).get(name)
    print(f"attention {name}; probe at 32k x 32k: {at_32k} TFLOP/s")
    print(
        f"{'run':<22}{'step s':>8}{'pred@32k':>10}{'pred@real':>10}{'error':>8}{'attn in step':>14}{'probe@real':>12}"
    )
    for run in data["runs"]:
        real = (run.get("probe_real") or {}).get("measured", {}).get("attention_TFLOPs", {}).get(name)
        print(
            f"{run['name']:<22}{run['step_s']:>8.3f}{run['predicted_32k_probe']['step_s']:>10.3f}"
            f"{run.get('predicted_real_probe', {}).get('step_s', float('nan')):>10.3f}"
            f"{run.get('prediction_error', float('nan')):>8.3f}{run['in_step']['attention_TFLOPs']:>14.1f}"
            f"{real if real is None else round(real, 1)!s:>12}"
        )


if __name__ == "__main__":
    main()
