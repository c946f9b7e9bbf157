"""VAE decode within a budget: exact spatial tiles, frames leaving the device as they are decoded.

It drives diffusers' own `AutoencoderKLWan` decoder modules in two passes:

1. Low resolution, whole frame: `post_quant_conv`, the decoder's `conv_in` and mid block (whose
   attention spans the frame) for each latent frame in turn with the causal cache, as diffusers'
   `_decode` does. The results wait on the host (1024 x h x w values a latent frame: 7 MiB at 720p).
2. Per tile: the up blocks and the output head over one tile of the frame plus a halo as wide as
   the spatial reach of the convolutions still ahead, cropped after every block to what the rest
   needs. Every pixel is computed from the same inputs as in the untiled decode: no seams and
   nothing to blend; tiles differ from the untiled decode only by convolution rounding. Frames go
   through each up block `grid.frames` at a time (4: diffusers' chunks; fewer, the same computation
   thanks to the causal caches, with less memory and more time), so the device holds the weights,
   one tile's caches and a few frames of one tile.

Decoded tiles become bytes on the device and leave through pinned buffers without stopping the
decode (`HostLanding`; plain copies on the CPU). Whether every decoded value was finite is kept on
the device as the tiles go (no wait per tile) and read once at the end: NaN or infinite pixels
would become black or white bytes, so `decode_to_host` refuses them (`NonFinitePixels`).

A caller may follow and stop the decode between pieces: `on_piece(index, total)` is called before each latent
frame of the low-resolution pass and of each tile goes through the up blocks (the untiled decode is one tile),
with the piece's place among all the pieces of this decode, and what it raises ends the decode.

Tiles are independent once the low-resolution pass is done, so several processes can share a decode:
each decodes the tiles it is given (`only`) and leaves the others' pixels zero.

Two orders give the same bytes. Tiles first (the default) holds one tile's causal caches at a time, so no
frame is whole before the last tile starts (then they come as it goes). Frames first (`frames_first`) takes
every tile through latent frame t before any goes on to t + 1, keeping every tile's caches alive between
latent frames (their sum: more memory than one tile's, see app/decode_order.py), so whole frames leave from
the start and an encoder can take them as they come (`decode_to_host`'s `on_frames`). Each tile runs the same
operations on the same inputs either way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T, unpatchify
from torch import nn

from ..offload.streams import HostLanding
from ..planning.tiles import UNTILED, DecoderBlock, TileGrid, block_region
from .structure import cache_slots, decoder_blocks


class NonFinitePixels(ArithmeticError):
    """The decoder gave NaN or infinite values, which bytes cannot hold (they would be written as black frames)."""


def _cached_conv(conv: nn.Module, x: torch.Tensor, cache: list, idx: list[int]) -> torch.Tensor:
    """`conv` over x with the causal cache entry idx[0], as diffusers' decoder runs conv_in and conv_out."""
    slot = idx[0]
    keep = x[:, :, -CACHE_T:].clone()
    if keep.shape[2] < 2 and cache[slot] is not None:
        keep = torch.cat([cache[slot][:, :, -1:].to(keep.device), keep], dim=2)
    out = conv(x, cache[slot])
    cache[slot] = keep
    idx[0] += 1
    return out


def low_resolution_pass(
    vae: AutoencoderKLWan, z: torch.Tensor, on_piece: Callable[[int], None] | None = None
) -> torch.Tensor:
    """post_quant_conv, conv_in and the mid block over whole frames -> [latent frames, C, h, w] on the host;
    `on_piece(t)` is called before latent frame t (what it raises stops the pass there)."""
    decoder = vae.decoder
    x = vae.post_quant_conv(z)
    cache: list = [None] * (1 + cache_slots(decoder.mid_block))
    pin = z.device.type == "cuda"
    channels = decoder.conv_in.out_channels
    host = torch.empty(z.shape[2], channels, *z.shape[-2:], dtype=x.dtype, pin_memory=pin)
    for t in range(z.shape[2]):
        if on_piece is not None:
            on_piece(t)
        idx = [0]
        y = _cached_conv(decoder.conv_in, x[:, :, t : t + 1], cache, idx)
        y = decoder.mid_block(y, feat_cache=cache, feat_idx=idx)
        host[t].copy_(y[0, :, 0], non_blocking=pin)  # stream-ordered before the tiles read it back
    return host


class _TileDecoder:
    """The up blocks and the head over one tile, frame by frame, with the tile's own causal caches."""

    def __init__(self, vae: AutoencoderKLWan, blocks: tuple[DecoderBlock, ...], tile, frame_size, frames: int, emit):
        self.vae, self.decoder, self.blocks, self.frames, self.emit = vae, vae.decoder, blocks, frames, emit
        self.tile, self.frame_size = tile, frame_size
        self.finite: torch.Tensor | None = None  # a bool on the device: every value of the tile's output was finite
        blocks = list(self.decoder.up_blocks)
        first = 1 + cache_slots(self.decoder.mid_block)
        self.starts = [first + sum(cache_slots(b) for b in blocks[:i]) for i in range(len(blocks) + 1)]
        self.cache: list = [None] * (self.starts[-1] + 1)
        self.frame = 0

    def region(self, block: int, halo: int | None = None) -> tuple[int, int, int, int]:
        return block_region(self.blocks[block], self.tile, self.frame_size, halo)

    @staticmethod
    def crop(x: torch.Tensor, origin: tuple[int, int], region: tuple[int, int, int, int]) -> torch.Tensor:
        top, bottom, left, right = region
        return x[..., top - origin[0] : bottom - origin[0], left - origin[1] : right - origin[1]]

    def latent_frame(self, x: torch.Tensor, first_chunk: bool) -> None:
        """x: one whole low-resolution frame [1, C, 1, h, w] on the device."""
        region = self.region(0)
        self.through(0, self.crop(x, (0, 0), region), region[::2], first_chunk)

    def through(self, i: int, x: torch.Tensor, origin: tuple[int, int], first_chunk: bool) -> None:
        """Block i onwards, depth first, `frames` frames at a time (the causal caches carry the rest)."""
        if i == len(self.blocks) - 1:
            return self.head(x, origin)
        block, up = self.decoder.up_blocks[i], self.blocks[i].upsample
        for t in range(0, x.shape[2], self.frames):
            piece = x[:, :, t : t + self.frames]
            y = block(piece, feat_cache=self.cache, feat_idx=[self.starts[i]], first_chunk=first_chunk)
            region = self.region(i + 1)
            self.through(i + 1, self.crop(y, (origin[0] * up, origin[1] * up), region), region[::2], first_chunk)

    def head(self, x: torch.Tensor, origin: tuple[int, int]) -> None:
        x = self.decoder.nonlinearity(self.decoder.norm_out(x))
        x = _cached_conv(self.decoder.conv_out, x, self.cache, [self.starts[-1]])
        x = self.crop(x, origin, self.region(-1, halo=0))
        if self.vae.config.patch_size is not None:
            x = unpatchify(x, patch_size=self.vae.config.patch_size)
        finite = torch.isfinite(x).all()  # before the clamp, which would make an infinity look fine
        self.finite = finite if self.finite is None else self.finite & finite
        x = torch.clamp(x, min=-1.0, max=1.0)[0].permute(1, 2, 3, 0)  # [frames, H_tile, W_tile, 3]
        pixel = self.vae.spatial_compression_ratio
        (top, bottom), (left, right) = self.tile
        rows, cols = slice(top * pixel, bottom * pixel), slice(left * pixel, right * pixel)
        self.emit(slice(self.frame, self.frame + x.shape[0]), rows, cols, x)
        self.frame += x.shape[0]


@torch.no_grad()
def decode_tiles(
    vae: AutoencoderKLWan,
    z: torch.Tensor,
    grid: TileGrid,
    emit,
    only: Collection[int] | None = None,
    on_piece: Callable[[int, int], None] | None = None,
    *,
    frames_first: bool = False,
    on_latent_frame: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Decode raw latents z [1, C, T, h, w] tile by tile: emit(frames, rows, cols, pixels) receives
    each decoded piece, pixels [frames, H_tile, W_tile, 3] in [-1, 1] on the device. `only`: the
    indexes (in `grid.tiles` order) of the tiles to decode; default every tile. `on_piece(index, total)` is
    called before each latent frame of the low-resolution pass and of each tile decoded, `total` of them (what it
    raises stops the decode there). `frames_first`: latent frames outer, tiles inner (see the module's
    docstring). `on_latent_frame(frames)` is called after a latent frame whenever every tile has emitted the
    pixel frames [0, frames): frames first, after each; tiles first, after each of the last tile's.

    Returns a bool on z's device: whether every decoded value was finite (reading it waits for the decode)."""
    blocks = decoder_blocks(vae.decoder)
    height, width = z.shape[-2:]
    tiles = grid.tiles(height, width)
    mine = [tile for index, tile in enumerate(tiles) if only is None or index in only]
    total = z.shape[2] * (1 + len(mine))
    done = 0

    def piece(_: int = 0) -> None:
        nonlocal done
        if on_piece is not None:
            on_piece(done, total)
        done += 1

    low = low_resolution_pass(vae, z, piece)
    finite = torch.ones((), dtype=torch.bool, device=z.device)
    if frames_first:
        decoders = [_TileDecoder(vae, blocks, tile, (height, width), grid.frames, emit) for tile in mine]
        for t in range(low.shape[0]):
            frame = low[t].to(z.device, non_blocking=True)[None, :, None]  # [1, C, 1, h, w], once for every tile
            for decoder in decoders:
                piece()
                decoder.latent_frame(frame, first_chunk=t == 0)
            if on_latent_frame is not None and decoders:
                on_latent_frame(decoders[0].frame)
        for decoder in decoders:
            finite &= decoder.finite
        return finite
    for index, tile in enumerate(mine):
        decoder = _TileDecoder(vae, blocks, tile, (height, width), grid.frames, emit)
        last = index == len(mine) - 1  # the other tiles are done: its frames are whole as it goes
        for t in range(low.shape[0]):
            piece()
            decoder.latent_frame(low[t].to(z.device, non_blocking=True)[None, :, None], first_chunk=t == 0)
            if last and on_latent_frame is not None:
                on_latent_frame(decoder.frame)
        finite &= decoder.finite
    return finite


def to_bytes(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> uint8, rounding as the video writer expects."""
    return ((pixels.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def decode_to_host(
    vae: AutoencoderKLWan,
    z: torch.Tensor,
    grid: TileGrid = UNTILED,
    only: Collection[int] | None = None,
    on_piece: Callable[[int, int], None] | None = None,
    *,
    frames_first: bool = False,
    on_frames: Callable[[np.ndarray, int], None] | None = None,
) -> np.ndarray:
    """Raw latents z [1, C, T, h, w] -> uint8 frames [frames, H, W, 3] on the host (zero outside the
    tiles of `only`, when given). `on_piece`: see `decode_tiles`. Raises NonFinitePixels when a decoded
    value is NaN or infinite (waits for the decode, as the last copies do).

    `on_frames(video, done)`: `video` is the array returned in the end, being filled; its frames [0, done) are
    on the host and final. It is called with 0 before anything is decoded, with the last frames once every
    value is known finite, and between as whole frames land on the host (through the decode frames first, during
    the last tile tiles first; see `decode_tiles`)."""
    _, _, latent_frames, height, width = z.shape
    scale = vae.spatial_compression_ratio
    frames = 1 + vae.config.scale_factor_temporal * (latent_frames - 1)
    video = torch.empty(frames, height * scale, width * scale, 3, dtype=torch.uint8)
    landing = HostLanding()
    if only is not None:
        video.zero_()
    array = video.numpy()  # shares `video`'s memory
    puts = 0
    ends: deque[tuple[int, int]] = deque()  # (pieces put, frames whole) at the end of each latent frame

    def emit(f: slice, r: slice, c: slice, pixels: torch.Tensor) -> None:
        nonlocal puts
        landing.put(video[f, r, c], to_bytes(pixels))
        puts += 1

    def latent_frame_done(whole: int) -> None:
        ends.append((puts, whole))
        landed = puts - len(landing.pending)  # the landing writes its pieces in the order they were put
        ready = None
        while ends and ends[0][0] <= landed:
            ready = ends.popleft()[1]
        if ready is not None:
            on_frames(array, ready)

    if on_frames is not None:
        on_frames(array, 0)
    watch = latent_frame_done if on_frames is not None else None
    finite = decode_tiles(vae, z, grid, emit, only, on_piece, frames_first=frames_first, on_latent_frame=watch)
    landing.drain()
    if not bool(finite):
        raise NonFinitePixels("the VAE decoder gave NaN or infinite pixels")
    if on_frames is not None:
        on_frames(array, frames)
    return array
