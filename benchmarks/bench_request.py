"""The whole request as a user times it (issue 27): from process start to the file closed, with the phase split.

Variants, each its own fresh process, so imports, planning, the probe, load and compile count as a user sees them:
- `diffusers`: diffusers 0.42.1 `Cosmos3OmniPipeline`, random weights of --model, everything resident, its own
  decode (`output_type="np"`) and export (`diffusers.utils.export_to_video`);
- `ours-resident`, `ours-8gib`: `python -m cosmos3_offload generate --model M ...` (random weights, default
  kernels), resident and with `--vram-budget 8GiB`; each also `-fp8` (`--quantize fp8`) and `-fp8-seacache`
  (`--quantize fp8 --cache seacache`).
- `--warm-start`: the `ours-8gib` command twice with an empty compile cache (cold, then warm): the prefill of
  each, and what Inductor's cache did. The other variants share that cache folder, so they run warm.

Per variant: `wall_s` (the parent's clock around the child), `to_file_s` (parent start to the child's `main`
returned, the mp4 closed), `after_last_step_s` (the end of the last step to the file closed: the target is
1.2x the decode alone), `startup_s` (to_file_s minus the phases: interpreter, imports, planning, the attention
probe), each phase's seconds and peaks, every step's seconds (synchronized, as the CLI's progress line does), the
fused kernels' compile seconds. With `--steps` below --target-steps (35), the figures at the target are
composed and labelled so: to_file_s - denoise + first step + median later step x (target - 1). SeaCache's
skips depend on the step count, so its runs are never composed: run them at the target. The CLI's report (plan,
predicted step, kernels, phase table) is kept beside each run.

The mp4 encode is part of the request: without an ffmpeg (imageio-ffmpeg's wheel) the script stops at once.
Results: benchmarks/results/request[-NAME]-<gpu>-<date>.json, rewritten after every variant.

Example: python benchmarks/bench_request.py --shapes 720x189 --steps 3 --warm-start --variants diffusers ours-8gib
(--cache-dir keeps the compile cache and the probe's rates between calls; --out $OUT on the device machine.)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.time()  # a child's first instant after the interpreter starts

FP8 = ["--quantize", "fp8"]
SEACACHE = ["--cache", "seacache"]
BUDGET = ["--vram-budget", "8GiB"]
DIFFUSERS = "diffusers"
VARIANTS = {
    DIFFUSERS: None,
    "ours-resident": [],
    "ours-resident-fp8": FP8,
    "ours-resident-fp8-seacache": FP8 + SEACACHE,
    "ours-8gib": BUDGET,
    "ours-8gib-fp8": BUDGET + FP8,
    "ours-8gib-fp8-seacache": BUDGET + FP8 + SEACACHE,
}
WARM_START = "ours-8gib"
CHILD_TIMEOUT_S = 3600


def find_ffmpeg() -> str | None:
    """The ffmpeg our writer and diffusers' export use: imageio-ffmpeg's, else one on PATH."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed, or its binary is missing: fall back to PATH
        return shutil.which("ffmpeg")


# ---- children: one variant in this fresh process, its figures to a JSON file ----


def child_ours(result_path: Path, cli_args: list[str]) -> int:
    """`python -m cosmos3_offload generate ...` in this process, with its phase timer and steps recorded."""
    from contextlib import contextmanager

    from cosmos3_offload.app.timer import PhaseTimer
    from cosmos3_offload.main import main

    timers: list[PhaseTimer] = []
    starts: dict[str, float] = {}
    stamps: list[float] = []
    last_step_end = [None]  # wall clock at the end of the last step
    phase, step = PhaseTimer.phase, PhaseTimer.step

    @contextmanager
    def recorded_phase(self, name):
        if self not in timers:
            timers.append(self)
        with phase(self, name):
            starts[name] = time.perf_counter()  # after the timer's own wait for the device
            yield

    def recorded_step(self, index, total):
        step(self, index, total)  # with the progress line on, this waits for the step
        stamps.append(time.perf_counter())
        last_step_end[0] = time.time()

    PhaseTimer.phase, PhaseTimer.step = recorded_phase, recorded_step
    try:
        code = main(["generate", *cli_args])
        finished = time.time()
    finally:
        PhaseTimer.phase, PhaseTimer.step = phase, step
    phases = [p for t in timers for p in t.phases]
    first_step = stamps[0] - starts["denoise"] if stamps and "denoise" in starts else None
    write_child_result(result_path, code, finished, phases, step_seconds(first_step, stamps), last_step_end[0])
    return code


def child_diffusers(
    result_path: Path, model: str, tier: int, frames: int, steps: int, output: Path, *, tiled: bool
) -> int:
    """diffusers' pipeline, everything resident, its own decode (`tiled`: its VAE's tiling) and export,
    phases timed like ours."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as our CLI sets it
    import torch
    from bench_common import PROMPT, random_model
    from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, Cosmos3OmniTransformer
    from diffusers.utils import export_to_video

    from cosmos3_offload.app.config import GenerationConfig
    from cosmos3_offload.app.schedule import flow_scheduler
    from cosmos3_offload.app.timer import PhaseTimer
    from cosmos3_offload.model.specs import model_spec
    from cosmos3_offload.model.tiny_tokenizer import build_tiny_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = GenerationConfig(prompt=PROMPT, frames=frames, resolution=tier, steps=steps, output=output)
    timer = PhaseTimer(device)
    with timer.phase("load"):
        spec = model_spec(model)
        pipe = Cosmos3OmniPipeline(
            transformer=random_model(Cosmos3OmniTransformer, spec.transformer, device, dtype),
            text_tokenizer=build_tiny_tokenizer(),
            vae=random_model(AutoencoderKLWan, spec.vae, device, dtype),
            scheduler=flow_scheduler(config.flow_shift),
            enable_safety_checker=False,
        )
        if tiled:
            pipe.vae.enable_tiling()
    stamps: list[float] = []
    last_step_end = [None]

    def on_step(_pipe, index, timestep, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize()  # as our progress line waits for each step
        stamps.append(time.perf_counter())
        last_step_end[0] = time.time()
        return {}

    with timer.phase("call"):  # diffusers' call: the prompt and step 0, the other steps, then its decode
        denoise_started = time.perf_counter()
        video = pipe(
            prompt=PROMPT,
            num_frames=frames,
            height=config.height,
            width=config.width,
            num_inference_steps=steps,
            fps=config.fps,
            guidance_scale=config.guidance,
            generator=torch.Generator("cpu").manual_seed(config.seed),
            output_type="np",
            enable_safety_check=False,
            callback_on_step_end=on_step,
        ).video  # [frames, height, width, 3] in [0, 1]
    with timer.phase("write"):
        export_to_video(list(video), str(output), fps=int(config.fps))
    finished = time.time()
    load, call, write = timer.phases
    denoise = stamps[-1] - denoise_started
    phases = [load, _named(call, "denoise", denoise), _named(call, "decode", call.seconds - denoise), write]
    steps_s = step_seconds(stamps[0] - denoise_started, stamps)
    write_child_result(result_path, 0, finished, phases, steps_s, last_step_end[0])
    return 0


def _named(stats, name: str, seconds: float):
    from dataclasses import replace

    return replace(stats, name=name, seconds=seconds)


def step_seconds(first: float | None, stamps: list[float]) -> list[float]:
    """[step 0 from the phase's start, then each step from the end of the one before]."""
    if first is None:
        return []
    return [first, *(b - a for a, b in zip(stamps, stamps[1:]))]


def write_child_result(
    path: Path, code: int, finished: float, phases: list, steps: list[float], last_step_end: float | None
) -> None:
    import torch

    from cosmos3_offload.kernels import fused

    counters = {}
    if "torch._dynamo" in sys.modules:
        from torch._dynamo.utils import counters as dynamo_counters

        counters = {k: v for k, v in dynamo_counters["inductor"].items() if k.startswith("fxgraph_cache")}
    gib = 2**30
    result = {
        "exit_code": code,
        "started": STARTED,
        "finished": finished,
        "last_step_end": last_step_end,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "phases": {
            p.name: {
                "s": round(p.seconds, 3),
                "device_peak_gib": None if p.device_peak_bytes is None else round(p.device_peak_bytes / gib, 3),
                "host_peak_gib": None if p.host_peak_bytes is None else round(p.host_peak_bytes / gib, 3),
            }
            for p in phases
        },
        "step_s": [round(s, 4) for s in steps],
        "compile_s": round(fused.compile_seconds(), 2),
        "compile_count": fused.compile_count(),
        "inductor_cache": counters,
    }
    path.write_text(json.dumps(result, indent=1))


# ---- the parent: one child per variant, its clock around each ----


def run_variant(args, name: str, tier: int, frames: int, work: Path, cache: Path) -> dict:
    """One variant in a fresh process: the parent's wall time around it and the child's figures."""
    output = work / f"{name}-{tier}p-{frames}f.mp4"
    result_path = work / f"{name}-{tier}p-{frames}f.json"
    result_path.unlink(missing_ok=True)
    script = [sys.executable, str(Path(__file__).resolve())]
    if name == DIFFUSERS:
        command = [*script, "_diffusers", str(result_path), args.model, str(tier), str(frames), str(args.steps)]
        command += [str(output), "tiled" if args.diffusers_tiled_decode else "untiled"]
    else:
        request = ["--model", args.model, "--resolution", str(tier), "--frames", str(frames)]
        request += ["--steps", str(args.steps), "--prompt", "A red fox trots through fresh snow.", "--output"]
        command = [*script, "_ours", str(result_path), *request, str(output), *VARIANTS[name], *args.cli_args]
    env = {**os.environ, "COSMOS3_OFFLOAD_CACHE": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    wall = time.time() - started
    run = {"name": name, "shape": f"{tier}p x {frames}f", "steps_run": args.steps, "wall_s": round(wall, 2)}
    run["command"] = shlex.join(command)
    if done.returncode != 0 or not result_path.exists():
        return {**run, "failed": done.returncode, "stderr_tail": done.stderr[-3000:]}
    child = json.loads(result_path.read_text())
    run.update(summarize(child, started, args.steps, args.target_steps, seacache="seacache" in name))
    run["report"] = done.stdout.strip().splitlines()[-24:]  # our CLI's report: the plan, kernels, phases
    run["output_bytes"] = output.stat().st_size if output.exists() else None
    if not args.keep_videos:
        output.unlink(missing_ok=True)
    return run


def summarize(child: dict, started: float, steps: int, target: int, *, seacache: bool) -> dict:
    """The child's figures with the parent's start: to the file, startup, and the composed target."""
    to_file = child["finished"] - started
    phases = {name: p["s"] for name, p in child["phases"].items()}
    out = {
        "gpu": child["gpu"],
        "to_file_s": round(to_file, 2),
        "startup_s": round(to_file - sum(phases.values()), 2),
        "interpreter_s": round(child["started"] - started, 2),
        "after_last_step_s": None if (last := child["last_step_end"]) is None else round(child["finished"] - last, 2),
        "phases": child["phases"],
        "step_s": child["step_s"],
        "compile_s": child["compile_s"],
        "compile_count": child["compile_count"],
        "inductor_cache": child["inductor_cache"],
    }
    later = child["step_s"][1:]
    if later:
        out["median_step_s"] = round(statistics.median(later), 4)
    if steps < target and later and not seacache:
        denoise = child["step_s"][0] + statistics.median(later) * (target - 1)
        out[f"composed_{target}_steps"] = {
            "how": f"measured at {steps} steps: to_file_s - denoise + first step + median later step x {target - 1}",
            "denoise_s": round(denoise, 2),
            "to_file_s": round(to_file - phases["denoise"] + denoise, 2),
        }
    elif steps < target and seacache:
        out[f"composed_{target}_steps"] = None  # SeaCache's skips depend on the step count: measure at the target
    return out


def warm_start_pair(args, results, tier: int, frames: int, work: Path, cache: Path) -> None:
    """The `ours-8gib` command twice, the first with an empty compile cache: what a second process saves."""
    shutil.rmtree(cache, ignore_errors=True)
    for label in ("cold", "warm"):
        run = run_variant(args, WARM_START, tier, frames, work, cache)
        run["name"] = f"{WARM_START}-{label}-start"
        run["prefill_s"] = run.get("phases", {}).get("prefill", {}).get("s")
        results.add(run)


def parse_shape(text: str) -> tuple[int, int]:
    tier, frames = (int(part) for part in text.split("x"))
    return tier, frames


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(720, 189), (480, 93)])
    parser.add_argument("--steps", type=int, default=35, help="steps each variant runs (fewer: figures composed)")
    parser.add_argument("--target-steps", type=int, default=35, help="the step count figures are composed for")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--warm-start", action="store_true", help=f"first, {WARM_START} cold then warm")
    parser.add_argument("--cache-dir", type=Path, default=None, help="COSMOS3_OFFLOAD_CACHE of the children")
    parser.add_argument("--cli-args", type=shlex.split, default=[], help="more flags for our CLI, one string")
    parser.add_argument("--name", default="", help="results file: request-NAME-<gpu>-<date>.json")
    parser.add_argument(
        "--diffusers-tiled-decode", action="store_true", help="diffusers' VAE tiling on (if its whole decode OOMs)"
    )
    parser.add_argument("--keep-videos", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: step 0 warms up, the later ones give the step time")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_ours"]:
        return child_ours(Path(argv[1]), argv[2:])
    if argv[:1] == ["_diffusers"]:
        result, model, tier, frames, steps, output, tiling = argv[1:]
        return child_diffusers(
            Path(result), model, int(tier), int(frames), int(steps), Path(output), tiled=tiling == "tiled"
        )
    args = parse_args(argv)
    if find_ffmpeg() is None:
        print(
            "error: no ffmpeg: the mp4 encode is part of the request. Install imageio-ffmpeg "
            "(on the GPU machine: pip install --no-index --target /tmp/site .whl/imageio_ffmpeg-*.whl)",
            file=sys.stderr,
        )
        return 2
    from bench_common import ResultsFile  # torch and diffusers: only in the parent's own process from here

    benchmark = f"request-{args.name}" if args.name else "request"
    results = ResultsFile(args.out, benchmark, model=args.model, steps=args.steps, target_steps=args.target_steps)
    work = Path(tempfile.mkdtemp(prefix="bench-request-"))
    cache = args.cache_dir or work / "cache"
    for tier, frames in args.shapes:
        if args.warm_start:
            warm_start_pair(args, results, tier, frames, work, cache)
        for name in args.variants:
            if not (args.warm_start and name == WARM_START):  # its warm start is that variant, warm
                results.add(run_variant(args, name, tier, frames, work, cache))
    print(f"wrote {results.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
