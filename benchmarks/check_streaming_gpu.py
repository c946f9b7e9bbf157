"""GPU check that streamed and staged plans reproduce the all-resident generation bit for bit.

On a GPU the copies run on their own stream and only events order them against compute, so a
missing wait would show as different latents. Prints one line per plan; exits 1 on a mismatch.
Example: python benchmarks/check_streaming_gpu.py --model nano --tier 256 --frames 17 --steps 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from bench_common import ResultsFile

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.planning.plan import GroupPlan, Mode, Plan
from cosmos3_offload.planning.search import spread

CUDA = torch.device("cuda")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="nano")
    parser.add_argument("--tier", type=int, default=256)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    config = GenerationConfig(
        prompt="a red fox in the snow",
        frames=args.frames,
        resolution=args.tier,
        steps=args.steps,
        output=Path("/tmp/check.mp4"),
    )
    layers = 36 if args.model == "nano" else 6
    streamed = {"reasoner": GroupPlan(mode=Mode.STREAMED), "generator": GroupPlan(mode=Mode.STREAMED)}
    plans = {
        "resident": Plan(),
        "staged": Plan.from_offload(("reasoner", "generator", "vae")),
        "streamed": Plan(**streamed, vae=GroupPlan(mode=Mode.STAGED)),
        "streamed-ring3-resident": Plan(
            reasoner=GroupPlan(mode=Mode.STREAMED, ring=3, prefetch=2),
            generator=GroupPlan(mode=Mode.STREAMED, resident_layers=spread(layers, 5), ring=3, prefetch=2),
            vae=GroupPlan(mode=Mode.STAGED),
        ),
        # Chunking changes GEMM shapes, so it is compared with resident-and-chunked, bit for bit.
        "resident-chunked": Plan(mlp_chunk=64),
        "streamed-chunked": Plan(**streamed, vae=GroupPlan(mode=Mode.STAGED), mlp_chunk=64),
    }
    outputs = {}
    failed = False
    for name, plan in plans.items():
        components = load_components(None, CUDA, torch.bfloat16, plan, random_model=args.model)
        outputs[name] = generate_video(config, components, PhaseTimer(CUDA), progress=False)
        reference = outputs["resident-chunked" if plan.mlp_chunk else "resident"]
        same = torch.equal(outputs[name].latents, reference.latents)
        failed |= not same
        generator = next(line for line in components.engine.summary().splitlines() if line.startswith("generator"))
        print(f"{name}: {'identical' if same else 'DIFFERENT'}; {generator}")
        del components
    a, b = outputs["resident-chunked"].latents, outputs["resident"].latents
    error = ((a - b).norm() / b.norm()).item()
    print(f"chunked vs whole MLP after {args.steps} steps (bf16, guidance 6): rel err {error:.2e}")
    results = ResultsFile(args.out, "streaming-check")
    for name in plans:
        reference = "resident-chunked" if plans[name].mlp_chunk else "resident"
        same = torch.equal(outputs[name].latents, outputs[reference].latents)
        results.add(
            {
                "name": name,
                "system": "ours",
                "plan": plans[name].describe(),
                "reference": reference,
                "height": config.height,
                "width": config.width,
                "frames": config.frames,
                "steps": args.steps,
                "bit_identical": same,
            }
        )
    results.data["chunked_vs_whole_rel_err"] = error
    results.add({"name": "summary", "system": "ours", "all_identical": not failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
