"""`cosmos3_offload.enable(pipe, ...)` on a GPU: a tiny folder in the published layout, loaded twice with
`Cosmos3OmniPipeline.from_pretrained`; one copy moved to the GPU as diffusers users do (`pipe.to("cuda")`),
the others placed by `enable` (resident, staged, streamed, a small budget). Each call's latents and frames
are compared with the plain pipeline's, in float32 (tests/integration does the same on the CPU).

Writes benchmarks/results/enable-gpu-<gpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_common import ResultsFile  # noqa: E402
from diffusers import Cosmos3OmniPipeline  # noqa: E402
from published_layout import PLANS, write_published_checkpoint  # noqa: E402

import cosmos3_offload  # noqa: E402

CALL = {"prompt": "a red fox runs through fresh snow, tracking shot", "num_frames": 9, "height": 192, "width": 320}
STEPS, GUIDANCE, SEED = 4, 5.0, 3
PLACED = {
    "resident": {},
    "staged": {"offload_stages": ["reasoner", "generator", "vae"]},
    "streamed": {"plan": PLANS["streamed"]},
    "budget": {"vram_budget": "128MiB", "max_frames": 9, "max_height": 192, "max_width": 320},
}


def load(folder: Path) -> Cosmos3OmniPipeline:
    pipe = Cosmos3OmniPipeline.from_pretrained(folder, enable_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def outputs(pipe: Cosmos3OmniPipeline) -> tuple[torch.Tensor, np.ndarray, float]:
    common = {**CALL, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE}
    latent = pipe(**common, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").video
    torch.cuda.synchronize()
    start = time.perf_counter()
    frames = pipe(**common, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").video
    torch.cuda.synchronize()
    return latent.float().cpu(), np.asarray(frames, dtype=np.float64), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    results = ResultsFile(args.out, "enable-gpu", call={**CALL, "steps": STEPS, "guidance": GUIDANCE})
    folder = write_published_checkpoint(Path(tempfile.mkdtemp()) / "Cosmos3-Nano")
    plain = load(folder).to("cuda")
    latent, frames, seconds = outputs(plain)
    del plain
    results.add({"run": "diffusers pipe.to('cuda')", "seconds": seconds})
    for name, options in PLACED.items():
        pipe = cosmos3_offload.enable(load(folder), device="cuda", **options)
        torch.cuda.reset_peak_memory_stats()  # the calls' peak, not enable's bandwidth probe
        ours_latent, ours_frames, ours_seconds = outputs(pipe)
        error = float((ours_latent - latent).norm() / latent.norm())
        results.add(
            {
                "run": f"enable {name}",
                "plan": pipe.offload.plan.describe(),
                "latent_relative_error": error,
                "frames_max_difference": float(np.abs(ours_frames - frames).max()),
                "seconds": ours_seconds,
                "device_peak_bytes": torch.cuda.max_memory_allocated(),  # of the two calls
                "device_allocated_bytes": torch.cuda.memory_allocated(),  # the placed weights, between calls
            }
        )
        del pipe
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
