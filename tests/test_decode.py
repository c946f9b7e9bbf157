"""The budgeted VAE decode: one tile is diffusers' decode exactly; tiles land and blend where they should."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosmos3_offload.decode import TileGrid, _ramp, decode_to_host


def raw_latents(pipe, frames=3, height=12, width=20, seed=0):
    z = torch.randn(1, 48, frames, height, width, generator=torch.Generator().manual_seed(seed))
    return z / pipe._vae_latents_inv_std.view(1, -1, 1, 1, 1) + pipe._vae_latents_mean.view(1, -1, 1, 1, 1)


def to_bytes(video):
    return ((video * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def test_single_tile_equals_diffusers_decode(pipeline):
    """Untiled, frames decoded one latent frame at a time and moved out equal `vae.decode` byte for byte."""
    z = raw_latents(pipeline)
    with torch.no_grad():
        expected = pipeline.vae.decode(z).sample[0].permute(1, 2, 3, 0).float()
    ours = decode_to_host(pipeline.vae, z)
    assert ours.shape == (9, 192, 320, 3)
    assert np.array_equal(ours, to_bytes(expected))


@pytest.mark.parametrize("grid", [TileGrid(rows=1, cols=2, overlap=4), TileGrid(rows=2, cols=3, overlap=2)])
def test_tiles_are_separate_decodes_blended_in_place(pipeline, grid):
    """Each tile is diffusers' decode of its latent crop, placed at its pixels and feathered over the overlaps."""
    z = raw_latents(pipeline, seed=1)
    height, width = z.shape[-2:]
    accumulator = torch.zeros(9, height * 16, width * 16, 3)
    total = torch.zeros(height * 16, width * 16, 1)
    with torch.no_grad():
        for top, bottom in grid.spans(height, grid.rows):
            for left, right in grid.spans(width, grid.cols):
                tile = pipeline.vae.decode(z[..., top:bottom, left:right]).sample[0].permute(1, 2, 3, 0).float()
                weight = _ramp(bottom - top, top, bottom, height, grid.overlap, 16)[:, None]
                weight = (weight * _ramp(right - left, left, right, width, grid.overlap, 16)[None, :])[..., None]
                accumulator[:, top * 16 : bottom * 16, left * 16 : right * 16] += tile * weight
                total[top * 16 : bottom * 16, left * 16 : right * 16] += weight
    expected = to_bytes(accumulator / total)
    ours = decode_to_host(pipeline.vae, z, grid)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1  # float summation order only


def test_spans_cover_the_frame_with_the_overlap():
    """Tiles start at 0, end at the edge, overlap by at least `overlap`, and have one length."""
    grid = TileGrid(rows=3, cols=4, overlap=4)
    for size, count in ((45, 3), (80, 4), (23, 3)):
        spans = grid.spans(size, count)
        assert spans[0][0] == 0 and spans[-1][1] == size and len({b - a for a, b in spans}) == 1
        assert all(b1 - a2 >= 4 for (_, b1), (a2, _) in zip(spans, spans[1:]))
    assert grid.tile_fraction(45, 80) < 0.2 < 1 < grid.work_fraction(45, 80) < 1.5


def test_feathering_weights_sum_to_one_across_an_exact_overlap():
    """Where two tiles overlap by exactly `overlap`, their weights add up to one."""
    left = _ramp(10, 0, 10, 16, 4, 1)
    right = _ramp(10, 6, 16, 16, 4, 1)
    assert torch.allclose(left[6:] + right[:4], torch.ones(4))
    assert torch.equal(left[:6], torch.ones(6)) and torch.equal(right[4:], torch.ones(6))
