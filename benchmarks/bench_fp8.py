"""FP8 benchmark (issue 11): FP8 linears against bf16 in step time, device memory and accuracy, and
the load of an FP8 checkpoint in the published (ModelOpt) layout.

Parts (`--parts`, run in the order given; every result is written as it comes, so a call cut short
keeps what it measured):

- `steps`: per-step time of one generation per shape (median of the steps after the first), peak
  allocated device memory of prefill and denoise, and the planner's prediction of both: bf16 all
  resident (the baseline), FP8 W8A8 all resident (`--quantize fp8`: random weights quantized as
  they load, per-channel weight scales, dynamic per-row activation scales), and FP8 W8A8 under
  each `--caps` cap with the plan the planner picks for it. At the first shape, FP8 also runs the
  default mode (`auto`: the step policy, W8A16 for the first and last 3 steps, so W8A16 throughout
  for 3 steps) on the same load. The decode is skipped (the VAE is bf16 either way): each
  generation stops after its last step.
- `layers`: each generator linear of layer 0 at the model's real shapes, random bf16 weights
  scaled like the loader's, inputs as the layer sees them (RMS-normed activations with a few
  outlier channels; the down projection gets SiLU(gate) * up of them): cosine similarity and
  relative error of W8A16, W8A8 with a static per-tensor input scale (calibrated amax / 448 on
  other samples of the same kind) and W8A8 with dynamic per-row scales, against bf16 `F.linear`,
  for per-channel and per-tensor weight scales.
- `checkpoint`: writes the model in the published FP8 layout unless `--folder` exists (random
  weights made on the device, FP8 with per-tensor weight scales and a static input scale, shards
  written from several threads; the rest as bench_load.py writes it), then loads it all streamed
  (twice: the second load is the warm one) and with the planner's plan for `--checkpoint-cap`, and
  runs `--checkpoint-steps` steps of `--checkpoint-shape` under that cap.

Random weights of the `--model` size (seeded), bf16 activations, full-size Wan2.2 VAE.
Results: benchmarks/results/fp8[-TAG]-<gpu>-<date>.json (`--out`, `--tag`).

Examples (the GPU runs as two calls of under 10 minutes, then a CPU smoke test):
    python benchmarks/bench_fp8.py --parts steps --shapes 720x189 --steps 3 --caps 8 4 --tag 720
    python benchmarks/bench_fp8.py --parts layers,checkpoint,steps --shapes 480x93 --caps 8 4 --tag rest
    python benchmarks/bench_fp8.py --model tiny --device cpu --shapes 256x5 --steps 2 --checkpoint-shape 256x5
"""

from __future__ import annotations

import os

# Fewer, growable segments: less fragmentation under a memory cap (set before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import gc
import json
import math
import shutil
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import bench_load
import torch
import torch.nn.functional as F
from bench_common import PROMPT, HostPeakSampler, ResultsFile, gib, measure_pinned_h2d, reset_device, set_cap
from bench_staging import parse_shape
from bench_streaming import measured_vs_predicted, request_for
from diffusers import Cosmos3OmniTransformer
from diffusers.pipelines.cosmos.mixed_precision import FIRST_LAST_N_FP8_POLICY

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import InputError, first_line
from cosmos3_offload.loading import random_weights
from cosmos3_offload.loading.components import load_components, model_configs
from cosmos3_offload.loading.quantization import NO_FP8_FLAGS, Fp8Options, quantization_for
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model import specs
from cosmos3_offload.model.groups import GENERATOR
from cosmos3_offload.model.quantized import is_quantized_linear
from cosmos3_offload.offload.materialize import build_on_meta, keep_fp32_dtype
from cosmos3_offload.planning.plan import GroupPlan, Mode, Plan
from cosmos3_offload.planning.request import DeviceProfile
from cosmos3_offload.planning.search import choose_plan, least_budget, predict
from cosmos3_offload.planning.sizes import ModelSizes
from cosmos3_offload.planning.timing import streamed_bytes
from cosmos3_offload.quant.fp8 import FP8_MAX, has_fp8_matmul, quantize, w8a8_linear, w8a16_linear, weight_scales
from cosmos3_offload.quant.policy import step_schedule
from cosmos3_offload.request.spec import request_defaults
from cosmos3_offload.units import GIB

PARTS = ("steps", "layers", "checkpoint")
W8A8 = Fp8Options(quantize="fp8", mode="w8a8")
POLICY_MODE = "auto"  # what runs without --fp8-mode
ALL_STREAMED = Plan(reasoner=GroupPlan(mode=Mode.STREAMED), generator=GroupPlan(mode=Mode.STREAMED))
# The generator's linears of one decoder layer (model/quantized.py): what W8A8 steps run through.
LAYER_LINEARS = (
    "self_attn.add_q_proj",
    "self_attn.add_k_proj",
    "self_attn.add_v_proj",
    "self_attn.to_add_out",
    "mlp_moe_gen.gate_proj",
    "mlp_moe_gen.up_proj",
    "mlp_moe_gen.down_proj",
)
TARGETS = {"W8A16": 0.999, "W8A8": 0.995}  # cosine similarity against bf16 (issue 11)
OUTLIER_CHANNELS = 8  # of a layer's input features: a few channels far above the rest, as after RMSNorm
OUTLIER_GAIN = (10.0, 50.0)
CALIBRATION_TOKENS = 2048
WRITERS = 4  # shard files written at once
QUANTIZATION_CONFIG = {
    "quant_method": "modelopt",
    "quant_algo": "FP8",
    "runtime": {"diffusion_step_policy": FIRST_LAST_N_FP8_POLICY},
}


@dataclass
class Bench:
    """What every part needs: the flags, the device, the results file and the planner's device profile."""

    args: argparse.Namespace
    device: torch.device
    results: ResultsFile
    profile: DeviceProfile

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            reset_device()


# --- steps ---------------------------------------------------------------------------------------


class _LastStepDone(Exception):
    """Raised after the last denoising step: the benchmark skips the decode."""


@dataclass
class StepTimer(PhaseTimer):
    """A PhaseTimer that also notes when each phase's body starts (a stopped phase records nothing)."""

    started: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        with super().phase(name):
            self.started[name] = time.perf_counter()
            yield


def load(bench: Bench, plan: Plan, fp8: Fp8Options = NO_FP8_FLAGS, checkpoint: Path | None = None):
    """Load the model with `plan`; returns the components and what the load cost."""
    bench.free()
    with HostPeakSampler() as host:
        start = time.perf_counter()
        components = load_components(
            checkpoint, bench.device, torch.bfloat16, plan, random_model=bench.args.model, fp8=fp8
        )
        bench.sync()
        seconds = time.perf_counter() - start
    quantization = components.quantization
    scales = None if not quantization.on_load else "per-channel" if quantization.per_channel else "per-tensor"
    return components, {
        "model": bench.args.model if checkpoint is None else str(checkpoint),
        "weights": quantization.kind if quantization.quantized else "bf16",  # "load": --quantize fp8
        "weight_scales": scales,
        "plan": plan.describe(),
        "load_s": round(seconds, 2),
        "host_peak_private_gib": host.peak_gib,
        "pinned_gib": gib(components.engine.pinned_bytes),
        "device_after_load_gib": gib(torch.cuda.memory_allocated()) if bench.cuda else None,
    }


def measure(bench: Bench, components, shape: tuple[int, int], steps: int, cap_gib: float | None) -> dict:
    """Prefill and `steps` denoising steps (no decode) under `cap_gib`: per-step times and peaks."""
    tier, frames = shape
    if bench.cuda:
        set_cap(cap_gib)
    config = GenerationConfig(
        prompt=PROMPT, frames=frames, resolution=tier, steps=steps, output=Path("/tmp/cosmos3-bench-fp8.mp4")
    )
    timer, stamps = StepTimer(bench.device), []

    def on_step(index: int) -> None:
        bench.sync()  # benchmark only: make each step's wall time real
        stamps.append(time.perf_counter())
        if index == steps - 1:
            raise _LastStepDone

    run = {"height": config.height, "width": config.width, "frames": frames, "steps": steps, "cap_gib": cap_gib}
    run["cap_enforced"] = bench.cuda or cap_gib is None  # a CPU run has no device memory to cap
    failed = None
    try:
        generate_video(config, components, timer, progress=False, on_step=on_step)
    except _LastStepDone:
        pass
    except torch.OutOfMemoryError as error:
        done = [p.name for p in timer.phases]
        failed = f"out of memory after {done} and {len(stamps)} steps: {str(error).splitlines()[0]}"
    if failed:
        bench.free()  # outside the except block, whose traceback held the run's tensors
        return {**run, "error": failed}
    # The timer reset the peak when the denoise began, so this is the denoise's peak.
    denoise_peak = torch.cuda.max_memory_allocated() if bench.cuda else None
    reserved_peak = torch.cuda.max_memory_reserved() if bench.cuda else None
    bench.free()
    prefill = next(p for p in timer.phases if p.name == "prefill")
    seconds = [stamps[0] - timer.started["denoise"]] + [b - a for a, b in zip(stamps, stamps[1:])]
    peaks = [p for p in (prefill.device_peak_bytes, denoise_peak) if p is not None]
    return {
        **run,
        "prefill_s": round(prefill.seconds, 3),
        "step_s": [round(s, 3) for s in seconds],
        "prefill_peak_allocated_gib": gib(prefill.device_peak_bytes),
        "denoise_peak_allocated_gib": gib(denoise_peak),
        "denoise_peak_reserved_gib": gib(reserved_peak),
        "peak_allocated_no_decode_gib": gib(max(peaks)) if peaks else None,
        "fp8": components.switches.describe() if components.quantization.quantized else None,
        "error": None,
    }


def record(bench: Bench, name: str, loaded, shape, cap: float | None, prediction, sizes: ModelSizes, steps: int):
    """Measure one run on a loaded model and add it, with the planner's prediction beside it."""
    components, info = loaded
    print(f"-- {name}: {info['plan']}", flush=True)
    try:
        run = measure(bench, components, shape, steps, cap)
    except Exception as error:  # one failed run must not cost the call's other measurements
        traceback.print_exc()
        run = {"cap_gib": cap, "error": f"{type(error).__name__}: {first_line(error)}"}
    bench.free()  # after the except block: its traceback held the failed run's tensors
    extra = measured_vs_predicted(run, prediction)
    moved = streamed_bytes(components.plan, sizes, GENERATOR)  # one denoising step's copies
    if moved and run["error"] is None:
        extra["streamed_GiB_per_step"] = gib(moved)
        extra["streamed_GBps_over_step"] = round(moved / extra["step_s_median_rest"] / 1e9, 2)
    bench.results.add({"name": name, **info, **run, **extra})


def set_mode(bench: Bench, components, mode: str) -> None:
    """Run the loaded FP8 model in another `--fp8-mode` (the schedule is read at every request)."""
    fp8_cores = has_fp8_matmul(bench.device)
    components.schedule = step_schedule(mode, components.quantization.policy, fp8_cores=fp8_cores)


def run_modes(bench: Bench, loaded, prefix: str, label: str, shape, cap, prediction, sizes, *, policy: bool) -> None:
    """`prefix` (the mode loaded) at `shape`; with `policy`, the default FP8 mode next on the same load."""
    tier, frames = shape
    record(bench, f"{prefix}-{label}-{tier}p-{frames}f", loaded, shape, cap, prediction, sizes, bench.args.steps)
    if policy:
        set_mode(bench, loaded[0], POLICY_MODE)
        name = f"fp8-{POLICY_MODE}-{label}-{tier}p-{frames}f"
        record(bench, name, loaded, shape, cap, prediction, sizes, bench.args.steps)
        set_mode(bench, loaded[0], W8A8.mode)


@dataclass
class LoadCache:
    """The last load, reused while consecutive runs ask for the same plan and FP8 flags."""

    key: tuple | None = None
    loaded: tuple | None = None

    def get(self, bench: Bench, plan: Plan, fp8: Fp8Options):
        if self.key != (plan, fp8):
            self.clear(bench)
            print(f"-- loading {plan.describe()}", flush=True)
            self.loaded, self.key = load(bench, plan, fp8), (plan, fp8)
        return self.loaded

    def clear(self, bench: Bench) -> None:
        self.key = self.loaded = None
        bench.free()


def plan_for_cap(bench: Bench, sizes: ModelSizes, request, cap: float, name: str, *, mapped: bool = False):
    """(choice, cap, label) of the planner for `cap`; where it refuses, the refusal is recorded under
    `name` and the least budget it takes (rounded up to 0.1 GiB) is used instead."""
    try:
        return choose_plan(sizes, request, int(cap * GIB), bench.profile, mapped=mapped), cap, f"cap{cap:g}"
    except InputError as error:
        bench.results.add({"name": name, "cap_gib": cap, "error": f"planner refused: {error}"})
    least = math.ceil(least_budget(sizes, request, bench.profile) / GIB * 10) / 10
    choice = choose_plan(sizes, request, int(least * GIB), bench.profile, mapped=mapped)
    return choice, least, f"cap{least:g}-least"


def part_steps(bench: Bench) -> None:
    """bf16 and FP8 W8A8 all resident at every shape, then FP8 under each cap (shapes outermost)."""
    args = bench.args
    spec = specs.model_spec(args.model)
    bf16_sizes = model_sizes(spec.transformer, spec.vae)
    fp8_sizes = model_sizes(spec.transformer, spec.vae, quantization=quantization_for(None, spec.transformer, W8A8))
    for prefix, fp8, sizes in (("bf16", NO_FP8_FLAGS, bf16_sizes), ("fp8-w8a8", W8A8, fp8_sizes)):
        print(f"-- loading {prefix} all resident", flush=True)
        loaded = load(bench, Plan(), fp8)
        for index, shape in enumerate(args.shapes):
            prediction = predict(Plan(), sizes, request_for(*shape, request_defaults()["steps"]), bench.profile)
            policy = args.policy and fp8.quantize is not None and index == 0
            run_modes(bench, loaded, prefix, "resident", shape, None, prediction, sizes, policy=policy)
        del loaded
        bench.free()
    cache = LoadCache()
    for index, (tier, frames) in enumerate(args.shapes):
        request = request_for(tier, frames, request_defaults()["steps"])  # the plan the CLI picks for a default request
        for asked in args.caps:
            name = f"fp8-w8a8-cap{asked:g}-{tier}p-{frames}f"
            choice, cap, label = plan_for_cap(bench, fp8_sizes, request, asked, name)
            loaded = cache.get(bench, choice.plan, W8A8)
            shape, prediction, policy = (tier, frames), choice.prediction, args.policy and index == 0
            run_modes(bench, loaded, "fp8-w8a8", label, shape, cap, prediction, fp8_sizes, policy=policy)
            del loaded
    cache.clear(bench)


# --- layers --------------------------------------------------------------------------------------


def random_weight(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """float32 normal values with std 1/sqrt(fan_in), as the loader's random weights."""
    values = torch.randn(out_features, in_features, generator=generator, device=generator.device)
    return values.div_(in_features**0.5)


def outlier_gains(features: int, generator: torch.Generator) -> torch.Tensor:
    """A [features] gain: ones, and a few channels OUTLIER_GAIN times larger (fixed per layer input)."""
    device = generator.device
    gains = torch.ones(features, device=device)
    count = min(OUTLIER_CHANNELS, max(1, features // 16))
    channels = torch.randperm(features, generator=generator, device=device)[:count]
    low, high = OUTLIER_GAIN
    gains[channels] = torch.empty(count, device=device).uniform_(low, high, generator=generator)
    return gains


def activations(tokens: int, gains: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RMS-normed random rows [tokens, features] times `gains`, in bf16."""
    values = torch.randn(tokens, gains.numel(), generator=generator, device=generator.device)
    return (values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True)) * gains).to(torch.bfloat16)


def input_sampler(name: str, in_features: int, out_features: int, generator: torch.Generator):
    """tokens -> the inputs linear `name` sees; a down projection gets SiLU(gate) * up of the hidden
    states, through random gate and up weights of its own shape drawn once."""
    if not name.endswith("down_proj"):
        gains = outlier_gains(in_features, generator)
        return lambda tokens: activations(tokens, gains, generator)
    hidden = out_features
    gains = outlier_gains(hidden, generator)
    gate, up = (random_weight(in_features, hidden, generator).to(torch.bfloat16) for _ in range(2))

    def gated(tokens: int) -> torch.Tensor:
        states = activations(tokens, gains, generator)
        return F.silu(F.linear(states, gate)) * F.linear(states, up)

    return gated


def agreement(output: torch.Tensor, reference: torch.Tensor) -> dict:
    a, b = output.float(), reference.float()
    return {
        "cosine": round(float((a * b).sum() / (a.norm() * b.norm())), 6),
        "rel_err": round(float((a - b).norm() / b.norm()), 5),
        "cosine_min_row": round(float(F.cosine_similarity(a, b, dim=-1).min()), 6),
    }


def fp8_outputs(inputs: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor):
    """(variant, output) of the FP8 ways to run `weight` (bf16) on `inputs`."""
    for scales in ("channel", "tensor"):
        weight_scale = weight_scales(weight, per_channel=scales == "channel")
        stored = quantize(weight, weight_scale)
        yield f"{scales}/W8A16", w8a16_linear(inputs, stored, weight_scale, None)
        yield f"{scales}/W8A8-static", w8a8_linear(inputs, stored, weight_scale, input_scale, None)
        yield f"{scales}/W8A8-dynamic", w8a8_linear(inputs, stored, weight_scale, None, None)


def compare_linear(bench: Bench, name: str, in_features: int, out_features: int, seed: int) -> dict:
    """One linear at its real shape: each FP8 variant against bf16 F.linear on the same inputs."""
    generator = torch.Generator(bench.device).manual_seed(seed)
    weight = random_weight(out_features, in_features, generator).to(torch.bfloat16)
    sample = input_sampler(name, in_features, out_features, generator)
    calibration = sample(CALIBRATION_TOKENS)  # other samples of the same kind: ModelOpt's calibration
    input_scale = (calibration.abs().amax().float() / FP8_MAX).reshape(())
    inputs = sample(bench.args.tokens)
    reference = F.linear(inputs, weight)
    variants = {variant: agreement(output, reference) for variant, output in fp8_outputs(inputs, weight, input_scale)}
    return {
        "name": f"layer-0-{name}",
        "out_features": out_features,
        "in_features": in_features,
        "tokens": bench.args.tokens,
        "input_amax": round(float(inputs.abs().amax()), 3),
        "static_input_scale": round(float(input_scale), 6),
        "fp8_cores": has_fp8_matmul(bench.device),
        "agreement": variants,
    }


def part_layers(bench: Bench) -> None:
    transformer = build_on_meta(Cosmos3OmniTransformer, specs.model_spec(bench.args.model).transformer)
    worst: dict[str, float] = {}
    with torch.no_grad():
        for seed, name in enumerate(LAYER_LINEARS):
            linear = transformer.get_submodule(f"layers.0.{name}")
            row = compare_linear(bench, name, linear.in_features, linear.out_features, seed)
            bench.results.add(row)
            for variant, numbers in row["agreement"].items():
                worst[variant] = min(worst.get(variant, 1.0), numbers["cosine"])
            bench.free()
    target = {variant: TARGETS["W8A16" if variant.endswith("W8A16") else "W8A8"] for variant in worst}
    bench.results.add(
        {
            "name": "layers-min-cosine",
            "min_cosine": worst,
            "target": target,
            "meets_target": {variant: worst[variant] >= target[variant] for variant in worst},
        }
    )


# --- checkpoint ----------------------------------------------------------------------------------


def random_value(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """float32 on the generator's device, of the loader's kind for `name`: norms ones, biases zeros."""
    device = generator.device
    kind = random_weights._kind(name, shape)
    if kind != "normal":
        return (torch.ones if kind == "ones" else torch.zeros)(shape, device=device)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator, device=device).div_(fan_in**0.5)


@dataclass
class Fp8CheckpointWriter:
    """Stands in for bench_load's `_write_weights`: every value made on `device`, the transformer's
    quantized linears stored as ModelOpt does (FP8 weight, per-tensor `weight_scale`, static
    `input_scale` calibrated on activations like the layers part's), shards written by WRITERS threads."""

    device: torch.device
    seed: int = 0
    input_scales: dict[int, torch.Tensor] = field(default_factory=dict)

    def __call__(self, model, folder: Path, *, sharded: bool, save_file) -> int:
        fp8 = isinstance(model, Cosmos3OmniTransformer)
        dtype_of = keep_fp32_dtype(type(model), torch.bfloat16)
        items = [(name, tuple(p.shape), fp8 and _is_fp8_weight(name)) for name, p in model.named_parameters()]
        shards = _shards(items, dtype_of, bench_load.SHARD_BYTES if sharded else None)
        files = [
            _shard_file(i, len(shards)) if sharded else "diffusion_pytorch_model.safetensors"
            for i in range(len(shards))
        ]
        generator = torch.Generator(self.device).manual_seed(self.seed)
        weight_map, total, pending = {}, 0, deque()
        with ThreadPoolExecutor(WRITERS) as pool:
            for file, shard in zip(files, shards):
                tensors = {key: value for item in shard for key, value in self._tensors(item, dtype_of, generator)}
                weight_map.update(dict.fromkeys(tensors, file))
                total += sum(t.numel() * t.element_size() for t in tensors.values())
                if len(pending) >= WRITERS:
                    pending.popleft().result()  # bounds the host memory shards wait in
                pending.append(pool.submit(save_file, tensors, folder / file))
            for future in pending:
                future.result()
        if sharded:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        print(f"-- wrote {folder.name}: {len(files)} file(s), {gib(total)} GiB", flush=True)
        return total

    def _tensors(self, item, dtype_of, generator: torch.Generator):
        name, shape, fp8 = item
        value = random_value(name, shape, generator)
        if not fp8:
            yield name, value.to(dtype_of(name)).cpu()
            return
        path = name.removesuffix(".weight")
        scale = weight_scales(value, per_channel=False)
        yield name, quantize(value, scale).cpu()
        yield f"{path}.weight_scale", scale.cpu()
        yield f"{path}.input_scale", self._input_scale(shape[1], generator).cpu().clone()  # one tensor each

    def _input_scale(self, features: int, generator: torch.Generator) -> torch.Tensor:
        if features not in self.input_scales:
            calibration = activations(CALIBRATION_TOKENS, outlier_gains(features, generator), generator)
            self.input_scales[features] = (calibration.abs().amax().float() / FP8_MAX).reshape(())
        return self.input_scales[features]


def _is_fp8_weight(name: str) -> bool:
    return name.endswith(".weight") and is_quantized_linear(name.removesuffix(".weight"))


def _shards(items: list, dtype_of, limit: int | None) -> list[list]:
    """`items` in files of at most `limit` bytes each (one file without a limit), in order."""
    shards: list[list] = [[]]
    size = 0
    for item in items:
        name, shape, fp8 = item
        nbytes = math.prod(shape) + 8 if fp8 else math.prod(shape) * dtype_of(name).itemsize
        if limit is not None and size + nbytes > limit and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def _shard_file(index: int, count: int) -> str:
    return f"diffusion_pytorch_model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_fp8_checkpoint(bench: Bench, folder: Path) -> dict:
    """bench_load's published layout, with our writer and model size standing in for its own
    (Nano, bf16, from the CPU), and the transformer config's ModelOpt `quantization_config`.
    Written beside `folder` and renamed when complete, so a call cut short leaves no half checkpoint."""
    spec = specs.model_spec(bench.args.model)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    writer = Fp8CheckpointWriter(bench.device)
    with (
        mock.patch.object(bench_load, "_write_weights", writer),
        mock.patch.object(specs, "model_spec", lambda _: spec),
    ):
        written = bench_load.write_checkpoint(partial)
    config_file = partial / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    config_file.write_text(json.dumps(config, indent=2))
    partial.rename(folder)
    return {**written, "bytes_gib": {part: gib(n) for part, n in written["bytes"].items()}}


def part_checkpoint(bench: Bench) -> None:
    args = bench.args
    folder = args.folder or Path(f"/tmp/cosmos3-{args.model}-fp8-random")
    if not folder.exists():
        bench.results.add(
            {"name": "write-fp8-checkpoint", "folder": str(folder), **write_fp8_checkpoint(bench, folder)}
        )
    bench.results.add({"name": "warm-page-cache", "read_s": bench_load.warm(folder)})
    transformer_config, vae_config = model_configs(folder)
    sizes = model_sizes(
        transformer_config, vae_config, quantization=quantization_for(folder, transformer_config, NO_FP8_FLAGS)
    )
    fp8 = Fp8Options(mode=args.checkpoint_mode)
    request = request_for(*args.checkpoint_shape, request_defaults()["steps"])
    for label in ("first", "warm"):  # the second load is the warm one
        print(f"-- loading the checkpoint all streamed ({label})", flush=True)
        components, info = load(bench, ALL_STREAMED, fp8, folder)
        pinned = predict(ALL_STREAMED, sizes, request, bench.profile).host.pinned
        bench.results.add(
            {"name": f"fp8-checkpoint-load-all-streamed-{label}", **info, "predicted_pinned_gib": gib(pinned)}
        )
        del components
    tier, frames = args.checkpoint_shape
    name = f"fp8-checkpoint-cap{args.checkpoint_cap:g}-{tier}p-{frames}f"
    choice, cap, label = plan_for_cap(bench, sizes, request, args.checkpoint_cap, name, mapped=True)
    print(f"-- loading the checkpoint with the planner's plan for {cap:g} GiB", flush=True)
    loaded = load(bench, choice.plan, fp8, folder)
    bench.results.add(
        {
            "name": f"fp8-checkpoint-load-{label}",
            **loaded[1],
            "predicted_pinned_gib": gib(choice.prediction.host.pinned),
        }
    )
    name = f"fp8-checkpoint-{args.checkpoint_mode}-{label}-{tier}p-{frames}f"
    record(bench, name, loaded, (tier, frames), cap, choice.prediction, sizes, args.checkpoint_steps)
    del loaded
    bench.free()


# --- main ----------------------------------------------------------------------------------------


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are a comma-separated list of {', '.join(PARTS)}; got {text!r}")
    return parts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--parts", type=parse_parts, default=list(PARTS), help="comma-separated, run in this order")
    add("--model", default="nano")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--shapes", nargs="+", type=parse_shape, default=[(720, 189), (480, 93)], help="TIERxFRAMES")
    add("--steps", type=int, default=3)
    add("--caps", nargs="+", type=float, default=[8, 4], help="device caps in GiB for the planner's FP8 plans")
    add("--tokens", type=int, default=8192, help="rows of the layers part's inputs")
    add(
        "--folder",
        type=Path,
        help="the FP8 checkpoint (written unless it exists; default /tmp/cosmos3-MODEL-fp8-random)",
    )
    add("--checkpoint-shape", type=parse_shape, default=(720, 189))
    add("--checkpoint-cap", type=float, default=4.0)
    add("--checkpoint-steps", type=int, default=2)
    add("--checkpoint-mode", default="w8a8", help="--fp8-mode of the checkpoint's run")
    add("--policy", action=argparse.BooleanOptionalAction, default=True, help="also run the default FP8 mode")
    add("--tag", default="", help="suffix of the results file name (fp8-TAG-...)")
    add("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.steps < 1 or args.checkpoint_steps < 1:
        parser.error("--steps and --checkpoint-steps must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    header = {"model": args.model, "fp8_cores": has_fp8_matmul(device), "h2d_pinned_GBps": None}
    if device.type == "cuda":
        header["h2d_pinned_GBps"] = measure_pinned_h2d()
    profile = DeviceProfile(h2d_GBps=header["h2d_pinned_GBps"]) if header["h2d_pinned_GBps"] else DeviceProfile()
    results = ResultsFile(args.out, f"fp8-{args.tag}" if args.tag else "fp8", **header, profile=vars(profile))
    bench = Bench(args, device, results, profile)
    parts = {"steps": part_steps, "layers": part_layers, "checkpoint": part_checkpoint}
    for part in args.parts:
        start = time.perf_counter()
        print(f"== {part}", flush=True)
        try:
            parts[part](bench)
        except Exception as error:  # the next part still runs
            traceback.print_exc()
            results.add({"name": f"{part}-failed", "error": f"{type(error).__name__}: {first_line(error)}"})
        bench.free()
        print(f"== {part} took {time.perf_counter() - start:.1f} s", flush=True)
    print(f"wrote {results.path}", flush=True)


if __name__ == "__main__":
    main()
