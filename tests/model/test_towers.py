"""Every Cosmos3 weight belongs to exactly one tower."""

from __future__ import annotations

import pytest
from tiny_models import VARIANTS, tiny_transformer

from cosmos3_offload.model.towers import GENERATOR, REASONER, tower_of


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_weight_has_a_tower(variant):
    """All parameters of every variant are classified, and both towers are non-empty."""
    towers = {tower_of(name) for name, _ in tiny_transformer(variant).named_parameters()}
    assert towers == {REASONER, GENERATOR}


@pytest.mark.parametrize(
    "name, tower",
    [
        ("embed_tokens.weight", REASONER),
        ("lm_head.weight", REASONER),
        ("norm.weight", REASONER),
        ("layers.3.mlp.up_proj.weight", REASONER),
        ("layers.3.self_attn.k_norm_und_for_gen.weight", REASONER),
        ("layers.3.mlp_moe_gen.up_proj.weight", GENERATOR),
        ("layers.0.input_layernorm_moe_gen.weight", GENERATOR),
        ("layers.0.self_attn.to_add_out.weight", GENERATOR),
        ("norm_moe_gen.weight", GENERATOR),
        ("time_embedder.linear_1.weight", GENERATOR),
        ("audio_modality_embed", GENERATOR),
    ],
)
def test_known_names(name, tower):
    """The split follows the tower lists in model/towers.py, `k_norm_und_for_gen` on the reasoner side."""
    assert tower_of(name) == tower


def test_unknown_weight_raises():
    """A weight this module does not know stops the run instead of landing in a tower by accident."""
    with pytest.raises(ValueError, match="update towers.py"):
        tower_of("layers.0.self_attn.new_gate.weight")
