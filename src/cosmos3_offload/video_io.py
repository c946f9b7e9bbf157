"""Write frames to an mp4 (H.264 through imageio-ffmpeg) or one image (PIL).

Files are written under a temporary name in the destination folder and renamed into place only
when complete, so a failure never leaves a partial output behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image


def write_frames(frames: np.ndarray, path: Path, fps: float) -> None:
    """frames: uint8 [T, H, W, 3]; one frame goes to an image file, more to an mp4."""
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3, frames.shape
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if frames.shape[0] == 1:
            options = {} if path.suffix.lower() == ".png" else {"quality": 95}
            Image.fromarray(frames[0]).save(tmp, **options)
        else:
            # yuv420p needs even sizes, which every Cosmos3 tier has; macro_block_size=1 keeps them exact.
            imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", quality=8, macro_block_size=1)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
