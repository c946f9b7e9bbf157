"""VAE decode within a budget: spatial tiles, frames leaving the device as they are decoded.

It drives diffusers' own `AutoencoderKLWan` modules the way its `_decode` does (the causal decoder
one latent frame at a time with its feature cache), but over spatial tiles of the latent and
without keeping the video on the device: each decoded chunk of frames is clamped, moved to the
host and added into a float32 accumulator with a feathered weight, so the device holds the
weights and one tile's working set only. One tile covering the frame is exactly diffusers'
untiled decode. Overlapping tiles blend linearly across `overlap` latent pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify


@dataclass(frozen=True, kw_only=True)
class TileGrid:
    """rows x cols tiles over the latent frame, neighbours overlapping by `overlap` latent pixels."""

    rows: int = 1
    cols: int = 1
    overlap: int = 4

    def spans(self, size: int, count: int) -> list[tuple[int, int]]:
        """(start, stop) of `count` overlapping tiles covering [0, size)."""
        if count == 1:
            return [(0, size)]
        length = math.ceil((size + (count - 1) * self.overlap) / count)
        starts = [min(i * (length - self.overlap), size - length) for i in range(count)]
        return [(start, start + length) for start in starts]

    def tile_fraction(self, height: int, width: int) -> float:
        """Largest tile's area over the frame's (latent units): what the decode working set scales with."""
        rows, cols = self.spans(height, self.rows), self.spans(width, self.cols)
        return (rows[0][1] - rows[0][0]) * (cols[0][1] - cols[0][0]) / (height * width)

    def work_fraction(self, height: int, width: int) -> float:
        """All tiles' area over the frame's: the decode time relative to untiled."""
        rows, cols = self.spans(height, self.rows), self.spans(width, self.cols)
        area = sum(b - a for a, b in rows) * sum(b - a for a, b in cols)
        return area / (height * width)


UNTILED = TileGrid()


def _ramp(length: int, start: int, stop: int, size: int, overlap: int, scale: int) -> torch.Tensor:
    """Feathering weights of a tile along one axis (pixels): rising over overlaps with neighbours."""
    weight = torch.ones(length * scale)
    fade = overlap * scale
    if start > 0 and fade:
        weight[:fade] = (torch.arange(fade) + 0.5) / fade
    if stop < size and fade:
        weight[-fade:] = torch.minimum(weight[-fade:], (torch.arange(fade, 0, -1) - 0.5) / fade)
    return weight


@torch.no_grad()
def decode_to_host(vae: AutoencoderKLWan, z: torch.Tensor, grid: TileGrid = UNTILED) -> np.ndarray:
    """Raw latents z [1, C, T, h, w] -> uint8 frames [frames, H, W, 3] on the host."""
    _, _, latent_frames, height, width = z.shape
    scale = vae.spatial_compression_ratio
    frames = 1 + 4 * (latent_frames - 1)
    video = torch.zeros(frames, height * scale, width * scale, 3)  # host float32 accumulator
    total = torch.zeros(height * scale, width * scale, 1)
    x = vae.post_quant_conv(z)  # pointwise, so tiles may slice its output
    for top, bottom in grid.spans(height, grid.rows):
        for left, right in grid.spans(width, grid.cols):
            weight = _ramp(bottom - top, top, bottom, height, grid.overlap, scale)[:, None]
            weight = weight * _ramp(right - left, left, right, width, grid.overlap, scale)[None, :]
            weight = weight[..., None]  # [H_tile, W_tile, 1]
            rows, cols = slice(top * scale, bottom * scale), slice(left * scale, right * scale)
            total[rows, cols] += weight
            _decode_tile(vae, x[:, :, :, top:bottom, left:right], video, rows, cols, weight)
    video /= total
    return ((video * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _decode_tile(vae, x, video, rows, cols, weight) -> None:
    """The decoder over one tile, a latent frame at a time with its causal cache, as `_decode` does."""
    vae.clear_cache()
    frame = 0
    for index in range(x.shape[2]):
        vae._conv_idx = [0]
        out = vae.decoder(
            x[:, :, index : index + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=index == 0
        )
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        out = torch.clamp(out, min=-1.0, max=1.0)[0].permute(1, 2, 3, 0)  # [frames, H_tile, W_tile, 3]
        # Leaves the device here: the video is assembled on the host.
        video[frame : frame + out.shape[0], rows, cols] += out.float().cpu() * weight
        frame += out.shape[0]
    vae.clear_cache()
