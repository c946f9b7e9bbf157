"""The budgeted VAE decode: untiled it is diffusers' decode byte for byte; tiles give the same pixels."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from tiny_models import tiny_vae

from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.offload.streams import HostLanding
from cosmos3_offload.vae import decode
from cosmos3_offload.vae.decode import (
    NonFinitePixels,
    TileGrid,
    decode_tiles,
    decode_to_host,
    decoder_blocks,
    to_bytes,
)


def raw_latents(pipe, frames=3, height=12, width=20, seed=0):
    z = torch.randn(1, 48, frames, height, width, generator=torch.Generator().manual_seed(seed))
    return z / pipe._vae_latents_inv_std.view(1, -1, 1, 1, 1) + pipe._vae_latents_mean.view(1, -1, 1, 1, 1)


def diffusers_pixels(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample[0].permute(1, 2, 3, 0).float()


def tiled_pixels(vae, z, grid):
    """Our decode's [-1, 1] pixels; NaN wherever no tile wrote."""
    scale = vae.spatial_compression_ratio
    out = torch.full((1 + 4 * (z.shape[2] - 1), z.shape[3] * scale, z.shape[4] * scale, 3), float("nan"))

    def emit(frames, rows, cols, pixels):
        assert torch.isnan(out[frames, rows, cols]).all(), "tiles overlap"
        out[frames, rows, cols] = pixels.float()

    decode_tiles(vae, z, grid, emit)
    return out


@pytest.mark.parametrize("frames", [4, 1])
def test_single_tile_equals_diffusers_decode(pipeline, frames):
    """Untiled, frames decoded through the two passes (diffusers' 4-frame chunks or one frame at a time
    past the temporal upsamplers) and moved out equal `vae.decode` byte for byte."""
    z = raw_latents(pipeline)
    ours = decode_to_host(pipeline.vae, z, TileGrid(frames=frames))
    assert ours.shape == (9, 192, 320, 3)
    assert np.array_equal(ours, to_bytes(diffusers_pixels(pipeline.vae, z)).numpy())


@pytest.fixture(scope="module")
def untiled(pipeline):
    """(latents, diffusers' untiled decode of them) that every grid below is compared with, decoded once."""
    z = raw_latents(pipeline, frames=4, seed=1)
    return z, diffusers_pixels(pipeline.vae, z)


@pytest.mark.parametrize(
    "grid",
    [TileGrid(rows=1, cols=2, frames=1), TileGrid(rows=2, cols=3, frames=2), TileGrid(rows=3, cols=5, frames=4)],
    ids=str,
)
def test_tiles_give_the_untiled_pixels(pipeline, untiled, grid):
    """Tiles cover every pixel once and match the untiled decode up to fp32 convolution rounding
    (metric: max |difference| of [-1, 1] pixels; observed 0 to 2e-6), so there are no seams."""
    z, expected = untiled
    ours = tiled_pixels(pipeline.vae, z, grid)
    assert not torch.isnan(ours).any()
    assert (ours - expected).abs().max() <= 1e-5
    assert np.abs(decode_to_host(pipeline.vae, z, grid).astype(int) - to_bytes(expected).numpy()).max() <= 1


def test_bf16_tiles_match_the_untiled_bf16_decode(pipeline):
    """In bf16 (the GPU dtype) a 2x3 grid stays within bf16 rounding of the untiled decode."""
    vae = AutoencoderKLWan.from_config(pipeline.vae.config).to(torch.bfloat16)
    vae.load_state_dict(pipeline.vae.state_dict())
    z = raw_latents(pipeline, seed=2).to(torch.bfloat16)
    expected = diffusers_pixels(vae, z)
    assert (tiled_pixels(vae, z, TileGrid(rows=2, cols=3, frames=1)) - expected).abs().max() <= 2**-7


@pytest.mark.parametrize("stage", [2, 3])
def test_high_resolution_halos_are_tight(pipeline, monkeypatch, stage):
    """One pixel less context before either full-resolution up block changes pixels at the tile borders by
    far more than rounding, so the expensive stages compute no more than they must. (Before the first
    blocks the outermost pixel reaches the output only through long chains of edge taps: with the tiny
    model's random weights its effect is below fp32 rounding, so those halos are not tested this way.)"""
    z = raw_latents(pipeline, frames=2, seed=3)
    stages = list(decoder_blocks(pipeline.vae.decoder))
    stages[stage] = replace(stages[stage], halo=stages[stage].halo - 1)
    monkeypatch.setattr(decode, "decoder_blocks", lambda decoder: tuple(stages))
    ours = tiled_pixels(pipeline.vae, z, TileGrid(rows=2, cols=2, frames=1))
    assert (ours - diffusers_pixels(pipeline.vae, z)).abs().max() > 1e-4


@pytest.mark.parametrize(
    "bad, grid", [(float("inf"), TileGrid()), (float("nan"), TileGrid(rows=2, cols=2))], ids=["inf", "nan-tiled"]
)
def test_non_finite_pixels_are_refused_not_turned_into_bytes(pipeline, bad, grid):
    """Fails when a decoder giving infinite (clamped: white) or NaN (bytes 0: black) pixels returns frames."""
    vae = tiny_vae()
    vae.decoder.conv_out.bias.data.fill_(bad)
    with pytest.raises(NonFinitePixels):
        decode_to_host(vae, raw_latents(pipeline, frames=2, height=4, width=6), grid)


def test_the_piece_hook_runs_before_every_tile_and_can_stop_the_decode(pipeline):
    """Fails when `on_piece` is not called before each latent frame of the low-resolution pass and of every
    tile a rank decodes (a server could not stop a decode between them), when the pieces are not numbered
    0..total-1 of the right total (progress would stall or pass 100%), or when what it raises does not stop the
    decode before its first piece."""
    z = raw_latents(pipeline, frames=2, height=4, width=6)

    def calls(grid: TileGrid, only=None) -> int:
        seen = []
        decode_tiles(pipeline.vae, z, grid, lambda *piece: None, only, lambda index, total: seen.append((index, total)))
        assert seen == [(index, len(seen)) for index in range(len(seen))]
        return len(seen)

    frames = z.shape[2]  # latent frames: one piece each in the low-resolution pass, and in each tile
    assert calls(TileGrid()) == 2 * frames
    assert calls(TileGrid(rows=1, cols=3)) == frames + 3 * frames
    assert calls(TileGrid(rows=1, cols=3), only={0, 2}) == frames + 2 * frames

    emitted = []

    def stop(index: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decode_tiles(pipeline.vae, z, TileGrid(), lambda *piece: emitted.append(piece), None, stop)
    assert emitted == []


def test_nano_decoder_blocks():
    """Wan2.2's decoder: three 2x upsamplers; halos 13/12/10/7 latent..full-resolution pixels, 1 for the head."""
    with torch.device("meta"):
        vae = AutoencoderKLWan(**model_spec("nano").vae)
    stages = decoder_blocks(vae.decoder)
    assert [s.scale for s in stages] == [1, 2, 4, 8, 8]
    assert [s.halo for s in stages] == [13, 12, 10, 7, 1]
    assert [s.upsample for s in stages] == [2, 2, 2, 1, 1]
    assert stages[2].macs > stages[1].macs > stages[0].macs > stages[4].macs > 0


def test_spans_partition_the_frame():
    for size, count in ((45, 3), (80, 4), (23, 3), (5, 5)):
        spans = TileGrid.spans(size, count)
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(b == a2 and b > a for (a, b), (a2, _) in zip(spans, spans[1:]))
        assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1
    assert len(TileGrid(rows=2, cols=3).tiles(45, 80)) == 6
    for bad in ({"rows": 0}, {"cols": 0}, {"frames": 0}):
        with pytest.raises(ValueError):
            TileGrid(**bad)


def test_host_landing_copies_every_piece_in_place():
    video = torch.zeros(3, 4, 4, dtype=torch.uint8)
    landing = HostLanding(depth=2)
    for i in range(3):
        landing.put(video[i, :2], torch.full((2, 4), i + 1, dtype=torch.uint8))
    landing.drain()
    assert video[:, :2].tolist() == [[[i + 1] * 4] * 2 for i in range(3)] and not video[:, 2:].any()


@pytest.mark.parametrize(
    "grid, only",
    [(TileGrid(rows=2, cols=2, frames=1), None), (TileGrid(rows=1, cols=3, frames=4), {0, 2}), (TileGrid(), None)],
    ids=["2x2x1", "1x3x4-only", "untiled"],
)
def test_frames_first_gives_the_tiles_first_bytes(pipeline, untiled, grid, only):
    """Fails when taking every tile through a latent frame before the next (each tile's causal caches kept
    between them) changes a byte of the decode, of every tile or of a rank's tiles."""
    z, _ = untiled
    tiles_first = decode_to_host(pipeline.vae, z, grid, only)
    assert np.array_equal(decode_to_host(pipeline.vae, z, grid, only, frames_first=True), tiles_first)


def test_frames_first_tells_whole_frames_before_the_last_piece(pipeline, untiled):
    """Fails when `on_frames` tells frames that are not yet final, goes back, misses the first (0) or the last
    call (every frame), or tells no whole frame before the last piece (an encoder could not start before the
    decode ends): frames first from the first latent frame on, tiles first during the last tile."""
    z, _ = untiled
    grid = TileGrid(rows=2, cols=2, frames=1)
    pieces, told = [], []

    def on_frames(video: np.ndarray, done: int) -> None:
        told.append((done, len(pieces), video[:done].copy()))

    final = decode_to_host(
        pipeline.vae, z, grid, on_piece=lambda i, n: pieces.append(i), frames_first=True, on_frames=on_frames
    )
    counts = [done for done, _, _ in told]
    assert counts[0] == 0 and counts[-1] == final.shape[0] and counts == sorted(counts)
    assert all(np.array_equal(snapshot, final[:done]) for done, _, snapshot in told)
    assert any(0 < done and seen < len(pieces) for done, seen, _ in told)
    told.clear()
    pieces.clear()
    decode_to_host(pipeline.vae, z, grid, on_piece=lambda i, n: pieces.append(i), on_frames=on_frames)
    assert all(np.array_equal(snapshot, final[:done]) for done, _, snapshot in told)
    last_tile = len(pieces) - z.shape[2]  # tiles first, frames are whole from the last tile's first piece on
    assert [seen for done, seen, _ in told if 0 < done < final.shape[0]][0] > last_tile
    assert any(0 < done and seen < len(pieces) for done, seen, _ in told)
