"""Seeded random weights whose values depend only on (seed, tensor name, shape).

A tensor's flattened values are cut into chunks of `CHUNK` elements, each drawn from its own
generator seeded from the model seed, the tensor's name and the chunk index. So the same model
gets the same values whatever order its tensors (or chunks) are written in, by however many
threads, and wherever they end up (CPU, host slab or device); and no writer ever needs more than
one chunk of scratch memory. Values are drawn in float32 on the CPU and then cast, so a seed
means the same weights on every machine.
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from ..offload.slabs import SlabEntry

CHUNK = 1 << 22  # elements drawn by one generator (16 MiB of float32 scratch per writer)


def _kind(name: str, shape: tuple[int, ...]) -> str:
    """Norm scales (`*norm*.weight`, `gamma`) are ones, biases and modality embeddings zeros, the rest normal."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "gamma" or ("norm" in name and leaf == "weight"):
        return "ones"
    if leaf == "bias" or name.endswith("modality_embed") or len(shape) < 2:
        return "zeros"
    return "normal"


def chunk_count(shape: tuple[int, ...]) -> int:
    return max(1, math.ceil(math.prod(shape) / CHUNK))


def write_chunk_(name: str, target: torch.Tensor, chunk: int, seed: int) -> None:
    """Write chunk `chunk` of `name`'s value into `target` (any device and dtype, contiguous)."""
    shape = tuple(target.shape)
    flat = target.view(-1)[chunk * CHUNK : (chunk + 1) * CHUNK]
    kind = _kind(name, shape)
    if kind != "normal":
        flat.fill_(1.0 if kind == "ones" else 0.0)
        return
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + chunk) % 2**63)
    values = torch.empty(flat.numel()).normal_(generator=generator)
    # std 1/sqrt(fan_in) keeps random activations bounded
    flat.copy_(values.div_(math.sqrt(math.prod(shape[1:]))))


def random_value(name: str, shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """The whole float32 CPU value of one tensor."""
    value = torch.empty(tuple(shape))
    for chunk in range(chunk_count(tuple(shape))):
        write_chunk_(name, value, chunk, seed)
    return value


@torch.no_grad()
def fill_random_(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter of a materialized module with its seeded value, in place."""
    for name, param in module.named_parameters():
        for chunk in range(chunk_count(tuple(param.shape))):
            write_chunk_(name, param, chunk, seed)
    return module


@dataclass(frozen=True)
class RandomValues:
    """Seeded random values for every weight, written into their homes chunk by chunk from parallel threads."""

    seed: int

    def fill(self, targets: list[tuple[SlabEntry, torch.Tensor]]) -> None:
        tasks = [(entry, home, chunk) for entry, home in targets for chunk in range(chunk_count(entry.shape))]

        def write(task: tuple[SlabEntry, torch.Tensor, int]) -> None:
            entry, home, chunk = task
            write_chunk_(entry.names[0], home, chunk, self.seed)

        with torch.no_grad(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(write, tasks))
