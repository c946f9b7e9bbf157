"""The attention math both halves of the split share: rotary tables and the attention call.

The joint forward computes cos/sin for the whole sequence and slices it; every entry depends
only on its own position (an outer product, then cos/sin), so computing one segment alone gives
the same values bit for bit. The attention call goes through diffusers' dispatcher with the
backend the model's processor was set to, as the joint forward does.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_cosmos3 import (
    Cosmos3OmniTransformer,
    Cosmos3PackedMoTAttention,
    _rotate_half,
)

from ..kernels.choice import EAGER, Kernels


def rotary_tables(
    model: Cosmos3OmniTransformer, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [tokens, 1, head_dim] for mRoPE ids [3, tokens] (or [tokens])."""
    ids = position_ids.unsqueeze(0) if position_ids.ndim == 1 else position_ids.unsqueeze(1)  # [3, 1, tokens]
    cos, sin = model.rotary_emb(position_ids=ids, device=position_ids.device, dtype=dtype)
    return cos.squeeze(0).unsqueeze(1), sin.squeeze(0).unsqueeze(1)  # [tokens, 1, head_dim]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; the expression of diffusers' Cosmos3 attention processor."""
    return x * cos + _rotate_half(x) * sin


def attend(
    attn: Cosmos3PackedMoTAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    kernels: Kernels = EAGER,
) -> torch.Tensor:
    """q: [q_tokens, heads, head_dim], k/v: [kv_tokens, kv_heads, head_dim] -> [q_tokens, heads * head_dim]."""
    if kernels.attention is not None:
        return kernels.attention(q, k, v, causal=causal).flatten(-2, -1)
    out = dispatch_attention_fn(
        q.unsqueeze(0),
        k.unsqueeze(0),
        v.unsqueeze(0),
        is_causal=causal,
        enable_gqa=True,
        backend=attn.processor._attention_backend,
        parallel_config=attn.processor._parallel_config,
    )
    return out.squeeze(0).flatten(-2, -1)
