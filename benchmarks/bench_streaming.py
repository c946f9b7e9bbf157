"""Streaming benchmark (issue 4): planner-chosen plans under device caps against all-resident.

One call: pinned H2D bandwidth; ours all-resident at each shape (the baseline); ours under each
cap with the plan `choose_plan` picks for that cap (reloaded per plan), with the planner's
predictions next to the measurements; diffusers' group offloading (block level, stream).
Nano-size random bf16 weights, full-size Wan2.2 VAE, VAE decode included (tiled where planned).
Results: benchmarks/results/streaming-<gpu>-<date>.json, rewritten after each run.

Example: python benchmarks/bench_streaming.py --shapes 480x93 720x189 256x93 --caps 8 16 12 --steps 3
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

import argparse
import gc
import statistics
from pathlib import Path

from bench_common import ResultsFile, gib, measure_pinned_h2d
from bench_staging import load_ours, measure_ours, parse_shape, part_peer

from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.groups import GENERATOR
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.model.tiers import frame_size
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.planning.request import DeviceProfile, Request
from cosmos3_offload.planning.search import Prediction, choose_plan, predict
from cosmos3_offload.planning.timing import streamed_bytes
from cosmos3_offload.units import GIB


def request_for(tier: int, frames: int, steps: int) -> Request:
    width, height = frame_size(tier, "16,9")
    return Request.for_video(frames, height, width, steps=steps)


def measured_vs_predicted(run: dict, prediction: Prediction) -> dict:
    steps = run.get("step_s") or []
    rest = steps[1:] or steps
    median = round(statistics.median(rest), 4) if rest else None
    peaks = prediction.peaks
    return {
        "predicted": {
            "peak_allocated_gib": gib(prediction.peak),
            "peak_allocated_no_decode_gib": gib(max(peaks.prefill, peaks.denoise)),
            "decode_peak_allocated_gib": gib(peaks.decode),
            "step_s": round(prediction.times.step, 3),
        },
        "step_s_median_rest": median,
    }


def run_plan(args, results, sizes, tier, frames, cap, plan: Plan, prediction: Prediction, label: str) -> None:
    components, info = load_ours(args.model, plan)
    run = measure_ours(components, tier, frames, args.steps, cap)
    extra = measured_vs_predicted(run, prediction)
    moved = streamed_bytes(plan, sizes, GENERATOR)  # one denoising step's copies
    if run.get("error") is None and extra["step_s_median_rest"]:
        extra["streamed_GiB_per_step"] = gib(moved)
        extra["streamed_GBps_over_step"] = round(moved / extra["step_s_median_rest"] / 1e9, 2)
    results.add({"name": f"ours-{label}-{tier}p-{frames}f", **info, "plan": plan.describe(), **run, **extra})
    del components
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="nano")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(480, 93), (720, 189), (256, 93)])
    parser.add_argument("--caps", nargs="+", type=float, default=[8, 16, 12])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--baseline-steps", type=int, help="steps of the all-resident baseline (default: --steps)")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the results file name (streaming-TAG-...)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    name = f"streaming-{args.tag}" if args.tag else "streaming"
    results = ResultsFile(args.out, name, h2d_pinned_GBps=measure_pinned_h2d())
    profile = DeviceProfile(h2d_GBps=results.data["h2d_pinned_GBps"])
    results.data["profile"] = vars(profile)
    spec = model_spec(args.model)
    sizes = model_sizes(spec.transformer, spec.vae)
    components, info = load_ours(args.model, Plan())
    for tier, frames in args.shapes:  # the baseline: one all-resident load for every shape
        steps = args.baseline_steps or args.steps
        run = measure_ours(components, tier, frames, steps, None)
        extra = measured_vs_predicted(run, predict(Plan(), sizes, request_for(tier, frames, steps), profile))
        results.add({"name": f"ours-resident-{tier}p-{frames}f", **info, **run, **extra})
    del components
    gc.collect()
    for index, cap in enumerate(args.caps):
        for tier, frames in args.shapes:
            request = request_for(tier, frames, args.steps)
            try:
                choice = choose_plan(sizes, request, int(cap * GIB), profile)
            except ValueError as error:
                results.add(
                    {
                        "name": f"ours-cap{cap:g}-{tier}p-{frames}f",
                        "system": "ours",
                        "cap_gib": cap,
                        "error": f"planner refused: {error}",
                    }
                )
                continue
            run_plan(args, results, sizes, tier, frames, cap, choice.plan, choice.prediction, f"cap{cap:g}")
        if index == 0 and not args.skip_peer:
            part_peer(args, results, "diffusers-group-offload")
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
