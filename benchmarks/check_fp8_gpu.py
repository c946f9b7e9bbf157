"""FP8 on a GPU, end to end on the tiny model (issue 11): --quantize fp8 under the step policy runs
W8A8 on FP8 tensor cores, every plan gives the resident FP8 latents bit for bit, and the latents
stay close to bf16. Exits non-zero on a failure. Example: python benchmarks/check_fp8_gpu.py"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.loading.quantization import Fp8Options
from cosmos3_offload.planning.plan import GroupPlan, Mode, Plan
from cosmos3_offload.quant.fp8 import has_fp8_matmul

CUDA = torch.device("cuda")
PLANS = {
    "resident": Plan(),
    "staged": Plan.from_offload(frozenset({"reasoner", "generator", "vae"})),
    "streamed": Plan(reasoner=GroupPlan(mode=Mode.STREAMED), generator=GroupPlan(mode=Mode.STREAMED)),
}


def latents(plan: Plan, fp8: Fp8Options | None) -> torch.Tensor:
    components = load_components(None, CUDA, torch.bfloat16, plan, random_model="tiny-deep", fp8=fp8 or Fp8Options())
    config = GenerationConfig(prompt="a fox", frames=9, resolution=256, steps=8, output=Path("/tmp/o.mp4"))
    out = generate_video(config, components, PhaseTimer(CUDA), progress=False).latents
    if fp8 is not None:
        print(components.switches.describe(), flush=True)
    return out


def main() -> None:
    assert has_fp8_matmul(CUDA), "this GPU has no FP8 tensor cores"
    fp8 = Fp8Options(quantize="fp8", mode="policy")
    runs = {name: latents(plan, fp8) for name, plan in PLANS.items()}
    for name, out in runs.items():
        print(name, "bit-identical to resident:", torch.equal(out, runs["resident"]), flush=True)
        assert torch.equal(out, runs["resident"]), name
    bf16 = latents(Plan(), None)
    cosine = F.cosine_similarity(runs["resident"].flatten(), bf16.flatten(), dim=0).item()
    print("cosine FP8 policy vs bf16:", cosine, flush=True)
    assert cosine > 0.99


if __name__ == "__main__":
    main()
