"""Action modes benchmark (issue 24): forward dynamics, inverse dynamics and policy, diffusers resident
against ours resident and under the planner's 8 GiB (bf16) and 4 GiB (FP8) plans.

Each mode runs at its default tier (480) and chunk (16: 17 frames), domain bridge_orig_lerobot (10
numbers a row), conditioned on a random 480x640 image (policy, forward dynamics; forward dynamics
also gets random rows of the domain's width) or a random 17-frame 480x640 clip (inverse dynamics).
Every request runs whole: encode, prefill, `--steps` steps, decode (ours also writes the video and
the actions beside it, timed apart as `write_s`).

Parts (`--parts`, run in the order given, each loads its model once and frees it before the next):
- `diffusers`: `Cosmos3OmniPipeline(...)(action=CosmosActionCondition(...))`, everything resident,
  built from the same seeded random weights as ours (as bench_speed.py builds its peer); step times
  from `callback_on_step_end`.
- `resident`: ours all resident, the path `cosmos3_offload.run` takes (`LoadedModel` with the action
  heads, its kernels: the probe's attention and the fused layers on a GPU).
- `cap-bf16`: ours with the planner's plan for `--cap-bf16` GiB (default 8), loaded and run under that
  cap (`set_cap`).
- `cap-fp8`: the same for `--cap-fp8` GiB (default 4) with `--quantize fp8`, each mode in each of
  `--fp8-modes` on the one load: `auto` (the library's default: the step policy, W8A16 for the first and
  last 3 steps, so W8A16 throughout a 6-step run) as rows `cap-fp8-MODE`, and `w8a8` (what most steps
  of a 35-step run are) as rows `cap-fp8-w8a8-MODE`.

Per run: the time of each step after step 0 (step 0 pays the warm-up and torch.compile's compilation)
and their median (`median_step_s`), the request's device peak (`peak_allocated_gib`; the denoise's
apart), the whole request from the conditioning's encode through the decode (`request_s`; the first
request of a part also pays its compilation, `compile_s`) and the predicted actions. A `summary` row
(rewritten after each part, printed at the end) holds, per mode, our resident step / diffusers', each
capped step / our resident step and the predicted actions' differences (capped against resident, each
against diffusers), against issue 24's targets.

Results: benchmarks/results/actions[-TAG]-<gpu>-<date>.json (`--out` folder). Runs of an earlier
process of the same name (GPU and date) are kept, so parts may run as separate processes.

Examples:
    python benchmarks/bench_actions.py --out /root/out                       # all parts, ~5 min on an H100
    python benchmarks/bench_actions.py --parts cap-bf16,cap-fp8 --out /root/out
    python benchmarks/bench_actions.py --model tiny --device cpu --steps 2 --modes policy --chunk 4 --tier 256 \\
        --out /tmp/actions-smoke
"""

from __future__ import annotations

import os

# Fewer, growable segments: less fragmentation under a memory cap (set before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import functools
import gc
import json
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from bench_common import ResultsFile, gib, random_model, set_cap
from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, Cosmos3OmniTransformer
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition
from PIL import Image

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.device_profile import device_setup, probe_shape
from cosmos3_offload.app.inputs import read_conditioning
from cosmos3_offload.app.planned_request import request_of
from cosmos3_offload.app.runner import LoadedModel, generate_video
from cosmos3_offload.app.schedule import flow_scheduler
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import InputError, first_line
from cosmos3_offload.kernels.fused import compile_seconds
from cosmos3_offload.loading.components import model_configs
from cosmos3_offload.loading.quantization import NO_FP8_FLAGS, Fp8Options, quantization_for
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.actions import ACTION_MODES, ACTION_WIDTHS, DEFAULT_ACTION_TIER, DEFAULT_CHUNK
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.model.tiny_tokenizer import build_tiny_tokenizer
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.planning.request import DeviceProfile
from cosmos3_offload.planning.search import choose_plan, predict
from cosmos3_offload.quant.fp8 import has_fp8_matmul
from cosmos3_offload.quant.policy import FP8_MODES, step_schedule
from cosmos3_offload.units import GIB

PARTS = ("diffusers", "resident", "cap-bf16", "cap-fp8")
# The rows of each mode the summary compares: the parts, and the FP8 part in W8A8 throughout.
ROWS = (*PARTS, "cap-fp8-w8a8")
DOMAIN = "bridge_orig_lerobot"
INPUT_SIZE = (480, 640)  # (height, width) of the random image and clip: a 4:3 camera
PROMPT = "The robot arm picks up the red cup from the table and puts it into the bowl."
SEED = 0
FP8 = Fp8Options(quantize="fp8")
# Issue 24's targets: our resident step against diffusers', a capped step against our resident one,
# predicted actions against diffusers' (relative error, as the CPU tests measure it).
TARGET_RESIDENT_VS_DIFFUSERS = 0.90
TARGET_CAPPED_VS_RESIDENT = 1.05
TARGET_ACTIONS_REL = 1e-4


@dataclass
class Bench:
    """What every part needs: the flags, the device and dtype, the results file, the request inputs."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    results: ResultsFile
    inputs: dict[str, Path]
    workdir: Path
    profile: DeviceProfile | None = None
    cap_gib: float | None = None  # the device cap in force (re-applied after each free)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)  # benchmark only: wall times are the device's

    def free(self) -> None:
        """Collect the garbage and give the cached device memory back; the cap stays (reset_device lifts it)."""
        gc.collect()
        if self.cuda:
            set_cap(self.cap_gib)

    def cap(self, cap_gib: float | None) -> None:
        self.cap_gib = cap_gib
        if self.cuda:
            set_cap(cap_gib)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)


# --- inputs --------------------------------------------------------------------------------------


def write_inputs(folder: Path, chunk: int) -> dict[str, Path]:
    """A random 480x640 image, a random clip of chunk + 1 frames of that size and random action rows
    [chunk, width of the domain] (.npy), seeded."""
    rng = np.random.default_rng(SEED)
    height, width = INPUT_SIZE
    image = folder / "frame.png"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)
    clip = folder / "clip.mp4"
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(chunk + 1)]
    imageio.mimwrite(clip, frames, fps=24, codec="libx264", quality=8, macro_block_size=16)
    rows = folder / "actions.npy"
    np.save(rows, rng.standard_normal((chunk, ACTION_WIDTHS[DOMAIN])).astype(np.float32))
    return {"image": image, "video": clip, "actions": rows}


def config_for(bench: Bench, mode: str, name: str) -> GenerationConfig:
    """The mode's request at the benchmark's tier, chunk and steps, with its conditioning files."""
    inputs = bench.inputs
    files = {"video": inputs["video"]} if mode == "inverse_dynamics" else {"image": inputs["image"]}
    if mode == "forward_dynamics":
        files["actions"] = inputs["actions"]
    return GenerationConfig(
        prompt=PROMPT,
        action=mode,
        domain=DOMAIN,
        chunk_size=bench.args.chunk,
        resolution=bench.args.tier,
        steps=bench.args.steps,
        seed=SEED,
        output=bench.workdir / f"{name}.mp4",
        **files,
    )


# --- timing --------------------------------------------------------------------------------------


@dataclass
class StepClock:
    """When each denoising step ended (the device synchronized first); with `peaks` (diffusers' pipeline,
    which has no phases of its own) the device peaks through step 0 (the encode included) and over steps
    1.. (the denoise). Ours leaves the peaks to its PhaseTimer, whose phases reset them."""

    bench: Bench
    last: int
    track_peaks: bool = False
    stamps: list[float] = field(default_factory=list)
    peaks: dict[str, int | None] = field(default_factory=dict)

    def step_done(self, index: int) -> None:
        self.bench.sync()
        self.stamps.append(time.perf_counter())
        if not self.track_peaks:
            return
        if index == 0:
            self.peaks["through_step0"] = self.bench.peak()
            self.bench.reset_peak()
        if index == self.last:
            self.peaks["steps"] = self.bench.peak()
            self.bench.reset_peak()

    def row(self) -> dict:
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return {
            "step_s": [round(s, 4) for s in steps],
            "median_step_s": round(statistics.median(steps), 4) if steps else None,
        }


def compare(actions: np.ndarray | None, reference: np.ndarray | None) -> dict | None:
    """Max absolute difference and relative error (Frobenius) of predicted actions against `reference`."""
    if actions is None or reference is None:
        return None
    a, b = np.asarray(actions, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        return {"error": f"shapes differ: {list(a.shape)} against {list(b.shape)}"}
    norm = float(np.linalg.norm(b))
    return {
        "max_abs": float(np.abs(a - b).max()),
        "rel": float(np.linalg.norm(a - b) / norm) if norm else None,
        "equal": bool(np.array_equal(a, b)),
    }


# --- diffusers -----------------------------------------------------------------------------------


def diffusers_pipeline(bench: Bench) -> Cosmos3OmniPipeline:
    """diffusers' pipeline, everything resident, on the seeded random weights ours loads (action heads too)."""
    spec = model_spec(bench.args.model)
    pipe = Cosmos3OmniPipeline(
        transformer=random_model(Cosmos3OmniTransformer, spec.transformer, bench.device, bench.dtype),
        text_tokenizer=build_tiny_tokenizer(),
        vae=random_model(AutoencoderKLWan, spec.vae, bench.device, bench.dtype),
        scheduler=flow_scheduler(10.0),
        enable_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_request(bench: Bench, pipe: Cosmos3OmniPipeline, mode: str) -> tuple[dict, np.ndarray | None]:
    """One whole request through `pipe(action=...)` (decoded to frames): its row and predicted actions."""
    config = config_for(bench, mode, f"diffusers-{mode}")
    conditioning = read_conditioning(config).action
    clip = {"video": conditioning.clip} if config.video is not None else {"image": conditioning.clip[0]}
    rows = None if conditioning.raw_actions is None else torch.from_numpy(np.asarray(conditioning.raw_actions))
    action = CosmosActionCondition(
        mode=mode,
        chunk_size=config.chunk_size,
        domain_name=config.domain,
        resolution_tier=config.resolution,
        raw_actions=rows,
        view_point=config.view,
        **clip,
    )
    pipe.scheduler = flow_scheduler(config.flow_shift)
    clock = StepClock(bench, last=config.steps - 1, track_peaks=True)
    bench.free()
    start = time.perf_counter()
    output = pipe(
        prompt=config.prompt,
        negative_prompt=config.negative_prompt,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance,
        fps=config.fps,
        generator=torch.Generator("cpu").manual_seed(config.seed),
        output_type="np",
        enable_safety_check=False,
        action=action,
        callback_on_step_end=lambda _pipe, index, _t, _tensors: clock.step_done(index) or {},
    )
    bench.sync()
    request_s = time.perf_counter() - start
    peaks = [clock.peaks.get("through_step0"), clock.peaks.get("steps"), bench.peak()]
    actions = None if output.action is None else output.action[0].float().cpu().numpy()
    row = {
        "frames": list(np.asarray(output.video).shape[:3]),
        "first_step_s": round(clock.stamps[0] - start, 3),
        **clock.row(),
        "request_s": round(request_s, 3),
        "peak_allocated_gib": gib(max(peaks)) if bench.cuda else None,
        "denoise_peak_allocated_gib": gib(clock.peaks.get("steps")),
    }
    return row, actions


def part_diffusers(bench: Bench) -> None:
    start = time.perf_counter()
    pipe = diffusers_pipeline(bench)
    bench.sync()
    build_s = round(time.perf_counter() - start, 2)
    for mode in bench.args.modes:
        info = {"plan": "diffusers resident", "load_s": build_s}
        run_mode(bench, "diffusers", mode, info, functools.partial(diffusers_request, bench, pipe))
    del pipe


# --- ours ----------------------------------------------------------------------------------------


def ours_request(bench: Bench, loaded: LoadedModel, mode: str, *, label: str) -> tuple[dict, np.ndarray | None]:
    """One whole request the way `cosmos3_offload.run` makes it on a loaded model (its conditioning read,
    checked, generated; not written): its row and predicted actions."""
    config = config_for(bench, mode, f"{label}-{mode}")
    start = time.perf_counter()
    conditioning = read_conditioning(config)
    read_s = time.perf_counter() - start
    config = loaded.check(config, budgeted=bench.cap_gib is not None)
    clock = StepClock(bench, last=config.steps - 1)
    timer = PhaseTimer(bench.device)
    compiled = compile_seconds()
    start = time.perf_counter()
    # Generated, not written: the GPU machine's ffmpeg cannot read an mp4 back (the write is a CPU matter).
    video = generate_video(
        config,
        loaded.load(timer),
        timer,
        progress=False,
        on_step=clock.step_done,
        conditioning=conditioning,
        kernels=loaded.kernels,
    )
    seconds = time.perf_counter() - start
    phases = {p.name: p for p in timer.phases}
    write_s = phases["write"].seconds if "write" in phases else 0.0
    denoise = phases["denoise"]
    before_steps = sum(phases[name].seconds for name in ("encode", "prefill") if name in phases)
    peaks = [p.device_peak_bytes for p in timer.phases if p.device_peak_bytes is not None]
    row = {
        "frames": list(video.frames.shape[:3]),
        "read_s": round(read_s, 3),
        "phases_s": {name: round(p.seconds, 3) for name, p in phases.items()},
        # From the generation's start, less the encode and the prefill: step 0 and what precedes it.
        "first_step_s": round(clock.stamps[0] - start - before_steps, 3),
        **clock.row(),
        "request_s": round(seconds - write_s, 3),
        "write_s": round(write_s, 3),
        "compile_s": round(compile_seconds() - compiled, 2),
        "peak_allocated_gib": gib(max(peaks)) if peaks else None,
        "denoise_peak_allocated_gib": gib(denoise.device_peak_bytes),
        "kernels": f"{loaded.kernels.attention_name}{' + fused' if loaded.kernels.fused else ''}",
    }
    return row, video.actions


def planned(bench: Bench, fp8: Fp8Options, cap_gib: float) -> tuple[Plan | None, dict]:
    """The planner's plan for `cap_gib` (the CLI's --vram-budget) with its prediction, one load serving every
    mode: of the plans it picks for the modes' requests (inverse dynamics encodes its whole clip), the
    fastest predicted that fits them all. None and the refusal where nothing fits."""
    transformer_config, vae_config = model_configs(None, bench.args.model)
    sizes = model_sizes(
        transformer_config,
        vae_config,
        dtype_bytes=bench.dtype.itemsize,
        quantization=quantization_for(None, transformer_config, fp8),
        actions=True,
    )
    budget = int(cap_gib * GIB)
    requests = {mode: request_of(config_for(bench, mode, "plan")) for mode in bench.args.modes}
    try:
        choices = {mode: choose_plan(sizes, request, budget, bench.profile) for mode, request in requests.items()}
    except InputError as error:
        return None, {"cap_gib": cap_gib, "error": f"planner refused: {first_line(error)}"}

    def fits_all(plan: Plan) -> bool:
        usable = budget * bench.profile.headroom
        return all(predict(plan, sizes, request, bench.profile).peak <= usable for request in requests.values())

    fitting = [mode for mode, choice in choices.items() if fits_all(choice.plan)]
    mode = min(fitting or choices, key=lambda m: choices[m].prediction.times.step)
    choice = choices[mode]
    return choice.plan, {
        "cap_gib": cap_gib,
        "plan": choice.plan.describe(),
        "planned_for": mode,
        "plans_per_mode": {m: c.plan.describe() for m, c in choices.items() if c.plan != choice.plan} or None,
        "predicted_step_s": round(choice.prediction.times.step, 3),
        "predicted_peak_gib": {m: gib(predict(choice.plan, sizes, r, bench.profile).peak) for m, r in requests.items()},
    }


def part_ours(bench: Bench, part: str) -> None:
    """Load ours for `part` (resident, or the planner's plan for a cap, loaded and run under the cap)
    and run every mode on that one load."""
    args = bench.args
    fp8 = FP8 if part == "cap-fp8" else NO_FP8_FLAGS
    cap = {"resident": None, "cap-bf16": args.cap_bf16, "cap-fp8": args.cap_fp8}[part]
    plan, info = (Plan(), {"cap_gib": None, "plan": Plan().describe()}) if cap is None else planned(bench, fp8, cap)
    info["weights"] = "fp8 (--quantize fp8)" if fp8.quantize else str(bench.dtype).removeprefix("torch.")
    if plan is None:
        bench.results.add({"name": f"{part}-plan", "part": part, **info})
        return
    print(f"-- {part}: {info['plan']}", flush=True)
    bench.cap(cap)  # the load runs under the cap too
    start = time.perf_counter()
    try:
        loaded = LoadedModel.open(device=str(bench.device), plan=plan, model=args.model, actions=True, fp8=fp8)
        loaded.load(PhaseTimer(bench.device))
        bench.sync()
    except Exception as error:  # recorded with the plan; the next part still runs
        traceback.print_exc()
        info["error"] = f"load failed: {type(error).__name__}: {first_line(error)}"
    if "error" in info:
        bench.cap(None)  # outside the except block, whose traceback held the load's tensors
        bench.results.add({"name": f"{part}-load", "part": part, **info})
        return
    info["load_s"] = round(time.perf_counter() - start, 2)
    info["device_after_load_gib"] = gib(torch.cuda.memory_allocated(bench.device)) if bench.cuda else None
    info["pinned_gib"] = gib(loaded.components.engine.pinned_bytes)
    fp8_modes = args.fp8_modes if fp8.quantize else [None]
    for fp8_mode in fp8_modes:  # each on the same load: the schedule is read at every request
        label = part if fp8_mode in (None, FP8.mode) else f"{part}-{fp8_mode}"
        if fp8_mode is not None:
            set_fp8_mode(bench, loaded, fp8_mode)
        for mode in args.modes:
            row = {**info, "fp8_mode": fp8_mode}
            run_mode(bench, label, mode, row, functools.partial(ours_request, bench, loaded, label=label))
    del loaded
    bench.cap(None)


def set_fp8_mode(bench: Bench, loaded: LoadedModel, mode: str) -> None:
    """Run the loaded FP8 model in another `--fp8-mode` (`auto`, the default: the step policy, W8A16 for
    the first and last 3 steps, so throughout a run of 6 steps; `w8a8`: FP8 activations every step)."""
    components = loaded.components
    fp8_cores = has_fp8_matmul(bench.device)
    components.schedule = step_schedule(mode, components.quantization.policy, fp8_cores=fp8_cores)


def run_mode(bench: Bench, part: str, mode: str, info: dict, request: Callable[[str], tuple]) -> None:
    """One mode's `request(mode)` on a loaded model, recorded with its predicted actions (an error is
    recorded and the next mode still runs)."""
    row = {"name": f"{part}-{mode}", "part": part, "mode": mode, **info}
    actions = None
    try:
        measured, actions = request(mode)
        row |= measured | {"error": None}
    except torch.OutOfMemoryError as error:
        row["error"] = f"out of memory: {first_line(error)}"
    except Exception as error:  # one failed request must not cost the call's other measurements
        traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {first_line(error)}"
    bench.free()  # after the except blocks: their tracebacks held the request's tensors
    row["actions_shape"] = None if actions is None else list(actions.shape)
    row["predicted"] = None if actions is None else np.asarray(actions, np.float32).tolist()
    bench.results.add(row)


# --- summary -------------------------------------------------------------------------------------


def summary(runs: list[dict], modes: list[str]) -> dict:
    """Per mode: the step ratios and the actions' differences that issue 24's targets are about."""
    by_name = {r["name"]: r for r in runs if r.get("error") is None}

    def step(part, mode):
        return by_name.get(f"{part}-{mode}", {}).get("median_step_s")

    def actions(part, mode):
        predicted = by_name.get(f"{part}-{mode}", {}).get("predicted")
        return None if predicted is None else np.asarray(predicted, np.float32)

    def ratio(a, b):
        return None if a is None or b is None else round(a / b, 3)

    per_mode = {}
    for mode in modes:
        resident = step("resident", mode)
        capped = [row for row in ROWS if row.startswith("cap")]
        entry = {
            "median_step_s": {row: step(row, mode) for row in ROWS},
            "peak_allocated_gib": {row: by_name.get(f"{row}-{mode}", {}).get("peak_allocated_gib") for row in ROWS},
            "request_s": {row: by_name.get(f"{row}-{mode}", {}).get("request_s") for row in ROWS},
            "resident_over_diffusers_step": ratio(resident, step("diffusers", mode)),
            "capped_over_resident_step": {row: ratio(step(row, mode), resident) for row in capped},
            "actions_vs_resident": {row: compare(actions(row, mode), actions("resident", mode)) for row in capped},
            "actions_vs_diffusers": {row: compare(actions(row, mode), actions("diffusers", mode)) for row in ROWS[1:]},
        }
        entry["meets_target"] = {
            "resident_step_le_0.90x_diffusers": _at_most(
                entry["resident_over_diffusers_step"], TARGET_RESIDENT_VS_DIFFUSERS
            ),
            "capped_step_le_1.05x_resident": {
                row: _at_most(entry["capped_over_resident_step"][row], TARGET_CAPPED_VS_RESIDENT) for row in capped
            },
            "actions_rel_le_1e-4_vs_diffusers": {
                row: _at_most((entry["actions_vs_diffusers"][row] or {}).get("rel"), TARGET_ACTIONS_REL)
                for row in ROWS[1:]
            },
        }
        per_mode[mode] = entry
    return {"name": "summary", "modes": per_mode}


def _at_most(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


# --- main ----------------------------------------------------------------------------------------


def comma_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [p.strip() for p in text.split(",") if p.strip()]
        unknown = [p for p in items if p not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(choices)}; got {text!r}")
        return items

    return parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--parts", type=comma_list(PARTS), default=list(PARTS), help="comma-separated, run in this order")
    add("--modes", type=comma_list(ACTION_MODES), default=list(ACTION_MODES), help="comma-separated")
    add("--model", default="nano")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--steps", type=int, default=6, help="denoising steps per request (step 0 warms up and is not counted)")
    add("--chunk", type=int, default=DEFAULT_CHUNK, help="action chunk (the video has chunk + 1 frames)")
    add("--tier", type=int, default=DEFAULT_ACTION_TIER, help="action tier: 256, 480, 704 or 720")
    add("--cap-bf16", type=float, default=8.0, help="GiB of the bf16 plan")
    add("--cap-fp8", type=float, default=4.0, help="GiB of the FP8 plan")
    add(
        "--fp8-modes",
        type=comma_list(FP8_MODES),
        default=[FP8.mode, "w8a8"],
        help="--fp8-mode values the FP8 part runs, each on the same load (default: auto, the library's, and w8a8)",
    )
    add("--tag", default="", help="suffix of the results file name (actions-TAG-...)")
    add("--fresh", action="store_true", help="drop the runs of an earlier process with the same results file")
    add("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 0 is not counted)")
    return args


def continue_results(results: ResultsFile, fresh: bool) -> None:
    """Keep the runs an earlier process of this benchmark wrote to the same file (not its summary)."""
    if fresh or not results.path.exists():
        return
    earlier = json.loads(results.path.read_text()).get("runs", [])
    results.data["runs"] = [r for r in earlier if r.get("name") != "summary"]
    print(f"-- continuing {results.path} ({len(results.data['runs'])} runs)", flush=True)


def add_summary(results: ResultsFile) -> dict:
    """Replace the summary row with one over every run so far (written, not printed: see print_summary)."""
    runs = [r for r in results.data["runs"] if r.get("name") != "summary"]
    modes = [m for m in ACTION_MODES if any(r.get("mode") == m for r in runs)]
    row = summary(runs, modes)
    results.data["runs"] = [*runs, row]
    results.path.write_text(json.dumps(results.data, indent=1))
    return row


def print_summary(row: dict) -> None:
    """One line per mode and row: median step, peak, whole request; then the ratios and the actions."""
    for mode, entry in row["modes"].items():
        for name in ROWS:
            step, peak, request = (entry[key][name] for key in ("median_step_s", "peak_allocated_gib", "request_s"))
            print(f"{mode:<17} {name:<13} step {step} s  peak {peak} GiB  request {request} s")
        ratios = {"resident/diffusers": entry["resident_over_diffusers_step"], **entry["capped_over_resident_step"]}
        print(f"{mode:<17} step ratios {json.dumps(ratios)}")
        print(f"{mode:<17} actions vs resident {json.dumps(entry['actions_vs_resident'])}")
        print(f"{mode:<17} actions vs diffusers {json.dumps(entry['actions_vs_diffusers'])}", flush=True)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what a run picks on each
    header = {"model": args.model, "domain": DOMAIN, "tier": args.tier, "chunk": args.chunk, "steps": args.steps}
    results = ResultsFile(args.out, f"actions-{args.tag}" if args.tag else "actions", **header)
    continue_results(results, args.fresh)
    with tempfile.TemporaryDirectory(prefix="cosmos3-bench-actions-") as scratch:
        workdir = Path(scratch)
        bench = Bench(args, device, dtype, results, write_inputs(workdir, args.chunk), workdir)
        if any(part.startswith("cap") for part in args.parts):
            setup = device_setup(
                device, attention="auto", shape=probe_shape(model_configs(None, args.model)[0]), dtype=dtype
            )
            bench.profile = setup.profile
            results.data["device_profile"] = setup.profile.source
        for part in args.parts:
            start = time.perf_counter()
            print(f"== {part}", flush=True)
            try:
                part_diffusers(bench) if part == "diffusers" else part_ours(bench, part)
            except Exception as error:  # the next part still runs
                traceback.print_exc()
                failed = f"{type(error).__name__}: {first_line(error)}"
                results.add({"name": f"{part}-failed", "part": part, "error": failed})
            bench.free()
            if bench.cuda:
                set_cap(None)
            print(f"== {part} took {time.perf_counter() - start:.1f} s", flush=True)
            row = add_summary(results)
    print_summary(row)
    print(f"wrote {results.path}", flush=True)


if __name__ == "__main__":
    main()
