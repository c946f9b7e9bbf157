"""Encode conditioning frames: image-to-video and video-to-video, as diffusers' Cosmos3 pipeline
defines them.

The image is resized and centre-cropped to the tier with the pipeline's own preprocessing and
anchors latent frame 0; a video's first frames (resized by the pipeline's video processor, the
last one repeated when the clip is short) anchor the latent frames `condition_frames`. The Wan2.2
encoder is causal in time, so latent frame k depends on pixel frames 0..4k only: encoding just the
frames that condition gives exactly the latents the pipeline gets by encoding the whole padded
video, at a fraction of the memory and time. (Reading the files is the app's: `app.inputs`.)
"""

from __future__ import annotations

import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import _preprocess_conditioning_image
from PIL import Image

from ..model.geometry import frames_to_encode


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


def action_pixels(
    pipe: Cosmos3OmniPipeline, clip, tier: int, frames: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """([1, 3, frames, H, W] in [-1, 1], [canvas h, w, content h, w]): an action run's first `frames`
    conditioning frames (the last repeated when the clip is short) scaled down into the content size and
    padded to the tier's canvas, by the pipeline's own helper."""
    pixels, image_size, _, _ = pipe._prepare_action_video_conditioning(
        clip, tier, frames, device=device, dtype=torch.float32
    )
    return pixels, image_size


def conditioned_noise(
    pipe: Cosmos3OmniPipeline,
    pixels: torch.Tensor,
    indexes: tuple[int, ...],
    noise: torch.Tensor,
    image_size: torch.Tensor | None = None,
) -> torch.Tensor:
    """`prepare_latents`' mix: clean latents at `indexes`, noise elsewhere. noise: [1, C, T, h, w].
    `image_size` (an action run's): the latents are cropped from the canvas to the content first."""
    encoded = pipe._encode_video(pixels.to(torch.float32)).float()  # [1, C, len, h, w]
    if image_size is not None:
        encoded = pipe._remove_action_video_padding_from_latent(encoded, image_size)
    clean = torch.zeros_like(noise)
    clean[:, :, : encoded.shape[2]] = encoded
    mask = torch.zeros(noise.shape[2], 1, 1, device=noise.device, dtype=noise.dtype)
    mask[list(indexes)] = 1.0
    return mask * clean + (1.0 - mask) * noise
