"""The generation path: tokenize, prefill each CFG branch once, denoise, decode.

Prompt templates, text/vision packing, the scheduler and the VAE normalization all come from
diffusers' `Cosmos3OmniPipeline` and its components; what this module changes is the order of
work: the reasoner runs once per prompt (`prefill`) and the loop runs the generator alone
(`denoise`) against that memory. The result equals `Cosmos3OmniPipeline.__call__` for the same
seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from tqdm.auto import tqdm

from ..loading.components import Components
from ..planning.tiles import UNTILED, TileGrid
from ..split.denoise import GeneratorInputs, GeneratorLayout, denoise_branches
from ..split.prefill import ReasonerMemory, prefill_prompts
from ..vae.decode import decode_to_host
from .config import GenerationConfig


@dataclass(frozen=True)
class Branch:
    """One CFG branch: its prompt tokens, their mRoPE ids [3, tokens] and its generator layout."""

    input_ids: torch.Tensor
    text_position_ids: torch.Tensor
    layout: GeneratorLayout


def helper_pipeline(components: Components, scheduler: UniPCMultistepScheduler) -> Cosmos3OmniPipeline:
    """diffusers' pipeline over our components, used for its templates and packing helpers."""
    return Cosmos3OmniPipeline(
        transformer=components.transformer,
        text_tokenizer=components.tokenizer,
        vae=components.vae,
        scheduler=scheduler,
        enable_safety_checker=False,
    )


def initial_noise(pipe: Cosmos3OmniPipeline, config: GenerationConfig, device: torch.device) -> torch.Tensor:
    """[1, C, T, H, W] float32 noise drawn from a CPU generator, so a seed gives the same video on any device.

    Text-to-video conditions no frame, so this is exactly the latent `prepare_latents` builds
    (its conditioning term is multiplied by zero), without encoding an all-zero video first;
    conditioning.conditioned_noise puts the clean frames of image/video conditioning in.
    """
    vae = pipe.vae.config
    shape = (
        1,
        vae.z_dim,
        (config.frames - 1) // vae.scale_factor_temporal + 1,
        config.height // vae.scale_factor_spatial,
        config.width // vae.scale_factor_spatial,
    )
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


def pack_branch(
    pipe: Cosmos3OmniPipeline,
    input_ids: list[int],
    latents: torch.Tensor,
    fps: float,
    device: torch.device,
    condition_frames: tuple[int, ...] = (),
) -> Branch:
    """Pack one prompt and the video latents into the joint layout the pipeline builds."""
    text = pipe._prepare_text_segment(input_ids, device=device)
    vision = pipe._prepare_vision_segment(
        input_vision_tokens=latents,
        has_image_condition=bool(condition_frames),
        mrope_offset=text["vision_start_temporal_offset"],
        vision_fps=fps,
        curr=text["und_len"],
        device=device,
        condition_frame_indexes=list(condition_frames),
    )
    packed = {
        **text,
        **vision,
        "position_ids": torch.cat([text["text_mrope_ids"], vision["vision_mrope_ids"]], dim=1),
        "sequence_length": text["und_len"] + vision["num_vision_tokens"],
    }
    return Branch(text["input_ids"], text["text_mrope_ids"], GeneratorLayout.from_packed(packed))


def prepare_branches(
    pipe: Cosmos3OmniPipeline,
    config: GenerationConfig,
    latents: torch.Tensor,
    condition_frames: tuple[int, ...] = (),
) -> list[Branch]:
    """[cond] or [cond, uncond], tokenized with the pipeline's templates; `condition_frames` stay clean."""
    cond_ids, uncond_ids = pipe.tokenize_prompt(
        config.prompt,
        config.negative_prompt,
        num_frames=config.frames,
        height=config.height,
        width=config.width,
        fps=config.fps,
    )
    prompts = [cond_ids, uncond_ids] if config.uses_guidance else [cond_ids]
    return [pack_branch(pipe, ids, latents, config.fps, latents.device, condition_frames) for ids in prompts]


def prefill_branches(
    pipe: Cosmos3OmniPipeline, branches: list[Branch], *, layers: Iterable[nn.Module] | None = None
) -> list[ReasonerMemory]:
    """One reasoner pass for all branches; nothing of the reasoner is needed after this."""
    prompts = [(b.input_ids, b.text_position_ids) for b in branches]
    return prefill_prompts(pipe.transformer, prompts, layers=layers)


def denoise_latents(
    pipe: Cosmos3OmniPipeline,
    config: GenerationConfig,
    branches: list[Branch],
    memories: list[ReasonerMemory],
    latents: torch.Tensor,
    *,
    progress: bool = True,
    layers: Callable[[], Iterable[nn.Module]] | None = None,
    mlp_chunk: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The sampling loop: both CFG branches through each layer, `v_u + g (v_c - v_u)`, UniPC step.

    `layers()` gives each step's layer sequence (default `model.layers`); `on_step(i)` is called
    after step i is queued (benchmarks synchronize and time there).
    """
    model = pipe.transformer
    model_dtype = memories[0].keys[0].dtype
    pairs = [(b.layout, m) for b, m in zip(branches, memories)]
    pipe.scheduler.set_timesteps(config.steps, device=latents.device)
    for index, t in enumerate(tqdm(pipe.scheduler.timesteps, desc="denoise", unit="step", disable=not progress)):
        inputs = GeneratorInputs(vision=latents.to(model_dtype), timestep=t.item())
        step_layers = None if layers is None else layers()
        predictions = denoise_branches(model, pairs, inputs, layers=step_layers, mlp_chunk=mlp_chunk)
        velocities = [p.vision.float() for p in predictions]
        if len(velocities) == 2:
            cond, uncond = velocities
            velocity = uncond + config.guidance * (cond - uncond)
        else:
            velocity = velocities[0]
        # UniPC's update wants a batch axis in front of the [1, C, T, H, W] latents.
        latents = pipe.scheduler.step(velocity.unsqueeze(0), t, latents.unsqueeze(0), return_dict=False)[0]
        latents = latents.squeeze(0)
        if on_step is not None:
            on_step(index)
    return latents


@torch.no_grad()
def decode_frames(pipe: Cosmos3OmniPipeline, latents: torch.Tensor, *, grid: TileGrid = UNTILED) -> np.ndarray:
    """Normalized latents [1, C, T, H, W] -> uint8 frames [T, H, W, 3] on the host.

    Decoded in the tiles of `grid` (one tile: diffusers' untiled decode); frames leave the device
    as they are decoded (see vae/decode.py).
    """
    vae = pipe.vae
    mean = pipe._vae_latents_mean.to(device=latents.device, dtype=vae.dtype).view(1, -1, 1, 1, 1)
    inv_std = pipe._vae_latents_inv_std.to(device=latents.device, dtype=vae.dtype).view(1, -1, 1, 1, 1)
    return decode_to_host(vae, latents.to(vae.dtype) / inv_std + mean, grid)
