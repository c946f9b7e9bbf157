"""A linear map from the VAE's latent channels to RGB: what a fast preview draws a latent frame with.

Fitted from the VAE itself: a small set of synthetic clips (constant colours, and smooth two-colour
gradients across and down the frame; each clip a still picture `CLIP_FRAMES` frames long, so the fit sees
both a first latent frame, encoded alone, and a later one, which stands for 4 pixel frames) is encoded, and
the encoded latents decoded again; the map is the least-squares fit (slightly ridged: the latents of flat
colours span few of the channels) from each normalized latent vector to the mean colour its patch of pixels
decodes to. So the map draws what the decoder would show, at one latent pixel per patch of pixels and
without the decoder. The caller places the VAE's groups on the device for `encode_clips` and `decode_clips`
(the encoder's, then the decoder's); the rest is arithmetic on the host.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan

CLIP_FRAMES = 5  # a first frame and one chunk of 4: the two kinds of latent frame
# Pixels a side: 4 x 4 latent pixels at 16x. Border pixels are fair samples too (the decoder shows the same
# latents the same way); a small clip keeps the fit to about 2 s on a CPU for the tiny VAE.
CLIP_SIZE = 64
CLIP_BATCH = 8  # clips through the encoder or decoder at once
LEVELS = (-1.0, 0.0, 1.0)  # each channel's values in the constant colours (27 of them)
RIDGE = 1e-4  # the ridge's weight, relative to the mean variance of a latent channel


@dataclass(frozen=True)
class PreviewMap:
    """RGB = `weight` @ latent + `bias`, RGB in [-1, 1]: `weight` [3, C], `bias` [3] (float32)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __post_init__(self) -> None:
        assert self.weight.ndim == 2 and self.weight.shape[0] == 3, self.weight.shape
        assert self.bias.shape == (3,), self.bias.shape

    @property
    def channels(self) -> int:
        return self.weight.shape[1]

    def to(self, device: torch.device) -> PreviewMap:
        """The map with its tensors on `device` (a preview places it once, where the latents are)."""
        return PreviewMap(self.weight.to(device), self.bias.to(device))

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [C, F, h, w] (on the map's device) -> RGB [F, 3, h, w] in [-1, 1], float32."""
        rgb = torch.einsum("oc,cfhw->fohw", self.weight, latents.float()) + self.bias.view(1, 3, 1, 1)
        return rgb.clamp_(-1.0, 1.0)

    def as_json(self) -> dict:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_json(cls, data: dict, channels: int) -> PreviewMap:
        """The map `as_json` wrote, for `channels` latent channels; ValueError when it is not one."""
        weight = torch.tensor(data["weight"], dtype=torch.float32)
        bias = torch.tensor(data["bias"], dtype=torch.float32)
        if weight.shape != (3, channels) or bias.shape != (3,):
            raise ValueError(f"a map of shape {tuple(weight.shape)}, {tuple(bias.shape)}; expected (3, {channels})")
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise ValueError("a map with non-finite values")
        return cls(weight, bias)


def colour_clips(size: int = CLIP_SIZE, frames: int = CLIP_FRAMES) -> torch.Tensor:
    """[N, 3, frames, size, size] float32 in [-1, 1]: still clips of every colour of `LEVELS`^3, and of a
    gradient between each pair of the RGB cube's corners, across the frame for one pair and down it for the
    next."""
    colours = [torch.tensor(c) for c in itertools.product(LEVELS, repeat=3)]
    corners = [torch.tensor(c) for c in itertools.product((-1.0, 1.0), repeat=3)]
    ramp = torch.linspace(0.0, 1.0, size)
    pictures = [c.view(3, 1, 1).expand(3, size, size) for c in colours]
    for index, (a, b) in enumerate(itertools.combinations(corners, 2)):
        share = ramp.view(1, size) if index % 2 == 0 else ramp.view(size, 1)  # across, then down
        pictures.append(a.view(3, 1, 1) + (b - a).view(3, 1, 1) * share.expand(size, size))
    still = torch.stack(pictures)  # [N, 3, size, size]
    return still.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()


def pooled_pixels(pixels: torch.Tensor, latent_shape: tuple[int, int, int], temporal: int) -> torch.Tensor:
    """Decoded pixels [N, 3, F, H, W] -> the mean colour each latent pixel stands for [N, 3, t, h, w]: latent
    frame 0 is pixel frame 0 alone, latent frame k the `temporal` pixel frames after frame (k - 1) x temporal;
    a latent pixel is an (H / h) x (W / w) patch."""
    t, h, w = latent_shape
    first = pixels[:, :, :1]
    rest = pixels[:, :, 1 : 1 + (t - 1) * temporal]
    n, c, _, height, width = pixels.shape
    rest = rest.reshape(n, c, t - 1, temporal, height, width).mean(dim=3)
    frames = torch.cat([first, rest], dim=2)  # [N, 3, t, H, W]
    return torch.nn.functional.adaptive_avg_pool3d(frames, (t, h, w))


def fit_preview_map(latents: torch.Tensor, colours: torch.Tensor) -> PreviewMap:
    """The least-squares map from normalized latents [N, C, t, h, w] to the colours [N, 3, t, h, w] they
    decode to (see `pooled_pixels`), with a bias; in float64 on the host."""
    channels = latents.shape[1]
    x = latents.detach().double().cpu().movedim(1, -1).reshape(-1, channels)  # [samples, C]
    y = colours.detach().double().cpu().movedim(1, -1).reshape(-1, 3)  # [samples, 3]
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)  # the bias's column
    gram = x.T @ x
    ridge = RIDGE * torch.diagonal(gram)[:channels].mean() * torch.eye(channels + 1, dtype=x.dtype)
    ridge[channels, channels] = 0.0  # the bias is not shrunk
    solution = torch.linalg.solve(gram + ridge, x.T @ y)  # [C + 1, 3]
    weight = solution[:channels].T.float().contiguous()
    bias = solution[channels].float().contiguous()
    assert math.isfinite(float(weight.abs().sum())), "the fit gave non-finite weights"
    return PreviewMap(weight, bias)


def normalized(vae: AutoencoderKLWan, raw: torch.Tensor) -> torch.Tensor:
    """The VAE's raw latents [N, C, t, h, w] normalized as the pipeline normalizes them (float32)."""
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=raw.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=raw.device).view(1, -1, 1, 1, 1)
    return (raw.float() - mean) / std


@torch.no_grad()
def encode_clips(vae: AutoencoderKLWan, clips: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Clips [N, 3, F, H, W] -> the encoder's raw latents (its distribution's mode) [N, C, t, h, w], float32 on
    the host; `CLIP_BATCH` clips at a time on `device` (the encoder's weights must be there)."""
    parts = []
    for batch in clips.split(CLIP_BATCH):
        encoded = vae.encode(batch.to(device=device, dtype=vae.dtype)).latent_dist.mode()
        parts.append(encoded.float().cpu())
    return torch.cat(parts)


@torch.no_grad()
def decode_clips(vae: AutoencoderKLWan, raw: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Raw latents [N, C, t, h, w] -> the decoder's pixels [N, 3, F, H, W] in [-1, 1], float32 on the host;
    `CLIP_BATCH` clips at a time on `device` (the decoder's weights must be there)."""
    parts = []
    for batch in raw.split(CLIP_BATCH):
        parts.append(vae.decode(batch.to(device=device, dtype=vae.dtype)).sample.float().cpu())
    return torch.cat(parts)


def fit_from_clips(vae: AutoencoderKLWan, raw: torch.Tensor, pixels: torch.Tensor) -> PreviewMap:
    """The map from the clips' raw latents [N, C, t, h, w] and the pixels they decode to [N, 3, F, H, W]."""
    temporal = vae.config.scale_factor_temporal
    return fit_preview_map(normalized(vae, raw), pooled_pixels(pixels, tuple(raw.shape[2:]), temporal))
