"""Registry of model configurations: the embedded tiny model and the Cosmos3 sizes.

Each entry gives constructor arguments of diffusers' own classes. `tiny` is small enough for a
CPU and keeps the real structure (GQA, QK-norm, 3-D mRoPE, the Wan2.2 VAE geometry with 48
latent channels, 16x spatial and 4x temporal compression). The Cosmos3 sizes follow the published
model cards (hidden size, layers, heads) and serve random-weight runs and the planner where no
checkpoint is at hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from .tiny_tokenizer import SPECIAL_TOKENS


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Constructor arguments for `Cosmos3OmniTransformer` and `AutoencoderKLWan`."""

    name: str
    transformer: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)


_WAN22_VAE = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
}

_TINY_VAE = {**_WAN22_VAE, "base_dim": 8, "decoder_base_dim": 8, "num_res_blocks": 1}

# Cosmos3 Nano and Super carry action heads for 32 numbers a row (loaded only for action runs).
_ACTION_HEADS = {"action_gen": True, "action_dim": 32}

_TINY_TRANSFORMER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rope_axes_dim": [4, 2, 2],
    "hidden_act": "silu",
    "qk_norm_for_text": True,
    # 256 byte tokens plus the tokenizer's special tokens.
    "vocab_size": 256 + len(SPECIAL_TOKENS),
    **_ACTION_HEADS,
}

_QWEN3_STYLE = {"hidden_act": "silu", "qk_norm_for_text": True, "vocab_size": 151936, **_ACTION_HEADS}

MODEL_SPECS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(name="tiny", transformer=_TINY_TRANSFORMER, vae=_TINY_VAE),
    # The tiny model with six layers, so a streaming ring has several layers to cycle through.
    "tiny-deep": ModelSpec(name="tiny-deep", transformer={**_TINY_TRANSFORMER, "num_hidden_layers": 6}, vae=_TINY_VAE),
    "edge": ModelSpec(
        name="edge",
        transformer={
            "hidden_size": 2048,
            "intermediate_size": 9216,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "hidden_act": "relu2",
            "qk_norm_for_text": False,
            "use_und_k_norm_for_gen": True,
            "vocab_size": 131072,
        },
        vae=_WAN22_VAE,
    ),
    "nano": ModelSpec(
        name="nano",
        transformer={
            **_QWEN3_STYLE,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
        },
        vae=_WAN22_VAE,
    ),
    "super": ModelSpec(
        name="super",
        transformer={
            **_QWEN3_STYLE,
            "hidden_size": 5120,
            "intermediate_size": 25600,
            "num_hidden_layers": 64,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 128,
        },
        vae=_WAN22_VAE,
    ),
}


def embedded_tiny(checkpoint: object | None, model: str) -> bool:
    """Whether a run uses an embedded tiny model (no checkpoint): it gets the tiny request defaults."""
    return checkpoint is None and model.startswith("tiny")


def model_spec(name: str) -> ModelSpec:
    """Look up a spec by name; an unknown name lists the choices."""
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; choose one of {', '.join(MODEL_SPECS)}") from None
