"""Which tower each weight of `Cosmos3OmniTransformer` belongs to.

The reasoner owns the text path (`embed_tokens`, each layer's `to_q/to_k/to_v/to_out`,
`norm_q/norm_k`, `k_norm_und_for_gen`, `input_layernorm`, `post_attention_layernorm`, `mlp`, and
the final `norm` and `lm_head`); the generator owns everything that touches latent tokens (the
`*_moe_gen`, `add_*`, `norm_added_*`, `to_add_out` weights, `proj_in/proj_out`, the time embedding,
`norm_moe_gen`, and the sound/action heads). Unknown names raise, so a diffusers change that adds
a weight cannot slip into the wrong tower unnoticed.
"""

from __future__ import annotations

import re

REASONER = "reasoner"
GENERATOR = "generator"

_LAYER_PREFIX = re.compile(r"^layers\.\d+\.")
_REASONER_LAYER_PARTS = (
    "input_layernorm.",
    "post_attention_layernorm.",
    "mlp.",
    "self_attn.to_q.",
    "self_attn.to_k.",
    "self_attn.to_v.",
    "self_attn.to_out.",
    "self_attn.norm_q.",
    "self_attn.norm_k.",
    "self_attn.k_norm_und_for_gen.",
)
_GENERATOR_LAYER_PARTS = (
    "input_layernorm_moe_gen.",
    "post_attention_layernorm_moe_gen.",
    "mlp_moe_gen.",
    "self_attn.add_q_proj.",
    "self_attn.add_k_proj.",
    "self_attn.add_v_proj.",
    "self_attn.to_add_out.",
    "self_attn.norm_added_q.",
    "self_attn.norm_added_k.",
)
_REASONER_TOP = ("embed_tokens.", "norm.", "lm_head.")
_GENERATOR_TOP = (
    "proj_in.",
    "proj_out.",
    "time_embedder.",
    "norm_moe_gen.",
    "audio_proj_in.",
    "audio_proj_out.",
    "audio_modality_embed",
    "action_proj_in.",
    "action_proj_out.",
    "action_modality_embed",
)


def tower_of(name: str) -> str:
    """REASONER or GENERATOR for a parameter name of `Cosmos3OmniTransformer`."""
    layer = _LAYER_PREFIX.match(name)
    if layer:
        rest = name[layer.end() :]
        if rest.startswith(_GENERATOR_LAYER_PARTS):
            return GENERATOR
        if rest.startswith(_REASONER_LAYER_PARTS):
            return REASONER
    elif name.startswith(_GENERATOR_TOP):
        return GENERATOR
    elif name.startswith(_REASONER_TOP):
        return REASONER
    raise ValueError(f"no tower is known for the Cosmos3 weight {name!r}; update towers.py")
