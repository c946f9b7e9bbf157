"""Tile geometry of the VAE decode: the grid, and what each decoder block needs around a tile.

Pure arithmetic on latent pixel coordinates; `vae.structure` reads the `DecoderBlock`s off a real
decoder, `vae.decode` runs them, and the planner prices them.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from ..errors import InputError

Span = tuple[int, int]  # (start, stop), latent pixels
Tile = tuple[Span, Span]  # ((top, bottom), (left, right))


@dataclass(frozen=True, kw_only=True)
class TileGrid:
    """rows x cols tiles partitioning the latent frame; each is decoded with its own halo."""

    rows: int = 1
    cols: int = 1
    frames: int = 4  # frames taken through an up block at once (4: diffusers' chunks, fastest; 1: least memory)

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1 or self.frames < 1:
            raise InputError(f"a tile grid needs a row, a column and a frame, got {self}")

    @staticmethod
    def spans(size: int, count: int) -> list[Span]:
        """(start, stop) of `count` near-equal, disjoint spans covering [0, size)."""
        return [(size * i // count, size * (i + 1) // count) for i in range(count)]

    def tiles(self, height: int, width: int) -> list[Tile]:
        """((top, bottom), (left, right)) of every tile, in latent pixels, row by row."""
        return list(product(self.spans(height, self.rows), self.spans(width, self.cols)))

    @property
    def tiled(self) -> bool:
        return (self.rows, self.cols) != (1, 1)


UNTILED = TileGrid()


@dataclass(frozen=True)
class DecoderBlock:
    """One up block of the decoder (or its output head), as the tiling sees it."""

    scale: int  # its input's resolution over the latent's
    halo: int  # context pixels (at that resolution) its input needs around a tile
    upsample: int  # spatial factor from its input to its output
    macs: float  # multiply-adds per latent pixel and latent frame (what its time scales with)
    in_channels: int  # channels of its input
    cache_channels: int  # channels its causal caches keep, two frames each, per input-resolution pixel


def block_region(
    block: DecoderBlock, tile: Tile, frame_size: tuple[int, int], halo: int | None = None
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) at the block's input resolution that a tile needs there: the tile
    scaled up plus the halo, clipped to the frame."""
    (top, bottom), (left, right) = tile
    s, h = block.scale, block.halo if halo is None else halo
    height, width = frame_size
    return max(0, s * top - h), min(s * height, s * bottom + h), max(0, s * left - h), min(s * width, s * right + h)
