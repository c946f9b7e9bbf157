"""Seeded random weights depend on (seed, name, shape) only."""

from __future__ import annotations

import torch
from torch import nn

from cosmos3_offload.loading.random_weights import CHUNK, chunk_count, fill_random_, random_value, write_chunk_


def test_value_is_independent_of_order_and_other_tensors():
    """Filling two differently ordered modules gives the same tensor under the same name."""
    a = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    fill_random_(a, seed=5)
    for name, param in reversed(list(b.named_parameters())):
        with torch.no_grad():
            param.copy_(random_value(name, param.shape, 5))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_seed_and_name_change_the_values():
    """Another seed or another name draws other values."""
    base = random_value("layers.0.w.weight", (8, 4), 0)
    assert not torch.equal(base, random_value("layers.0.w.weight", (8, 4), 1))
    assert not torch.equal(base, random_value("layers.1.w.weight", (8, 4), 0))


def test_norms_ones_biases_zeros_weights_scaled():
    """Norm scales start at one, biases at zero, matrices at std about 1/sqrt(fan_in)."""
    assert torch.equal(random_value("layers.0.input_layernorm.weight", (16,), 0), torch.ones(16))
    assert torch.equal(random_value("decoder.norm1.gamma", (16, 1, 1, 1), 0), torch.ones(16, 1, 1, 1))
    assert torch.equal(random_value("proj_in.bias", (16,), 0), torch.zeros(16))
    std = random_value("proj_in.weight", (256, 1024), 0).std().item()
    assert abs(std - 1024**-0.5) < 0.1 * 1024**-0.5


def test_chunks_can_be_written_in_any_order_and_dtype():
    """A tensor larger than one chunk gets the same value written chunk by chunk in reverse, cast on write."""
    shape = (3, CHUNK // 2 + 5)  # a little over 1.5 chunks
    expected = random_value("layers.0.big.weight", shape, 2)
    target = torch.empty(shape, dtype=torch.bfloat16)
    for chunk in reversed(range(chunk_count(shape))):
        write_chunk_("layers.0.big.weight", target, chunk, 2)
    assert chunk_count(shape) == 2
    assert torch.equal(target, expected.to(torch.bfloat16))
    assert not torch.equal(expected[:, :10], expected[:, -10:])
