"""The fast preview's colour map: fitted from a VAE's own encode and decode, it draws what the decoder shows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_vae

from cosmos3_offload.vae.preview_map import (
    PreviewMap,
    colour_clips,
    decode_clips,
    encode_clips,
    fit_from_clips,
    normalized,
    pooled_pixels,
)

CPU = torch.device("cpu")


class LinearVAE(torch.nn.Module):
    """A stand-in VAE whose decode is linear in its latents: each latent pixel a patch of one colour,
    `colours @ latent`, latent frame 0 one pixel frame and every later one 4; its encoder pools and lifts the
    colours into 6 channels. Its latents are normalized with a mean and std far from 0 and 1."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.lift = torch.randn(6, 3, generator=generator)
        self.colours = torch.randn(3, 6, generator=generator)
        self.dtype = torch.float32
        self.config = SimpleNamespace(
            latents_mean=[0.5, -1.0, 2.0, 0.0, 0.3, -0.7],
            latents_std=[2.0, 0.5, 1.5, 3.0, 0.8, 1.2],
            scale_factor_temporal=4,
            scale_factor_spatial=16,
            z_dim=6,
        )

    def encode(self, pixels: torch.Tensor):
        n, _, frames, height, width = pixels.shape
        colours = pooled_pixels(pixels, (1 + (frames - 1) // 4, height // 16, width // 16), 4)
        raw = torch.einsum("lc,ncthw->nlthw", self.lift, colours)
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: raw))

    def decode(self, raw: torch.Tensor):
        colours = torch.einsum("cl,nlthw->ncthw", self.colours, raw)
        frames = torch.cat([colours[:, :, :1], colours[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
        return SimpleNamespace(sample=frames.repeat_interleave(16, dim=3).repeat_interleave(16, dim=4))


def test_pooling_takes_the_first_frame_alone_then_groups_of_four_and_patches():
    """Fails when a latent frame or pixel is paired with the wrong pixels (the map would learn colours of the
    wrong frames or places): latent frame 0 is pixel frame 0, frame k the 4 frames after 4(k-1)."""
    frames, height, width = 9, 32, 48
    t = torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1, 1)
    x = (torch.arange(width) // 16).float().view(1, 1, 1, 1, width)
    pixels = torch.cat([t.expand(1, 1, frames, height, width), x.expand(1, 1, frames, height, width)], dim=1)
    pooled = pooled_pixels(pixels, (3, 2, 3), 4)
    assert pooled[0, 0, :, 0, 0].tolist() == [0.0, 2.5, 6.5]  # frames 0 | 1-4 | 5-8
    assert pooled[0, 1, 0, 1].tolist() == [0.0, 1.0, 2.0]


def test_the_map_of_a_linear_decoder_is_the_decoder():
    """Fails when the fit pairs the wrong latents and colours, or forgets the VAE's latent normalization: for a
    decoder that is linear in its latents, the map fitted from the clips must reproduce its decode of a colour
    it never saw."""
    vae = LinearVAE()
    raw = encode_clips(vae, colour_clips(), CPU)
    colour_map = fit_from_clips(vae, raw, decode_clips(vae, raw, CPU))
    unseen = torch.tensor([0.3, -0.6, 0.8]).view(1, 3, 1, 1, 1).expand(1, 3, 5, 64, 64)
    latents = vae.encode(unseen).latent_dist.mode()
    decoded = pooled_pixels(vae.decode(latents).sample, tuple(latents.shape[2:]), 4)  # [1, 3, t, h, w]
    drawn = colour_map.apply(normalized(vae, latents)[0])  # [t, 3, h, w]
    torch.testing.assert_close(drawn, decoded[0].movedim(1, 0).clamp(-1, 1), atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def tiny() -> tuple:
    vae = tiny_vae()
    raw = encode_clips(vae, colour_clips(), CPU)
    return vae, fit_from_clips(vae, raw, decode_clips(vae, raw, CPU))


def test_the_tiny_vaes_map_reproduces_its_decode_of_constant_colours(tiny):
    """Fails when the map fitted from the tiny VAE does not draw its decode of a constant-colour latent within
    0.1 (mean absolute, RGB in [-1, 1], per latent pixel), or does no better than the one colour that fits the
    clips best (a map that ignores the latents). The random tiny VAE's decode depends only weakly on its
    latents, which bounds what a linear map can match; a trained VAE's decode is the colour itself."""
    vae, colour_map = tiny
    raw = encode_clips(vae, colour_clips(), CPU)
    flat = pooled_pixels(decode_clips(vae, raw, CPU), tuple(raw.shape[2:]), 4).mean(dim=(0, 2, 3, 4))
    drawn_errors, flat_errors = [], []
    for colour in ([0.5, -0.4, -0.2], [-0.2, 0.5, 0.1], [0.9, 0.3, -0.4], [-0.6, -0.2, -0.4]):
        image = torch.tensor(colour).view(1, 3, 1, 1, 1).expand(1, 3, 1, 128, 128)
        latents = encode_clips(vae, image, CPU)
        decoded = pooled_pixels(decode_clips(vae, latents, CPU), tuple(latents.shape[2:]), 4)[0]  # [3, 1, h, w]
        drawn = colour_map.apply(normalized(vae, latents)[0]).movedim(1, 0)
        drawn_errors.append(float((drawn - decoded).abs().mean()))
        flat_errors.append(float((flat.view(3, 1, 1, 1) - decoded).abs().mean()))
    assert max(drawn_errors) < 0.1, drawn_errors
    assert sum(drawn_errors) < sum(flat_errors), (drawn_errors, flat_errors)


def test_a_map_round_trips_through_json_and_refuses_a_wrong_shape(tiny):
    """Fails when a cached map does not read back as it was written, or a map for other channels is taken."""
    _, colour_map = tiny
    again = PreviewMap.from_json(colour_map.as_json(), colour_map.channels)
    assert torch.equal(again.weight, colour_map.weight) and torch.equal(again.bias, colour_map.bias)
    with pytest.raises(ValueError):
        PreviewMap.from_json(colour_map.as_json(), colour_map.channels + 1)
    with pytest.raises(ValueError):
        PreviewMap.from_json({"weight": [[float("nan")] * 48] * 3, "bias": [0.0] * 3}, 48)
