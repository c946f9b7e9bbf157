"""Tiny Cosmos3 models in the structural variants the tests cover, and test-only tools."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, Cosmos3OmniTransformer, UniPCMultistepScheduler
from torch import nn

from cosmos3_offload.loading.random_weights import fill_random_
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.model.tiny_tokenizer import build_tiny_tokenizer
from cosmos3_offload.model.towers import tower_of

# Structural variants of the tiny transformer: Qwen-style (QK-norm on text), the
# `k_norm_und_for_gen` variant, the Edge-style relu^2 / Nemotron-norm variant, and sound + action heads.
VARIANTS = {
    "qwen": {},
    "und_k_norm": {"qk_norm_for_text": False, "use_und_k_norm_for_gen": True},
    "edge_relu2": {"hidden_act": "relu2", "qk_norm_for_text": False, "use_und_k_norm_for_gen": True},
    "sound_action": {"sound_gen": True, "sound_dim": 8, "action_gen": True, "action_dim": 32},
}


def tiny_transformer(variant: str = "qwen", seed: int = 0) -> Cosmos3OmniTransformer:
    spec = model_spec("tiny")
    return fill_random_(Cosmos3OmniTransformer(**{**spec.transformer, **VARIANTS[variant]}), seed).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    return fill_random_(AutoencoderKLWan(**model_spec("tiny").vae), seed).eval()


def flow_unipc(shift: float) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)


def tiny_pipeline(variant: str = "qwen", shift: float = 3.0) -> Cosmos3OmniPipeline:
    return Cosmos3OmniPipeline(
        transformer=tiny_transformer(variant),
        text_tokenizer=build_tiny_tokenizer(),
        vae=tiny_vae(),
        scheduler=flow_unipc(shift),
        enable_safety_checker=False,
    )


def move_tower_to_meta(model: nn.Module, tower: str, extra: tuple[str, ...] = ()) -> None:
    """Replace every weight of `tower` (and the names in `extra`) with a meta tensor: any use of one fails."""
    for name, param in list(model.named_parameters()):
        if tower_of(name) == tower or name.startswith(extra):
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            module._parameters[leaf] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def diffusers_latents(pipe, config, **extra):
    """Latents of Cosmos3OmniPipeline.__call__ for `config` (extra: image=..., video=...)."""
    return diffusers_output(pipe, config, output_type="latent", **extra).video


def diffusers_output(pipe, config, *, output_type: str, **extra):
    """Cosmos3OmniPipeline.__call__'s output for `config` (extra: image=..., enable_sound=..., ...)."""
    return pipe(
        prompt=config.prompt,
        negative_prompt=config.negative_prompt,
        num_frames=config.frames,
        height=config.height,
        width=config.width,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance,
        generator=torch.Generator("cpu").manual_seed(config.seed),
        output_type=output_type,
        enable_safety_check=False,
        **extra,
    )
