"""Previews benchmark (issue 25): what fast and exact previews cost a run, against none, on one load.

Nano's random weights (`--model nano`), 720p x 189 frames, `--steps` steps, under the planner's plan for
`--cap` GiB with exact previews (the VAE resident: the plan exact previews need; all three runs share it, so
the differences are the previews' alone), loaded and run under that cap. Three requests through
`generate_video` (the path `cosmos3_offload.run` takes; generated, not written: no mp4):

- `none`: no preview;
- `fast`: a fast preview after every step (`--fast-every`), into an animated .webp (its colour map fitted
  first, into an empty cache folder: `fit_s`, then read back from the cache: `cached_map_s`);
- `fast-png`: the same into a .png (the middle frame alone);
- `exact`: an exact preview every `--exact-every` steps (and after the last), into an animated .webp (the VAE's
  decode of the first, middle and last latent frames).

Per run: the time of each step after step 0 (step 0 pays the warm-up) and their median, each preview's
seconds (the device synchronized before and after it), the phases' seconds and the denoise's device peak. A
`summary` row holds each preview kind's median step against `none`'s, one preview's seconds against a step,
the extra denoise peak, and, for a 35-step request (prefill, 35 steps and the decode at the measured pace),
the share exact previews every `--exact-every` steps would add, against issue 25's targets (fast <= 1% of a
step, exact every 5 <= 5% of the request).

Results: benchmarks/results/previews[-TAG]-<gpu>-<date>.json (`--out` folder).

Examples:
    python benchmarks/bench_previews.py --out /root/out                  # ~5 min on an H100
    python benchmarks/bench_previews.py --model tiny --device cpu --resolution 256 --frames 9 --steps 2 --cap 0 \\
        --out /tmp/previews-smoke
"""

from __future__ import annotations

import os

# Fewer, growable segments: less fragmentation under a memory cap (set before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import gc
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
from bench_common import ResultsFile, gib, set_cap

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.device_profile import device_setup, probe_shape
from cosmos3_offload.app.doors import PlacedPipeline, Preview
from cosmos3_offload.app.planned_request import request_of
from cosmos3_offload.app.previews import PreviewOptions, make_preview, preview_frames
from cosmos3_offload.app.runner import LoadedModel, generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import first_line
from cosmos3_offload.loading.components import model_configs
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.planning.request import DeviceProfile
from cosmos3_offload.planning.search import choose_plan
from cosmos3_offload.units import GIB

PROMPT = "A red fox trots through fresh snow at the edge of a pine forest at dawn, steam rising from its breath."
SEED = 0
FULL_STEPS = 35  # a default request's steps, for the exact previews' share of a whole request
TARGET_FAST_SHARE_OF_STEP = 0.01
TARGET_EXACT_SHARE_OF_REQUEST = 0.05


class TimedPreview:
    """A previewer whose every `show` is timed, the device synchronized before and after it (benchmark only)."""

    def __init__(self, inner: Preview, device: torch.device) -> None:
        self.inner, self.device, self.kind = inner, device, inner.kind
        self.seconds: list[float] = []

    def due(self, index: int, steps: int) -> bool:
        return self.inner.due(index, steps)

    def show(self, index: int, steps: int, denoised: torch.Tensor, placed: PlacedPipeline) -> None:
        sync(self.device)
        start = time.perf_counter()
        self.inner.show(index, steps, denoised, placed)
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # benchmark only: wall times are the device's


def config_for(args: argparse.Namespace, name: str, folder: Path) -> GenerationConfig:
    return GenerationConfig(
        prompt=PROMPT,
        frames=args.frames,
        resolution=args.resolution,
        steps=args.steps,
        seed=SEED,
        output=folder / f"{name}.mp4",
    )


def planned(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, config: GenerationConfig) -> dict:
    """The planner's plans for the cap: with exact previews (the one the runs follow) and without (for reference)."""
    transformer_config, vae_config = model_configs(None, args.model)
    sizes = model_sizes(transformer_config, vae_config, dtype_bytes=dtype.itemsize)
    profile = DeviceProfile()  # the CPU's: the built-in rates
    if device.type == "cuda":
        profile = device_setup(device, attention="auto", shape=probe_shape(transformer_config), dtype=dtype).profile
    budget = int(args.cap * GIB)
    exact = PreviewOptions(Path(tempfile.gettempdir()) / "plan.webp", "exact")
    with_previews = choose_plan(sizes, request_of(config, preview_frames=preview_frames(exact)), budget, profile)
    without = choose_plan(sizes, request_of(config), budget, profile)
    return {
        "plan": with_previews.plan,
        "info": {
            "cap_gib": args.cap,
            "plan": with_previews.plan.describe(),
            "predicted_step_s": round(with_previews.prediction.times.step, 3),
            "predicted_peak_gib": gib(with_previews.prediction.peak),
            "plan_without_previews": without.plan.describe(),
            "predicted_step_without_previews_s": round(without.prediction.times.step, 3),
        },
    }


def request(args: argparse.Namespace, loaded: LoadedModel, name: str, folder: Path, device: torch.device) -> dict:
    """One request with `name`'s previews (none, fast, fast-png, exact), generated on the loaded model: its row."""
    config = loaded.check(config_for(args, name, folder), budgeted=True)
    components = loaded.components
    kind = name.split("-")[0]
    row: dict = {"name": name, "kind": kind}
    preview = None
    if kind != "none":
        every = args.fast_every if kind == "fast" else args.exact_every
        suffix = ".png" if name.endswith("png") else ".webp"
        options = PreviewOptions(folder / f"{name}{suffix}", kind, every)
        start = time.perf_counter()
        inner = make_preview(options, components, checkpoint=None, model=args.model)
        sync(device)
        row["fit_s" if name == "fast" else "make_s"] = round(time.perf_counter() - start, 3)
        if name == "fast":
            start = time.perf_counter()
            make_preview(options, components, checkpoint=None, model=args.model)
            row["cached_map_s"] = round(time.perf_counter() - start, 4)
        preview = TimedPreview(inner, device)
    stamps: list[float] = []

    def step_done(index: int) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    timer = PhaseTimer(device)
    start = time.perf_counter()
    video = generate_video(
        config, components, timer, progress=False, on_step=step_done, kernels=loaded.kernels, preview=preview
    )
    sync(device)
    request_s = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    phases = {p.name: p for p in timer.phases}
    row |= {
        "frames": list(video.frames.shape[:3]),
        "step_s": [round(s, 4) for s in steps],
        "median_step_s": round(statistics.median(steps), 4) if steps else None,
        "preview_s": None if preview is None else [round(s, 4) for s in preview.seconds],
        "phases_s": {name: round(p.seconds, 3) for name, p in phases.items()},
        "request_s": round(request_s, 3),
        "denoise_peak_allocated_gib": gib(phases["denoise"].device_peak_bytes),
        "peak_allocated_gib": gib(max((p.device_peak_bytes or 0) for p in timer.phases)) or None,
    }
    return row


def summary(runs: list[dict], exact_every: int) -> dict:
    """Each kind against none: its median step, one preview against a step, the extra denoise peak; exact
    previews' share of a 35-step request."""
    by_name = {r["name"]: r for r in runs if r.get("error") is None and "kind" in r}
    none = by_name.get("none", {})
    step = none.get("median_step_s")
    entry: dict = {"name": "summary", "median_step_s": {k: by_name.get(k, {}).get("median_step_s") for k in by_name}}
    for kind in ("fast", "fast-png", "exact"):
        run = by_name.get(kind)
        if run is None or not step or not run.get("preview_s"):
            continue
        preview = statistics.median(run["preview_s"])
        extra = None
        if none.get("denoise_peak_allocated_gib") is not None:
            extra = round(run["denoise_peak_allocated_gib"] - none["denoise_peak_allocated_gib"], 3)
        entry[kind] = {
            "preview_s": round(preview, 4),
            "preview_over_step": round(preview / step, 4),
            "step_over_none": round(run["median_step_s"] / step, 4) if run.get("median_step_s") else None,
            "extra_denoise_peak_gib": extra,
        }
    phases = none.get("phases_s", {})
    if "exact" in entry and step:
        previews = -(-FULL_STEPS // exact_every)  # every k-th step, the last included
        whole = phases.get("prefill", 0.0) + FULL_STEPS * step + phases.get("decode", 0.0)
        entry["exact"]["share_of_35_step_request"] = round(previews * entry["exact"]["preview_s"] / whole, 4)
    entry["meets_target"] = {
        "fast_le_1pct_of_step": _at_most(entry.get("fast", {}).get("preview_over_step"), TARGET_FAST_SHARE_OF_STEP),
        "fast_png_le_1pct_of_step": _at_most(
            entry.get("fast-png", {}).get("preview_over_step"), TARGET_FAST_SHARE_OF_STEP
        ),
        "exact_every_5_le_5pct_of_request": _at_most(
            entry.get("exact", {}).get("share_of_35_step_request"), TARGET_EXACT_SHARE_OF_REQUEST
        ),
    }
    return entry


def _at_most(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default="nano")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--resolution", type=int, default=720)
    add("--frames", type=int, default=189)
    add("--steps", type=int, default=4, help="denoising steps per request (step 0 warms up and is not counted)")
    add("--cap", type=float, default=8.0, help="GiB of the plan (0: everything resident, no cap)")
    add("--fast-every", type=int, default=1)
    add("--exact-every", type=int, default=5)
    add("--tag", default="", help="suffix of the results file name (previews-TAG-...)")
    add("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 0 is not counted)")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = "previews" + (f"-{args.tag}" if args.tag else "")
    results = ResultsFile(args.out, name, model=args.model, steps=args.steps)
    folder = Path(tempfile.mkdtemp(prefix="bench-previews-"))
    os.environ["COSMOS3_OFFLOAD_CACHE"] = str(folder / "cache")  # an empty cache: the fast map is fitted once
    config = config_for(args, "plan", folder)
    plan, info = Plan(), {"cap_gib": None, "plan": Plan().describe()}
    if args.cap:
        chosen = planned(args, device, dtype, config)
        plan, info = chosen["plan"], chosen["info"]
    print(f"-- {info['plan']}", flush=True)
    if device.type == "cuda":
        set_cap(args.cap or None)  # the load runs under the cap too
    start = time.perf_counter()
    loaded = LoadedModel.open(device=str(device), plan=plan, model=args.model)  # bf16 on a GPU, float32 on a CPU
    loaded.load(PhaseTimer(device))
    sync(device)
    info["load_s"] = round(time.perf_counter() - start, 2)
    results.add({"name": "load", **info})
    for name in ("none", "fast", "fast-png", "exact"):
        try:
            results.add(request(args, loaded, name, folder, device))
        except Exception as error:  # one failed request must not cost the others' measurements
            traceback.print_exc()
            results.add({"name": name, "kind": name, "error": f"{type(error).__name__}: {first_line(error)}"})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results.add(summary(results.data["runs"], args.exact_every))


if __name__ == "__main__":
    main()
