"""The elementwise and normalization math of a decoder layer, as pure functions of tensors.

Each function repeats, operation for operation and cast for cast, the eager modules it stands in
for (diffusers' `RMSNorm`, `Cosmos3NemotronRMSNorm`, the Cosmos3 rotary expression and MLP
activations), so run uncompiled it gives their results bit for bit. Weights come in as tensors
and eps as a float, never as modules: torch.compile then guards only on shapes, dtypes and
strides, and a layer whose weights were rebound to other memory reuses the compiled kernel.
kernels/fused.py compiles these; this file only states the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, float32_scale: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension. x: [..., dim], weight: [dim].

    float32_scale=False is diffusers' `RMSNorm`: the normalized rows are rounded to a half
    weight's dtype, then scaled in it (a float32 weight scales in float32 and returns float32).
    float32_scale=True is `Cosmos3NemotronRMSNorm`: scaled in float32, then rounded to x's dtype.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # float32
    if float32_scale:
        return (weight.float() * normed).to(x.dtype)
    if weight.dtype in _HALF:
        normed = normed.to(weight.dtype)
    return normed * weight


def add_rms_norm(
    residual: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float, *, float32_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + update, rms_norm of that sum): a residual add and the norm that reads it, in one pass."""
    total = residual + update
    return total, rms_norm(total, weight, eps, float32_scale=float32_scale)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [-x[d/2:], x[:d/2]] along the last dimension (diffusers' `_rotate_half`)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def norm_rotary(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    float32_scale: bool = False,
) -> torch.Tensor:
    """Per-head RMSNorm (skipped when weight is None), then rotary.

    x: [tokens, heads, head_dim]; weight: [head_dim]; cos, sin: [tokens, 1, head_dim].
    """
    if weight is not None:
        x = rms_norm(x, weight, eps, float32_scale=float32_scale)
    return x * cos + rotate_half(x) * sin


def prepend_keys_values(
    memory_key: torch.Tensor,
    memory_value: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    float32_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([memory_key ; norm_rotary(key)], [memory_value ; value]): the new keys are normalized and
    rotated straight into the joined tensor. memory_*: [memory tokens, kv_heads, head_dim];
    key, value: [tokens, kv_heads, head_dim]."""
    key = norm_rotary(key, weight, eps, cos, sin, float32_scale=float32_scale)
    return torch.cat([memory_key, key]), torch.cat([memory_value, value])


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the SwiGLU MLP's activation (`nn.SiLU` then a product, each rounded)."""
    return F.silu(gate) * up


def relu_square(up: torch.Tensor) -> torch.Tensor:
    """relu(up)^2: the relu2 MLP's activation."""
    return torch.relu(up).square()
