"""Several GPUs (issue 13): per-step time on 1 GPU (the baseline, same call), 2 GPUs (CFG-parallel)
and 4 GPUs (CFG 2 x Ulysses 2), all resident and under a per-GPU cap; host memory at each rank count;
a whole request with the decode; Super-size weights on 4 GPUs under a cap.

The driver (`python benchmarks/bench_parallel.py --gpus 1 2 4 ...`) starts one torchrun group per GPU
count, one after the other, on this machine; each group loads the weights once per cap (one host copy
shared by the ranks of the host), runs every shape, and rank 0 appends its runs to the JSON.

Nano-size (or --model) random bf16 weights, the GPU default kernels (the probe's attention, compiled
fused ops). Step i's time is from the end of step i-1 to the end of step i on every rank
(synchronized, benchmark only; the slowest rank is reported); step 0 includes compilation and is
reported apart. Host memory is each rank's proportional set size (PSS: a page shared by k processes
counts 1/k to each), summed over the ranks, so the shared weights count once.
Results: benchmarks/results/parallel-<name>-<N>gpu-<gpu>-<date>.json per GPU count, and
parallel-<name>-parity-<gpu>-<date>.json (the latent differences, with --whole).
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from bench_common import PROMPT, ResultsFile, gib

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.device_profile import device_setup, probe_shape
from cosmos3_offload.app.distributed import start_mesh
from cosmos3_offload.app.feasibility import request_of
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.kernels.choice import Kernels
from cosmos3_offload.kernels.fused import compile_seconds
from cosmos3_offload.loading.components import load_components, model_configs
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.offload.shared import HostShare
from cosmos3_offload.parallel.mesh import Environment
from cosmos3_offload.planning.parallel import ParallelLayout
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.planning.search import choose_plan
from cosmos3_offload.units import GIB


class _Stop(Exception):
    """Raised on every rank after the last timed step: the decode is timed apart."""


def smaps_kib() -> dict[str, int]:
    """This process's /proc/self/smaps_rollup fields, in KiB."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)
    return fields


def host_memory(mesh) -> dict:
    """PSS and private bytes of every rank, summed (the shared weights count once in PSS)."""
    mine = smaps_kib()
    values = torch.tensor(
        [mine.get("Pss", 0), mine.get("Private_Clean", 0) + mine.get("Private_Dirty", 0), mine.get("Rss", 0)],
        dtype=torch.float64,
    )
    if mesh is not None:
        values = values.cuda() if torch.cuda.is_available() else values
        dist.all_reduce(values)
    pss, private, rss = (v * 1024 for v in values.tolist())
    return {"host_pss_gib": gib(pss), "host_private_gib": gib(private), "host_rss_gib": gib(rss)}


def slowest(value: float, mesh) -> float:
    """The largest `value` over the ranks."""
    if mesh is None:
        return value
    box = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return box.item()


def set_cap(device: torch.device, cap_gib: float | None) -> None:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if cap_gib is None else min(1.0, cap_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def config_for(tier: int, frames: int, steps: int) -> GenerationConfig:
    return GenerationConfig(
        prompt=PROMPT, frames=frames, resolution=tier, steps=steps, output=Path("/tmp/parallel.mp4")
    )


def timed_request(components, config, kernels: Kernels, mesh, device, *, stop_after: int | None) -> dict:
    """Per-step times (the slowest rank) of one request, stopped after step `stop_after` (or whole)."""
    stamps: list[float] = []
    compiled_before = compile_seconds()

    def on_step(index: int) -> None:
        torch.cuda.synchronize(device)  # benchmark only: each step's wall time is real
        stamps.append(time.perf_counter())
        if stop_after is not None and index == stop_after:
            raise _Stop

    torch.cuda.reset_peak_memory_stats(device)
    timer = PhaseTimer(device)
    start = time.perf_counter()
    video = None
    try:
        video = generate_video(config, components, timer, progress=False, on_step=on_step, kernels=kernels, mesh=mesh)
        error = None
    except _Stop:
        error = None
    except torch.OutOfMemoryError as oom:
        error = f"out of memory: {str(oom).splitlines()[0]}"  # this rank only: the others will time out
    torch.cuda.synchronize(device)
    end = time.perf_counter()
    phases = {p.name: round(p.seconds, 3) for p in timer.phases}
    steps = [slowest(b - a, mesh) for a, b in zip(stamps, stamps[1:])]
    return {
        "phases_s": phases,
        "first_step_s": round(slowest(stamps[0] - start - phases.get("prefill", 0.0), mesh), 3) if stamps else None,
        "step_s": [round(s, 4) for s in steps],
        "mean_step_s": round(sum(steps) / len(steps), 4) if steps else None,
        "request_s": round(slowest(end - start, mesh), 3),
        "compile_s": round(compile_seconds() - compiled_before, 2),
        "peak_allocated_gib": gib(slowest(torch.cuda.max_memory_allocated(device), mesh)),
        "error": error,
        "latents": None if video is None else video.latents.cpu(),
    }


def plan_for(cap_gib: float | None, model: str, config, profile, layout: ParallelLayout) -> tuple[Plan, float | None]:
    """All resident without a cap; else the planner's plan for one GPU of `layout` under the cap."""
    if cap_gib is None:
        return Plan(), None
    transformer_config, vae_config = model_configs(None, model)
    sizes = model_sizes(transformer_config, vae_config, dtype_bytes=2)
    request = request_of(config, None, layout)
    choice = choose_plan(sizes, request, int(cap_gib * GIB), profile)
    return choice.plan, round(choice.prediction.times.step, 3)


def worker(args) -> None:
    """One rank of a torchrun group: every cap, every shape."""
    environment = Environment.read()
    layout = ParallelLayout.for_ranks(environment.world_size, guidance=True)
    device = torch.device("cuda", environment.local_rank)
    torch.cuda.set_device(device)
    mesh = start_mesh(layout, device)
    leader = mesh is None or mesh.leader
    # One file per GPU count: each group's rank 0 writes its own (they run one after the other).
    name = f"parallel-{args.name}-{layout.world_size}gpu"
    results = ResultsFile(Path(args.out), name, model=args.model) if leader else None
    setup = device_setup(
        device, attention="auto", shape=probe_shape(model_configs(None, args.model)[0]), dtype=torch.bfloat16
    )
    kernels = dataclasses.replace(setup.kernels, fused=True)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    for cap in [None if c == "none" else float(c) for c in args.caps]:
        plan, predicted = plan_for(cap, args.model, config_for(*shapes[-1], args.steps), setup.profile, layout)
        if mesh is not None:
            plan = mesh.broadcast_from_leader(plan)
        share = None
        if mesh is not None:
            share = HostShare(
                name=f"{mesh.run_name}-{cap}",
                owner=mesh.host_leader,
                wait=mesh.wait_for_all,
                directory=Path(args.share_dir),
            )
        set_cap(device, cap)
        start = time.perf_counter()
        components = load_components(None, device, torch.bfloat16, plan, random_model=args.model, host_share=share)
        load_s = slowest(time.perf_counter() - start, mesh)
        memory = host_memory(mesh)
        placement = "resident" if cap is None else f"cap{cap:g}"
        for tier, frames in shapes:
            config = config_for(tier, frames, args.steps)
            run = timed_request(components, config, kernels, mesh, device, stop_after=args.steps - 1)
            run.pop("latents")
            if leader:
                results.add(
                    {
                        "name": f"{layout.world_size}gpu-{placement}-{tier}p-{frames}f",
                        "gpus": layout.world_size,
                        "layout": layout.describe(),
                        "cap_gib": cap,
                        "plan": plan.describe(),
                        "predicted_step_s": predicted,
                        "load_s": round(load_s, 2),
                        **memory,
                        **run,
                    }
                )
        if args.whole is not None and cap is None:
            tier, frames = shapes[0]
            config = config_for(tier, frames, args.whole)
            run = timed_request(components, config, kernels, mesh, device, stop_after=None)
            latents = run.pop("latents")
            if leader and latents is not None:
                torch.save(latents, Path(args.out) / f"latents-{args.name}-{layout.world_size}gpu.pt")
            if layout.world_size == 1:
                # How far bf16 rounding alone moves these latents: the same request with the eager
                # (unfused) elementwise ops, whose rounding differs from the fused kernels'.
                reference = timed_request(
                    components, config, dataclasses.replace(kernels, fused=False), mesh, device, stop_after=None
                )
                torch.save(reference["latents"], Path(args.out) / f"latents-{args.name}-1gpu-unfused.pt")
            if leader:
                results.add(
                    {
                        "name": f"{layout.world_size}gpu-whole-{tier}p-{frames}f-{args.whole}steps",
                        "gpus": layout.world_size,
                        "layout": layout.describe(),
                        "plan": plan.describe(),
                        **run,
                    }
                )
        del components
        gc.collect()
        set_cap(device, None)
        if mesh is not None:
            mesh.wait_for_all()
    if leader:
        results.data["device_profile"] = setup.profile.source
        results.add({"name": "done"})
    if mesh is not None:
        mesh.close()


def driver(args, rest: list[str]) -> int:
    """One torchrun group per GPU count, in order; stops at the first that fails."""
    for count in args.gpus:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}"]
        command += [__file__, "--worker", *rest]
        print(json.dumps({"starting": count, "command": command}), flush=True)
        status = subprocess.run(command, timeout=args.group_timeout).returncode
        if status != 0:
            print(json.dumps({"failed": count, "status": status}), flush=True)
            return status
    if args.whole is not None:
        compare_latents(args)
    return 0


def compare_latents(args) -> None:
    """Largest latent difference of each GPU count's whole request against one GPU's (same call)."""
    folder = Path(args.out)
    baseline = torch.load(folder / f"latents-{args.name}-1gpu.pt")
    results = ResultsFile(folder, f"parallel-{args.name}-parity", model=args.model)
    for count in ["1gpu-unfused", *(f"{n}gpu" for n in args.gpus if n != 1)]:
        path = folder / f"latents-{args.name}-{count}.pt"
        if not path.exists():
            continue
        latents = torch.load(path)
        difference = (latents - baseline).abs()
        results.add(
            {
                "name": f"{count}-vs-1gpu",
                "steps": args.whole,
                "max_abs_difference": difference.max().item(),
                "mean_abs_difference": difference.mean().item(),
                "max_abs_latent": baseline.abs().max().item(),
                "relative_l2": ((latents - baseline).norm() / baseline.norm()).item(),
            }
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--model", default="nano")
    parser.add_argument("--name", default="nano")
    parser.add_argument("--shapes", nargs="+", default=["480x93", "720x189"], metavar="TIERxFRAMES")
    parser.add_argument("--caps", nargs="+", default=["none", "8"], metavar="GIB", help="'none': all resident")
    parser.add_argument("--steps", type=int, default=3, help="steps timed per shape (the first is warm-up)")
    parser.add_argument("--whole", type=int, default=None, help="also a whole request of this many steps")
    parser.add_argument("--group-timeout", type=float, default=560)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--share-dir", default="/dev/shm", help="where the host's shared weight files live")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    rest = [a for a in sys.argv[1:]]
    skip = {"--gpus"}
    filtered, dropping = [], False
    for a in rest:
        if a in skip:
            dropping = True
            continue
        if dropping and not a.startswith("--"):
            continue
        dropping = False
        filtered.append(a)
    return driver(args, filtered)


if __name__ == "__main__":
    sys.exit(main())
