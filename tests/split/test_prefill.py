"""Prefill runs the reasoner alone and keeps exactly the K/V the generator reads."""

from __future__ import annotations

import torch
from joint_cases import joint_case, joint_forward
from tiny_models import move_tower_to_meta, relative_error, tiny_pipeline

from cosmos3_offload.model.towers import GENERATOR
from cosmos3_offload.split.denoise import denoise
from cosmos3_offload.split.prefill import prefill


def test_prefill_needs_no_generator_weights_nor_the_reasoner_tail():
    """With the generator, the last layer's output path, `norm` and `lm_head` on meta, prefill runs and is exact."""
    pipe = tiny_pipeline("und_k_norm")
    case = joint_case(pipe, "a dog", 5)
    expected, _, _ = joint_forward(pipe, case)
    reference = prefill(pipe.transformer, case.packed["input_ids"], case.packed["text_mrope_ids"])
    last = len(pipe.transformer.layers) - 1
    tail = (f"layers.{last}.self_attn.to_out.", f"layers.{last}.mlp.", f"layers.{last}.post_attention_layernorm.")
    kept = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    move_tower_to_meta(pipe.transformer, GENERATOR, extra=tail + ("norm.", "lm_head."))
    memory = prefill(pipe.transformer, case.packed["input_ids"], case.packed["text_mrope_ids"])
    for key, ref_key in zip(memory.keys, reference.keys, strict=True):
        assert torch.equal(key, ref_key)
    pipe.transformer.load_state_dict(kept, assign=True)
    assert relative_error(denoise(pipe.transformer, case.layout, memory, case.inputs).vision, expected) <= 1e-5


def test_memory_holds_one_key_value_pair_per_layer(pipeline):
    """One [prompt tokens, kv heads, head dim] K and V per decoder layer."""
    case = joint_case(pipeline, "a dog", 5)
    memory = prefill(pipeline.transformer, case.packed["input_ids"], case.packed["text_mrope_ids"])
    config = pipeline.transformer.config
    shape = (case.packed["und_len"], config.num_key_value_heads, config.head_dim)
    assert len(memory.keys) == len(memory.values) == config.num_hidden_layers
    assert all(k.shape == shape and v.shape == shape for k, v in zip(memory.keys, memory.values, strict=True))
    assert memory.prompt_tokens == case.packed["und_len"]
    assert memory.nbytes == 2 * config.num_hidden_layers * torch.Size(shape).numel() * 4
