"""A decoder layer's non-attention, non-GEMM work through kernels/fused.py, reading the weights of
diffusers' own modules.

The norms' weights and eps are read off the modules at every call and passed as tensors, so
rebound (staged, streamed) weights reuse the compiled kernels. Linears stay module calls, so an
`Fp8Linear` in their place works unchanged. Each function equals the eager module expression
it replaces bit for bit when the fused kernels run uncompiled.
"""

from __future__ import annotations

import torch
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_cosmos3 import Cosmos3NemotronRMSNorm, Cosmos3VLTextMLP
from torch import nn

from ..kernels import fused


def _norm_args(norm: nn.Module) -> tuple[torch.Tensor | None, float, bool]:
    """(weight, eps, float32_scale) of a Cosmos3 norm; weight None for `nn.Identity` (no QK-norm)."""
    if isinstance(norm, nn.Identity):
        return None, 0.0, False
    if isinstance(norm, Cosmos3NemotronRMSNorm):
        return norm.weight, norm.eps, True
    assert isinstance(norm, RMSNorm) and norm.weight is not None and norm.bias is None, type(norm).__name__
    return norm.weight, norm.eps, False


def norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a Cosmos3 RMSNorm (or Identity). x: [tokens, ...]."""
    weight, eps, float32_scale = _norm_args(module)
    if weight is None:
        return x
    return fused.rms_norm(x, weight, eps, float32_scale=float32_scale)


def norm_rotary(module: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary(module(x), cos, sin). x: [tokens, heads, head_dim]; cos, sin: [tokens, 1, head_dim]."""
    weight, eps, float32_scale = _norm_args(module)
    return fused.norm_rotary(x, weight, eps, cos, sin, float32_scale=float32_scale)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary(x, cos, sin) as one kernel. x: [tokens, heads, head_dim]."""
    return fused.norm_rotary(x, None, 0.0, cos, sin)


def join_memory(
    key_norm: nn.Module,
    memory_key: torch.Tensor,
    memory_value: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([memory_key ; apply_rotary(key_norm(key))], [memory_value ; value]), [memory + tokens, kv_heads, head_dim]."""
    weight, eps, float32_scale = _norm_args(key_norm)
    assert weight is not None, "the generator's keys always have a QK-norm"
    return fused.prepend_keys_values(
        memory_key, memory_value, key, value, weight, eps, cos, sin, float32_scale=float32_scale
    )


def mlp(module: Cosmos3VLTextMLP, x: torch.Tensor) -> torch.Tensor:
    """module(x) with its activation (SiLU gate times up, or relu^2) as one fused kernel."""
    if module.hidden_act == "relu2":
        return module.down_proj(fused.relu_square(module.up_proj(x)))
    return module.down_proj(fused.silu_mul(module.gate_proj(x), module.up_proj(x)))


def residual_mlp(
    post_norm: nn.Module, mlp_module: Cosmos3VLTextMLP, hidden: torch.Tensor, update: torch.Tensor, chunk: int | None
) -> torch.Tensor:
    """h + mlp(post_norm(h)) with h = hidden + update, over at most `chunk` tokens at a time.

    The residual add and the norm run as one kernel. hidden, update: [tokens, hidden]; `update`
    (the attention output, a temporary) is overwritten with the result, which is returned;
    `hidden` is left as it was.
    """
    weight, eps, float32_scale = _norm_args(post_norm)
    assert weight is not None, "the post-attention norm is an RMSNorm"
    assert hidden.dtype == update.dtype, (hidden.dtype, update.dtype)
    size = chunk if chunk is not None else max(hidden.shape[0], 1)
    for part, out in zip(hidden.split(size), update.split(size)):  # rows are independent
        total, normed = fused.add_rms_norm(part, out, weight, eps, float32_scale=float32_scale)
        torch.add(total, mlp(mlp_module, normed), out=out)
    return update
