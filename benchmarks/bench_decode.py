"""VAE benchmark (issue 5): decode, ours untiled, in tile grids and at device budgets, against
diffusers' decode and its tiling; and the encode of a conditioning clip (diffusers' pipeline
encodes the whole clip, ours only the frames that condition: 1 for i2v, 5 for the default v2v).

Full-size Wan2.2 VAE with seeded random bf16 weights, random latents. Each run reports wall time
and the device's peak allocated/reserved memory, weights included: diffusers' runs hold the whole
VAE (1.31 GiB) and leave the video on the device; ours hold the decoder side only (1.03 GiB, what
the staged `vae` group holds during the decode) and return uint8 frames on the host. Budget runs
take the grid the planner picks for that budget and run under
`torch.cuda.set_per_process_memory_fraction` at that budget. Every run of ours is compared byte by
byte with diffusers' untiled decode of the same latents. Results:
benchmarks/results/decode-<gpu>-<date>.json.
Example: python benchmarks/bench_decode.py --shapes 720x189 480x93 --budgets 2 3 4

`--part stream` (issue 27): the request's tail from the last denoising step to the mp4 closed. For each
shape and grid: the decode alone in both orders (tiles first, frames first: same bytes, peaks compared), the
mp4 encode alone of its frames (the write-after-decode path), and the decode with the mp4 streamed (ffmpeg
taking the frames as they become final) in both orders, from the decode's start to the file closed in place,
with its ratio to the decode alone (target <= 1.2) and whether the streamed file has the bytes of the
write-after-decode one. Random weights decode to noise-like frames: the hardest content for the encoder.
Results: benchmarks/results/decode-stream-<gpu>-<date>.json.
Example: python benchmarks/bench_decode.py --part stream --shapes 720x189 --grids 1x2x2 1x1x4
(`--device cpu --model tiny --shapes 256x9` runs it in seconds anywhere.)
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import GIB, ResultsFile, gib, random_model
from bench_staging import parse_shape
from diffusers import AutoencoderKLWan

from cosmos3_offload.app.outputs import StreamedOutput, write_output
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.geometry import latent_frames, latent_size
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.model.tiers import frame_size
from cosmos3_offload.planning.memory import decode_bytes_and_share
from cosmos3_offload.planning.request import DeviceProfile
from cosmos3_offload.planning.search import DECODE_GRIDS
from cosmos3_offload.planning.sizes import ModelSizes
from cosmos3_offload.planning.tiles import TileGrid
from cosmos3_offload.planning.timing import DECODE_SECONDS_PER_PIXEL_FRAME
from cosmos3_offload.vae.decode import decode_to_host, to_bytes

CUDA = torch.device("cuda")


def parse_grid(text: str) -> TileGrid:
    """ROWSxCOLS or ROWSxCOLSxFRAMES (frames taken through an up block at once; default 4)."""
    rows, cols, *frames = (int(n) for n in text.split("x"))
    return TileGrid(rows=rows, cols=cols, frames=frames[0] if frames else TileGrid().frames)


def decode_grid_for(sizes: ModelSizes, height: int, width: int, budget_bytes: int, profile: DeviceProfile) -> TileGrid:
    """The least-work grid of the planner's `DECODE_GRIDS` whose decode of `height` x `width` pixel
    frames, decoder weights included, fits the budget, for a decode on its own (the planner itself
    picks the grid with the rest of the plan); an InputError when even the finest grid does not."""
    fitting = []
    for grid in DECODE_GRIDS:
        nbytes, work = decode_bytes_and_share(sizes, grid, height, width)
        if sizes.vae.payload + nbytes <= budget_bytes * profile.headroom:
            fitting.append((work, grid.rows * grid.cols, grid))
    if not fitting:
        raise InputError(f"no tile grid fits the decode of {width}x{height} frames in {budget_bytes / GIB:.1f} GiB")
    return min(fitting, key=lambda f: f[:2])[2]


def timed(fn, *args, cap_gib: float | None = None) -> tuple[dict, object]:
    """Run fn(*args) from a clean allocator (under a memory cap if given): (measurements, result)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_gib is None else min(1.0, cap_gib * GIB / total))
    start = time.perf_counter()
    try:
        result = fn(*args)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError as error:
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}, None
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return {
        "seconds": round(time.perf_counter() - start, 3),
        "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
        "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()),
        "error": None,
    }, result


@torch.no_grad()
def diffusers_decode(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z).sample  # left on the device, as the pipeline leaves it


def video_bytes(sample: torch.Tensor) -> np.ndarray:
    """[1, 3, F, H, W] on the device -> uint8 [F, H, W, 3] on the host, a frame at a time."""
    return np.stack([to_bytes(sample[0, :, f].permute(1, 2, 0)).cpu().numpy() for f in range(sample.shape[2])])


@torch.no_grad()
def encode(vae: AutoencoderKLWan, clip: torch.Tensor) -> None:
    vae.encode(clip).latent_dist.mode().cpu()


def compare(ours: np.ndarray, reference: np.ndarray) -> dict:
    difference = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    return {
        "max_byte_diff_vs_diffusers": int(difference.max()),
        "mean_byte_diff_vs_diffusers": float(difference.mean()),
    }


def wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def decode_alone(vae, z, grid: TileGrid, frames_first: bool) -> tuple[dict, np.ndarray]:
    """The decode to host frames on its own: (seconds and peak, the frames)."""
    reset_peak(z.device)
    start = time.perf_counter()
    frames = decode_to_host(vae, z, grid, frames_first=frames_first)
    wait_for(z.device)
    return {"seconds": round(time.perf_counter() - start, 3), "peak_allocated_gib": peak_gib(z.device)}, frames


def encode_alone(frames: np.ndarray, path: Path, fps: float) -> dict:
    """Today's write after the decode: the whole array through ffmpeg, read back, moved into place."""
    start = time.perf_counter()
    write_output(frames, path, fps)
    seconds = round(time.perf_counter() - start, 3)
    return {"seconds": seconds, "mp4_sha256": digest(path), "mp4_bytes": path.stat().st_size}


def decode_streamed(vae, z, grid: TileGrid, frames_first: bool, path: Path, fps: float) -> dict:
    """From the last denoising step (the decode's start) to the mp4 closed in place, frames streamed to ffmpeg."""
    reset_peak(z.device)
    start = time.perf_counter()
    with StreamedOutput(path, fps) as output:
        decode_to_host(vae, z, grid, frames_first=frames_first, on_frames=output.frames_ready)
        wait_for(z.device)
        decoded = time.perf_counter()
        output.finish()
    end = time.perf_counter()
    return {
        "seconds": round(end - start, 3),
        "decode_seconds": round(decoded - start, 3),
        "tail_seconds": round(end - decoded, 3),
        "peak_allocated_gib": peak_gib(z.device),
        "mp4_sha256": digest(path),
    }


def stream_part(args: argparse.Namespace) -> None:
    """Decode alone, encode alone, decode with the mp4 streamed: see the module's docstring."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = ResultsFile(args.out, f"decode-stream-{args.tag}" if args.tag else "decode-stream")
    spec = model_spec(args.model)
    vae = random_model(AutoencoderKLWan, spec.vae, device, dtype)
    vae.encoder.to("cpu")  # the decoder side only, as the staged `vae` group holds it
    vae.quant_conv.to("cpu")
    channels = vae.config.z_dim
    folder = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    for tier, frames in args.shapes:
        width, height = frame_size(tier, "16,9")
        latent = (1, channels, latent_frames(frames), *latent_size(height, width))
        z = torch.randn(*latent, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        decode_to_host(vae, z[:, :, :2], args.grids[0])  # warm-up: kernels chosen, allocator filled
        base = {"height": height, "width": width, "frames": frames, "fps": args.fps, "model": args.model}
        for grid in args.grids:
            name = f"{grid.rows}x{grid.cols}x{grid.frames}-{tier}p-{frames}f"
            alone, reference = decode_alone(vae, z, grid, frames_first=False)
            results.add({"name": f"decode-tiles-first-{name}", **base, **alone})
            first, frames_out = decode_alone(vae, z, grid, frames_first=True)
            first["same_bytes_as_tiles_first"] = bool(np.array_equal(frames_out, reference))
            results.add({"name": f"decode-frames-first-{name}", **base, **first})
            del frames_out
            whole = encode_alone(reference, folder / "whole.mp4", args.fps)
            results.add({"name": f"encode-alone-{name}", **base, **whole})
            for frames_first in (False, True):
                order = "frames-first" if frames_first else "tiles-first"
                run = decode_streamed(vae, z, grid, frames_first, folder / f"{order}.mp4", args.fps)
                run["vs_decode_alone"] = round(run["seconds"] / alone["seconds"], 3)
                run["vs_decode_then_encode"] = round(run["seconds"] / (alone["seconds"] + whole["seconds"]), 3)
                run["same_bytes_as_write_after_decode"] = run["mp4_sha256"] == whole["mp4_sha256"]
                results.add({"name": f"decode-streamed-{order}-{name}", **base, **run})
            del reference
    print(f"wrote {results.path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("decode", "stream"), default="decode")
    parser.add_argument("--device", default="cuda", help="--part stream only (cpu: a smoke run)")
    parser.add_argument("--model", default="nano", help="--part stream only: the VAE's registered size")
    parser.add_argument("--fps", type=float, default=24.0, help="--part stream only")
    parser.add_argument("--shapes", nargs="*", type=parse_shape, default=[(720, 189), (480, 93)])
    parser.add_argument("--grids", nargs="*", type=parse_grid, default=[parse_grid(g) for g in ("1x1", "1x2", "2x2")])
    parser.add_argument("--budgets", nargs="*", type=float, default=[2.0, 3.0, 4.0], help="GiB")
    parser.add_argument("--encode", nargs="*", type=parse_shape, default=[(720, 189)], help="clips to encode")
    parser.add_argument("--tag", default="", help="suffix of the results file name (decode-TAG-...)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.part == "stream":
        stream_part(args)
        return
    results = ResultsFile(args.out, f"decode-{args.tag}" if args.tag else "decode")
    spec = model_spec("nano")
    sizes = model_sizes(spec.transformer, spec.vae)
    profile = DeviceProfile()
    vae = random_model(AutoencoderKLWan, spec.vae, CUDA, torch.bfloat16)
    for tier, frames in args.shapes:
        width, height = frame_size(tier, "16,9")
        z = torch.randn(
            1, 48, latent_frames(frames), *latent_size(height, width), generator=torch.Generator().manual_seed(0)
        )
        z = z.to(CUDA, torch.bfloat16)
        base = {"height": height, "width": width, "frames": frames, "model": "wan2.2-vae"}

        vae.disable_tiling()
        run, sample = timed(diffusers_decode, vae, z)
        untiled = run["seconds"] if sample is not None else None
        reference = video_bytes(sample) if sample is not None else None
        del sample
        results.add({"name": f"diffusers-untiled-{tier}p-{frames}f", "system": "diffusers", **base, **run})
        vae.enable_tiling()
        run, sample = timed(diffusers_decode, vae, z)
        if sample is not None and reference is not None:
            run |= compare(video_bytes(sample), reference)
        del sample
        results.add({"name": f"diffusers-tiling-{tier}p-{frames}f", "system": "diffusers", **base, **run})
        vae.disable_tiling()

        # Ours holds the decoder side only, as the staged `vae` group does.
        vae.encoder.to("cpu")
        vae.quant_conv.to("cpu")
        chosen = {}
        for budget in args.budgets:
            try:
                chosen[budget] = decode_grid_for(sizes, height, width, int(budget * GIB), profile)
            except InputError:
                chosen[budget] = None
        runs = [(grid, None) for grid in args.grids] + [(g, b) for b, g in chosen.items() if g is not None]
        for grid, budget in runs:
            nbytes, work = decode_bytes_and_share(sizes, grid, height, width)  # pixel sizes
            run, frames_out = timed(decode_to_host, vae, z, grid, cap_gib=budget)
            if frames_out is not None and reference is not None:
                run |= compare(frames_out, reference)
            if untiled and run.get("seconds"):
                run["vs_diffusers_untiled"] = round(run["seconds"] / untiled, 3)
            name = f"ours-{grid.rows}x{grid.cols}x{grid.frames}" + (f"-budget-{budget:g}gib" if budget else "")
            results.add(
                {
                    "name": f"{name}-{tier}p-{frames}f",
                    "system": "ours",
                    "plan": f"{grid.rows}x{grid.cols} tiles"
                    + (f", the planner's pick for {budget:g} GiB" if budget else ""),
                    "cap_gib": budget,
                    **base,
                    **run,
                    "predicted": {
                        "peak_allocated_gib": gib(sizes.vae.payload + nbytes),
                        "seconds": round(DECODE_SECONDS_PER_PIXEL_FRAME * height * width * frames * work, 2),
                        "work_vs_untiled": round(work, 3),
                    },
                }
            )
        vae.encoder.to(CUDA)
        vae.quant_conv.to(CUDA)
    for tier, frames in args.encode:
        width, height = frame_size(tier, "16,9")
        clip = torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(1)) * 2 - 1
        clip = clip.to(torch.bfloat16)
        base = {"height": height, "width": width, "frames": frames, "model": "wan2.2-vae"}
        whole = clip.to(CUDA)  # the pipeline moves the whole clip to the device
        vae.disable_tiling()
        run, _ = timed(encode, vae, whole)
        results.add({"name": f"diffusers-encode-{tier}p-{frames}f", "system": "diffusers", **base, **run})
        vae.enable_tiling()
        run, _ = timed(encode, vae, whole)
        results.add({"name": f"diffusers-encode-tiling-{tier}p-{frames}f", "system": "diffusers", **base, **run})
        vae.disable_tiling()
        del whole
        # Ours holds the encoder side only, as the staged `vae_encoder` group does.
        vae.decoder.to("cpu")
        vae.post_quant_conv.to("cpu")
        for needed, mode in ((1, "i2v"), (5, "v2v")):
            run, _ = timed(encode, vae, clip[:, :, :needed].to(CUDA))  # only these frames reach the device
            results.add(
                {
                    "name": f"ours-encode-{mode}-{tier}p-{frames}f",
                    "system": "ours",
                    "plan": f"encode the first {needed} frame(s)",
                    **base,
                    **run,
                }
            )
        vae.decoder.to(CUDA)
        vae.post_quant_conv.to(CUDA)
    print(f"wrote {results.path}")


if __name__ == "__main__":
    main()
