"""Prefill + denoise equals diffusers' joint `Cosmos3OmniTransformer.forward`."""

from __future__ import annotations

import pytest
import torch
from joint_cases import LONG_PROMPT, joint_case, joint_forward
from tiny_models import move_tower_to_meta, relative_error, tiny_pipeline

from cosmos3_offload.model.towers import REASONER
from cosmos3_offload.split.denoise import denoise
from cosmos3_offload.split.prefill import prefill

TOLERANCE = 1e-5


def split_forward(pipe, case):
    memory = prefill(pipe.transformer, case.packed["input_ids"], case.packed["text_mrope_ids"])
    return denoise(pipe.transformer, case.layout, memory, case.inputs)


@pytest.mark.parametrize("variant", ["qwen", "und_k_norm", "edge_relu2"])
@pytest.mark.parametrize("prompt", ["a dog", LONG_PROMPT], ids=["short", "long"])
@pytest.mark.parametrize("frames", [1, 9], ids=["image", "video"])
def test_split_equals_joint_forward(variant, prompt, frames):
    """Vision velocity of prefill + denoise matches the joint forward within 1e-5."""
    pipe = tiny_pipeline(variant)
    case = joint_case(pipe, prompt, frames)
    expected, _, _ = joint_forward(pipe, case)
    assert relative_error(split_forward(pipe, case).vision, expected) <= TOLERANCE


def test_split_keeps_conditioning_frames_clean(pipeline):
    """With conditioned latent frames (i2v/v2v layout) the split matches and predicts zero there."""
    case = joint_case(pipeline, "a dog", 13, condition_frames=(0, 1))
    expected, _, _ = joint_forward(pipeline, case)
    actual = split_forward(pipeline, case).vision
    assert relative_error(actual, expected) <= TOLERANCE
    assert torch.count_nonzero(actual[:, :, :2]) == 0 and torch.count_nonzero(actual[:, :, 2:]) > 0


def test_split_sound_and_action_tokens():
    """Sound and action heads give the joint forward's predictions too."""
    pipe = tiny_pipeline("sound_action")
    case = joint_case(pipe, "a robot arm stacks blocks", 9, sound_action=True)
    vision, sound, action = joint_forward(pipe, case)
    actual = split_forward(pipe, case)
    assert relative_error(actual.vision, vision) <= TOLERANCE
    assert relative_error(actual.sound, sound) <= TOLERANCE
    assert relative_error(actual.action, action) <= TOLERANCE


@pytest.mark.parametrize("variant", ["qwen", "sound_action"])
def test_denoise_runs_without_reasoner_weights(variant):
    """With every reasoner weight on `meta`, denoise still gives the joint forward's output."""
    pipe = tiny_pipeline(variant)
    case = joint_case(pipe, "a dog", 5, sound_action=variant == "sound_action")
    expected, _, _ = joint_forward(pipe, case)
    memory = prefill(pipe.transformer, case.packed["input_ids"], case.packed["text_mrope_ids"])
    move_tower_to_meta(pipe.transformer, REASONER)
    actual = denoise(pipe.transformer, case.layout, memory, case.inputs)
    assert relative_error(actual.vision, expected) <= TOLERANCE


def test_cfg_branches_share_latents_but_not_positions(pipeline):
    """Cond and uncond prompts of different lengths give layouts with the same tokens, shifted positions."""
    cond = joint_case(pipeline, LONG_PROMPT, 5)
    uncond = joint_case(pipeline, "", 5)
    assert cond.layout.prompt_tokens > uncond.layout.prompt_tokens
    assert cond.layout.tokens == uncond.layout.tokens
    assert not torch.equal(cond.layout.position_ids, uncond.layout.position_ids)
