"""Registry of Cosmos3's resolution tiers, aspect ratios, flow shifts and frame-count rule."""

from __future__ import annotations

from ..errors import InputError
from .geometry import TEMPORAL_COMPRESSION

# tier -> aspect ratio -> (width, height), as Cosmos3's own tools define them.
RESOLUTION_TIERS: dict[int, dict[str, tuple[int, int]]] = {
    256: {"1,1": (256, 256), "4,3": (320, 256), "3,4": (256, 320), "16,9": (320, 192), "9,16": (192, 320)},
    480: {"1,1": (640, 640), "4,3": (736, 544), "3,4": (544, 736), "16,9": (832, 480), "9,16": (480, 832)},
    720: {"1,1": (960, 960), "4,3": (1104, 832), "3,4": (832, 1104), "16,9": (1280, 720), "9,16": (720, 1280)},
    768: {"1,1": (1024, 1024), "4,3": (1184, 880), "3,4": (880, 1184), "16,9": (1360, 768), "9,16": (768, 1360)},
}
ASPECT_RATIOS: tuple[str, ...] = ("1,1", "4,3", "3,4", "16,9", "9,16")

# Flow shift per tier (Cosmos3 defaults; 768 and the action tier 704 use the 720 value).
DEFAULT_SHIFT: dict[int, float] = {256: 3.0, 480: 5.0, 704: 10.0, 720: 10.0, 768: 10.0}


def frame_size(tier: int, aspect_ratio: str) -> tuple[int, int]:
    """(width, height) of a tier at an aspect ratio; unknown values list the choices."""
    if tier not in RESOLUTION_TIERS:
        raise InputError(f"unknown resolution tier {tier}; choose one of {', '.join(map(str, RESOLUTION_TIERS))}")
    if aspect_ratio not in ASPECT_RATIOS:
        raise InputError(f"unknown aspect ratio {aspect_ratio!r}; choose one of {' '.join(ASPECT_RATIOS)}")
    return RESOLUTION_TIERS[tier][aspect_ratio]


def check_frame_count(frames: int) -> None:
    """Frame counts are 1 (an image) or 4k+1 (the VAE's 4x temporal compression plus the first frame)."""
    step = TEMPORAL_COMPRESSION
    if frames == 1 or (frames > step and frames % step == 1):
        return
    if frames < 1:
        raise InputError(f"frame count must be 1 or 4k+1 (5, 9, ..., 189), got {frames}")
    lower = (frames - 1) // step * step + 1
    raise InputError(f"frame count must be 1 or 4k+1, got {frames}; use {lower} or {lower + step}")
