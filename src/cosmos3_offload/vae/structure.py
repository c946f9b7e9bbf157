"""The decoder's structure as the tiled decode sees it, read off diffusers' `AutoencoderKLWan`.

Pure functions of the module tree (they work on `meta`): each up block's scale, halo, work and
cache channels (`planning.tiles.DecoderBlock`), and how many causal-cache slots a module uses.
"""

from __future__ import annotations

import math

from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample, WanResidualBlock
from torch import nn

from ..planning.tiles import DecoderBlock


def _reach(module: nn.Module) -> int:
    """How far (pixels) the spatial convolutions inside `module` see, chained."""
    return sum(m.kernel_size[-1] // 2 for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))


def _upsampler(block: nn.Module) -> WanResample | None:
    """The block's resampler (diffusers names it `upsampler` in residual blocks, `upsamplers` otherwise)."""
    up = getattr(block, "upsampler", None)
    if up is None and getattr(block, "upsamplers", None) is not None:
        up = block.upsamplers[0]
    return up if up is not None and up.mode.startswith("upsample") else None


def cache_slots(module: nn.Module) -> int:
    """Causal-cache entries the module's convolutions use, in diffusers' feat_idx counting."""
    resnets = sum(2 for m in module.modules() if isinstance(m, WanResidualBlock))
    return resnets + sum(1 for m in module.modules() if isinstance(m, WanResample) and m.mode == "upsample3d")


def decoder_blocks(decoder: nn.Module) -> tuple[DecoderBlock, ...]:
    """The up blocks and the head with their scales and halos (a pure function of the structure:
    works on `meta`). A halo is the reach of the block's convolutions plus what the blocks after
    it need, brought down through its upsampler (nearest 2x, then a convolution)."""
    blocks = list(decoder.up_blocks)
    scales, frames, scale, frame = [], [], 1, 1
    for block in blocks + [None]:
        scales.append(scale)
        frames.append(frame)
        up = _upsampler(block) if block is not None else None
        scale *= 2 if up is not None else 1
        frame *= 2 if up is not None and up.mode == "upsample3d" else 1
    need = _reach(decoder.conv_out)
    halos = [need]
    for block in reversed(blocks):
        up = _upsampler(block)
        if up is not None:
            need = math.ceil((need + _reach(up.resample)) / 2)
        need += _reach(block.resnets)
        halos.insert(0, need)
    result = []
    for block, s, f, halo in zip(blocks + [None], scales, frames, halos):
        up = _upsampler(block) if block is not None else None
        module = block if block is not None else decoder.conv_out
        macs = 0.0
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                after_up = up is not None and any(m is c for c in up.resample.modules())
                spatial = (2 * s) ** 2 if after_up else s**2
                moved = 2 * f if after_up and up.mode == "upsample3d" else f
                macs += m.weight[0].numel() * m.out_channels * spatial * moved
        if block is None:
            channels = cached = decoder.conv_out.in_channels
        else:
            channels = block.resnets[0].in_dim
            cached = sum(r.conv1.in_channels + r.conv2.in_channels for r in block.resnets)
            cached += up.dim if up is not None and up.mode == "upsample3d" else 0
        result.append(DecoderBlock(s, halo, 2 if up is not None else 1, macs, channels, cached))
    return tuple(result)
