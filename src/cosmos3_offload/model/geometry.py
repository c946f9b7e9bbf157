"""Cosmos3's latent geometry: how pixels and frames become latents and generator tokens.

Wan2.2's VAE compresses 16x in space and 4x in time (the first frame on its own), and the
generator patchifies latents 2x2, so one generator token covers 32x32 pixels of 4 frames. These
are facts of every Cosmos3 size we know; the loaded VAE's config is the authority at run time,
and these constants serve the planner and validation, which run before anything is loaded.
"""

from __future__ import annotations

import math

TEMPORAL_COMPRESSION = 4
SPATIAL_COMPRESSION = 16
PATCH = 2
TOKEN_PIXELS = SPATIAL_COMPRESSION * PATCH


def latent_frames(frames: int, temporal: int = TEMPORAL_COMPRESSION) -> int:
    """Latent frames of a 1 or 4k+1 frame video: the first frame alone, then one per `temporal`."""
    return (frames - 1) // temporal + 1


def latent_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of one latent frame."""
    return height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION


def generator_tokens(frames: int, height: int, width: int) -> int:
    """Noisy video tokens the generator sees for one branch."""
    return latent_frames(frames) * math.ceil(height / TOKEN_PIXELS) * math.ceil(width / TOKEN_PIXELS)


def frames_to_encode(
    *, image: bool, video: bool, condition_frames: tuple[int, ...], temporal: int = TEMPORAL_COMPRESSION
) -> int:
    """Pixel frames the VAE encodes for a request: 1 for an image, through the last conditioning
    latent frame for a clip (latent frame k covers pixel frames up to temporal * k), 0 for text."""
    if image:
        return 1
    return max(condition_frames) * temporal + 1 if video else 0
