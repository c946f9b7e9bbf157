"""Which order the video decode takes its tiles in, so the mp4 can be encoded while it runs.

Frames first (vae/decode.py) makes whole frames early, for an encoder to take as they come, but holds every
tile's causal caches at once where tiles first holds one tile's. Untiled the two are one and the same. Tiled,
the decode takes frames first only when that raises no part of the request above the plan's own peak (the
denoise's, usually): the planner fit that peak into the budget (or the fit check into the free memory), so a
budget is never exceeded for the sake of the encoder; else it keeps tiles first and the mp4 is encoded after.
The bytes follow the planner's decode model (planning/memory.py `decode_bytes_and_share`), with the caches
of every tile summed instead of the largest tile's.
"""

from __future__ import annotations

from ..model.geometry import latent_size
from ..planning.memory import (
    DECODE_FIXED_BYTES,
    DECODE_LIVE_BASE,
    DECODE_LIVE_PER_FRAME,
    DECODE_SLACK,
    decode_bytes_and_share,
    peaks,
)
from ..planning.parallel import ParallelLayout
from ..planning.plan import Plan
from ..planning.request import Request
from ..planning.sizes import ModelSizes
from ..planning.tiles import TileGrid, block_region
from .config import GenerationConfig
from .planned_request import request_of


def frames_first_decode_bytes(sizes: ModelSizes, grid: TileGrid, height: int, width: int) -> int:
    """Device bytes besides the weights of decoding `height` x `width` pixel frames in `grid` frames first:
    every tile's causal caches (two frames per cached convolution) plus the largest tile's live activations."""
    frame = latent_size(height, width)
    caches = live = 0
    for tile in grid.tiles(*frame):
        areas = []
        for block in sizes.decoder_blocks:
            top, bottom, left, right = block_region(block, tile, frame)
            areas.append((block, (bottom - top) * (right - left)))
        caches += sum(2 * block.cache_channels * area for block, area in areas)
        live = max(live, max(block.in_channels * area for block, area in areas))
    per_live = DECODE_LIVE_BASE + DECODE_LIVE_PER_FRAME * grid.frames
    return int(((caches + per_live * live) * sizes.dtype_bytes + DECODE_FIXED_BYTES) * DECODE_SLACK)


def frames_first_fits(plan: Plan, sizes: ModelSizes, request: Request) -> bool:
    """Whether a frames-first decode in `plan`'s grid keeps the request within the plan's own peak."""
    grid = plan.decode_grid
    if not grid.tiled:
        return True  # one tile: the same decode
    parts = peaks(plan, sizes, request)
    tiles_first, _ = decode_bytes_and_share(sizes, grid, request.height, request.width)
    extra = frames_first_decode_bytes(sizes, grid, request.height, request.width) - tiles_first
    return parts.decode + extra <= parts.peak


def decode_frames_first(
    config: GenerationConfig, plan: Plan, measured: tuple[ModelSizes, dict | None], layout: ParallelLayout
) -> bool:
    """`frames_first_fits` for a request of a loaded model; `measured`: its `feasibility.run_sizes`."""
    sizes, sound = measured
    return frames_first_fits(plan, sizes, request_of(config, sound, layout))
