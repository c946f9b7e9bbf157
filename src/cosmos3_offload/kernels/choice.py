"""The kernels one run of the split forward uses, chosen once per process and passed down explicitly.

The default (`EAGER`) is what diffusers' modules do: their eager RMSNorm, rotary and MLP, and
attention through diffusers' dispatcher with the backend the model's processor was set to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# q: [q_tokens, heads, head_dim], k/v: [kv_tokens, kv_heads, head_dim] (GQA: heads % kv_heads == 0)
# -> [q_tokens, heads, head_dim]. Exact attention; `causal` aligns the diagonal at the top left.
AttentionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class Kernels:
    """attention: None for diffusers' dispatcher, else a function with `AttentionFn`'s contract
    (called as fn(q, k, v, causal=...)); fused: run norms, QK-norm + rotary, the MLP's gate and the
    residual adds as compiled fused kernels (kernels/fused.py) instead of diffusers' eager modules."""

    attention: AttentionFn | None = None
    attention_name: str = "diffusers"
    fused: bool = False


EAGER = Kernels()
