"""Conditioning frames: image-to-video and video-to-video, as diffusers' Cosmos3 pipeline defines them.

The image is resized and centre-cropped to the tier with the pipeline's own preprocessing and
anchors latent frame 0; a video's first frames (resized by the pipeline's video processor, the
last one repeated when the clip is short) anchor the latent frames `condition_frames`. The Wan2.2
encoder is causal in time, so latent frame k depends on pixel frames 0..4k only: encoding just the
frames that condition gives exactly the latents the pipeline gets by encoding the whole padded
video, at a fraction of the memory and time. Files are read before anything is loaded; a file
that cannot be used is an InputError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import _preprocess_conditioning_image
from PIL import Image, UnidentifiedImageError

from .errors import InputError


def read_image(path: Path) -> Image.Image:
    """The conditioning image as RGB; missing, unreadable or empty files are refused."""
    if not path.is_file():
        raise InputError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        raise InputError(f"image {str(path)!r} cannot be read as an image") from None
    if rgb.width == 0 or rgb.height == 0:
        raise InputError(f"image {str(path)!r} has no pixels")
    return rgb


def read_video(path: Path) -> list[Image.Image]:
    """The conditioning clip as RGB frames; missing, unreadable or frameless files are refused."""
    if not path.is_file():
        raise InputError(f"video {str(path)!r} does not exist")
    try:
        frames = iio.imread(path, index=None)
    except Exception:  # imageio raises many kinds of errors for a file it cannot decode
        raise InputError(f"video {str(path)!r} cannot be read as a video") from None
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] == 0 or 0 in frames.shape[1:3]:
        raise InputError(f"video {str(path)!r} has no frames")
    return [Image.fromarray(frame[..., :3]) for frame in frames]


def frames_to_encode(*, image: bool, video: bool, condition_frames: tuple[int, ...], temporal: int = 4) -> int:
    """Pixel frames the VAE encodes for a request: 1 for an image, through the last conditioning
    latent frame for a clip (latent frame k covers pixel frames up to temporal * k), 0 for text."""
    if image:
        return 1
    return max(condition_frames) * temporal + 1 if video else 0


def condition_pixels(
    pipe: Cosmos3OmniPipeline,
    *,
    image: Image.Image | None,
    video: list[Image.Image] | None,
    condition_frames: tuple[int, ...],
    height: int,
    width: int,
    device: torch.device,
) -> torch.Tensor:
    """[1, 3, F, H, W] in [-1, 1]: the pixel frames the conditioning latent frames depend on."""
    if image is not None:
        return _preprocess_conditioning_image(image, height=height, width=width).unsqueeze(2).to(device)
    temporal = pipe.vae.config.scale_factor_temporal
    needed = frames_to_encode(image=False, video=True, condition_frames=condition_frames, temporal=temporal)
    clip = pipe.video_processor.preprocess_video(video, height=height, width=width)[:, :, :needed]
    if clip.shape[2] < needed:  # the pipeline repeats the last frame to fill the video
        clip = torch.cat([clip, clip[:, :, -1:].expand(-1, -1, needed - clip.shape[2], -1, -1)], dim=2)
    return clip.to(device)


def conditioned_noise(
    pipe: Cosmos3OmniPipeline, pixels: torch.Tensor, indexes: tuple[int, ...], noise: torch.Tensor
) -> torch.Tensor:
    """`prepare_latents`' mix: clean latents at `indexes`, noise elsewhere. noise: [1, C, T, h, w]."""
    encoded = pipe._encode_video(pixels.to(torch.float32)).float()  # [1, C, len, h, w]
    clean = torch.zeros_like(noise)
    clean[:, :, : encoded.shape[2]] = encoded
    mask = torch.zeros(noise.shape[2], 1, 1, device=noise.device, dtype=noise.dtype)
    mask[list(indexes)] = 1.0
    return mask * clean + (1.0 - mask) * noise


@dataclass(frozen=True)
class Conditioning:
    """What conditions a generation: one image (latent frame 0) or a clip (latent frames `indexes`)."""

    image: Image.Image | None
    video: list[Image.Image] | None
    indexes: tuple[int, ...]


def read_conditioning(image: Path | None, video: Path | None, condition_frames: tuple[int, ...]) -> Conditioning | None:
    """Read the request's conditioning files (before anything is loaded); None for text-only."""
    if image is not None:
        return Conditioning(read_image(image), None, (0,))
    if video is not None:
        return Conditioning(None, read_video(video), tuple(sorted(set(condition_frames))))
    return None
