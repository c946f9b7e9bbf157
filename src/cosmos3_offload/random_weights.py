"""Seeded random weights whose values depend only on (seed, tensor name, shape).

Each tensor draws from its own generator, seeded from the model seed and the tensor's name, so
the same model gets the same values whatever order its tensors are materialized in and
wherever they end up (CPU, host slab or device). Values are drawn in float32 on the CPU and
then cast, so a seed means the same weights on every machine.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn


def random_value(name: str, shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """The float32 CPU value of one tensor.

    Norm scales (`*norm*.weight`, `gamma`) are ones, biases and modality embeddings zeros, and
    every other tensor is normal with std 1/sqrt(fan_in), which keeps random activations bounded.
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "gamma" or ("norm" in name and leaf == "weight"):
        return torch.ones(shape)
    if leaf == "bias" or name.endswith("modality_embed") or len(shape) < 2:
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


@torch.no_grad()
def fill_random_(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter of a materialized module with its seeded value, in place."""
    for name, param in module.named_parameters():
        param.copy_(random_value(name, param.shape, seed))
    return module
