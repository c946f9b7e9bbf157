"""Encode frames into a file: an mp4 (H.264 through imageio-ffmpeg) or one image (PIL).

It writes exactly the path it is given; `outputs` decides that path (a temporary file beside the
target) and moves the result into place.
"""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def encode_frames(frames: np.ndarray, path: Path, fps: float) -> None:
    """frames: uint8 [T, H, W, 3]; one frame goes to an image file, more to an mp4 (by `path`'s suffix)."""
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3, frames.shape
    suffixes = IMAGE_SUFFIXES if frames.shape[0] == 1 else VIDEO_SUFFIXES
    if path.suffix.lower() not in suffixes:  # else one frame would be a JPEG named .mp4
        raise ValueError(f"{frames.shape[0]} frame(s) go to a file ending in {', '.join(suffixes)}, not {path.name!r}")
    if frames.shape[0] == 1:
        options = {} if path.suffix.lower() == ".png" else {"quality": 95}
        Image.fromarray(frames[0]).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG", **options)
    else:
        # yuv420p needs even sizes, which every Cosmos3 tier has; macro_block_size=1 keeps them exact.
        imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", quality=8, macro_block_size=1)
