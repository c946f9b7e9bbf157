"""VAE benchmark (issue 5): decode, ours untiled and in tile grids, against diffusers' decode and tiling;
and the encode of a conditioning clip: diffusers' pipeline encodes the whole padded clip, ours only
the frames that condition (1 for image-to-video, 5 for the default video-to-video).

Full-size Wan2.2 VAE with seeded random bf16 weights, random latents. Each run reports wall time
and the device's peak allocated/reserved memory (VAE weights included); ours returns frames on
the host, diffusers' leaves the decoded video on the device. Results:
benchmarks/results/decode-<gpu>-<date>.json.
Example: python benchmarks/bench_decode.py --shapes 720x189 480x93
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

import argparse
import time
from pathlib import Path

import torch
from bench_common import ResultsFile, gib, random_model, reset_device
from bench_staging import parse_shape
from diffusers import AutoencoderKLWan

from cosmos3_offload.decode import TileGrid, decode_to_host
from cosmos3_offload.model_specs import model_spec
from cosmos3_offload.tiers import frame_size

CUDA = torch.device("cuda")
GRIDS = [(1, 1), (1, 2), (2, 2), (2, 3), (3, 4)]


def timed(fn, *args) -> dict:
    reset_device()
    start = time.perf_counter()
    try:
        fn(*args)
    except torch.OutOfMemoryError as error:
        reset_device()
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}
    torch.cuda.synchronize()
    return {
        "decode_s": round(time.perf_counter() - start, 3),
        "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
        "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()),
        "error": None,
    }


@torch.no_grad()
def diffusers_decode(vae: AutoencoderKLWan, z: torch.Tensor) -> None:
    vae.decode(z).sample.cpu()


@torch.no_grad()
def encode(vae: AutoencoderKLWan, clip: torch.Tensor) -> None:
    vae.encode(clip).latent_dist.mode().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", type=parse_shape, default=[(720, 189), (480, 93)])
    parser.add_argument("--tag", default="", help="suffix of the results file name (decode-TAG-...)")
    parser.add_argument("--encode", nargs="*", type=parse_shape, default=[(720, 189)], help="clips to encode")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results = ResultsFile(args.out, f"decode-{args.tag}" if args.tag else "decode")
    vae = random_model(AutoencoderKLWan, model_spec("nano").vae, CUDA, torch.bfloat16)
    for tier, frames in args.shapes:
        width, height = frame_size(tier, "16,9")
        z = torch.randn(
            1, 48, (frames - 1) // 4 + 1, height // 16, width // 16, generator=torch.Generator().manual_seed(0)
        )
        z = z.to(CUDA, torch.bfloat16)
        base = {"height": height, "width": width, "frames": frames, "model": "wan2.2-vae"}

        vae.disable_tiling()
        results.add(
            {
                "name": f"diffusers-untiled-{tier}p-{frames}f",
                "system": "diffusers",
                **base,
                **timed(diffusers_decode, vae, z),
            }
        )
        vae.enable_tiling()
        results.add(
            {
                "name": f"diffusers-tiling-{tier}p-{frames}f",
                "system": "diffusers",
                **base,
                **timed(diffusers_decode, vae, z),
            }
        )
        vae.disable_tiling()
        for rows, cols in GRIDS:
            grid = TileGrid(rows=rows, cols=cols)
            run = timed(decode_to_host, vae, z, grid)
            results.add(
                {
                    "name": f"ours-{rows}x{cols}-{tier}p-{frames}f",
                    "system": "ours",
                    "plan": f"{rows}x{cols} tiles, overlap {grid.overlap}",
                    **base,
                    **run,
                }
            )
    for tier, frames in args.encode:
        width, height = frame_size(tier, "16,9")
        clip = torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(1)) * 2 - 1
        clip = clip.to(CUDA, torch.bfloat16)
        base = {"height": height, "width": width, "frames": frames, "model": "wan2.2-vae"}
        vae.disable_tiling()
        results.add(
            {"name": f"diffusers-encode-{tier}p-{frames}f", "system": "diffusers", **base, **timed(encode, vae, clip)}
        )
        vae.enable_tiling()
        results.add(
            {
                "name": f"diffusers-encode-tiling-{tier}p-{frames}f",
                "system": "diffusers",
                **base,
                **timed(encode, vae, clip),
            }
        )
        vae.disable_tiling()
        for needed, mode in ((1, "i2v"), (5, "v2v")):
            run = timed(encode, vae, clip[:, :, :needed])
            results.add(
                {
                    "name": f"ours-encode-{mode}-{tier}p-{frames}f",
                    "system": "ours",
                    "plan": f"encode the first {needed} frame(s)",
                    **base,
                    **run,
                }
            )
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
