"""The generation path's phases: tokenize, prefill each CFG branch once, denoise, decode (generation_path.py's
`generate` runs them, in order, for every door).

Prompt templates, text/vision packing, the scheduler and the VAE normalization all come from
diffusers' `Cosmos3OmniPipeline` and its components; what this module changes is the order of
work: the reasoner runs once per prompt (`prefill`) and the loop runs the generator alone
(`denoise`) against that memory. The result equals `Cosmos3OmniPipeline.__call__` for the same
seed.

On several processes (a `ProcessMesh`), a rank runs the branches `mesh_branches` gives it and its
row block of their tokens; the velocities of both CFG branches meet once a step
(`ProcessMesh.gather_branches`), so every rank takes the same scheduler step and holds the same
latents throughout.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from tqdm.auto import tqdm

from ..kernels.choice import EAGER, Kernels
from ..loading.components import Components
from ..model.geometry import latent_frames
from ..parallel.mesh import ProcessMesh
from ..parallel.ulysses import SequenceShards
from ..planning.tiles import UNTILED, TileGrid
from ..split.denoise import (
    GeneratorInputs,
    GeneratorLayout,
    GeneratorPrediction,
    embed_branches,
    read_out_predictions,
    run_decoder_stack,
)
from ..split.prefill import ReasonerMemory, prefill_prompts
from ..stepcache.seacache import SeaCache
from ..vae.decode import decode_to_host
from ..vae.encode import condition_pixels, conditioned_noise
from .action_input import ActionInput
from .config import GenerationConfig
from .inputs import Conditioning


class Sound(NamedTuple):
    """A decoded audio track: float32 waveform [channels, samples] in [-1, 1] at `sample_rate` Hz."""

    waveform: np.ndarray
    sample_rate: int


class ActionTokens(NamedTuple):
    """An action run's tokens in the joint layout: the action latents [chunk, action_dim] and the
    indexes of those given clean (all of them in forward dynamics)."""

    latents: torch.Tensor
    clean: tuple[int, ...]


class ActionPacking(NamedTuple):
    """What the branches of an action run need: its input (mode, view), its tokens and the canvas
    (height, width) the caption states."""

    action: ActionInput
    tokens: ActionTokens
    canvas: tuple[int, int]


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
        sound_tokenizer=components.sound_tokenizer,
        enable_safety_checker=False,
        default_use_system_prompt=components.options.use_system_prompt,
        use_native_flow_schedule=components.options.native_flow_schedule,
    )


def noise_generator(config: GenerationConfig) -> torch.Generator:
    """The CPU generator every noise of a request is drawn from, in the pipeline's order (vision, sound)."""
    return torch.Generator(device="cpu").manual_seed(config.seed)


def latent_shape(pipe: Cosmos3OmniPipeline, config: GenerationConfig) -> tuple[int, int, int, int, int]:
    """[1, C, T, H, W]: the video latents of `config`'s frames and size, as `prepare_latents` shapes them."""
    vae = pipe.vae.config
    return (
        1,
        vae.z_dim,
        latent_frames(config.frames, vae.scale_factor_temporal),
        config.height // vae.scale_factor_spatial,
        config.width // vae.scale_factor_spatial,
    )


def initial_noise(
    pipe: Cosmos3OmniPipeline,
    config: GenerationConfig,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[1, C, T, H, W] float32 noise drawn from a CPU generator, so a seed gives the same video on any device.

    Text-to-video conditions no frame, so this is exactly the latent `prepare_latents` builds
    (its conditioning term is multiplied by zero), without encoding an all-zero video first;
    conditioning.conditioned_noise puts the clean frames of image/video conditioning in.
    """
    generator = noise_generator(config) if generator is None else generator
    return randn_tensor(latent_shape(pipe, config), generator=generator, device=device, dtype=torch.float32)


def initial_sound_noise(
    pipe: Cosmos3OmniPipeline,
    config: GenerationConfig,
    device: torch.device,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """[sound_dim, T] float32 noise for the audio track, drawn after the video's as `prepare_latents` does.

    T covers the video's duration at the sound tokenizer's latent rate (its sampling rate over its hop).
    """
    samples = int(config.frames / config.fps * pipe.sound_tokenizer.config.sampling_rate)
    hop = pipe.sound_tokenizer._hop_size
    shape = (pipe.transformer.config.sound_dim, (samples + hop - 1) // hop)
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


def pack_branch(
    pipe: Cosmos3OmniPipeline,
    input_ids: list[int],
    latents: torch.Tensor,
    fps: float,
    device: torch.device,
    condition_frames: tuple[int, ...] = (),
    sound: torch.Tensor | None = None,
    action: ActionTokens | None = None,
) -> Branch:
    """Pack one prompt, the video latents (and the sound latents, the action tokens) into the joint layout
    the pipeline builds."""
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
    audio: dict = {}
    if sound is not None:
        audio = pipe._prepare_sound_segment(
            input_sound_tokens=sound,
            mrope_offset=text["vision_start_temporal_offset"],
            sound_fps=float(pipe.transformer.config.sound_latent_fps),
            curr=text["und_len"] + vision["num_vision_tokens"],
            device=device,
        )
    acting: dict = {}
    if action is not None:
        acting = pipe._prepare_action_segment(
            input_action_tokens=action.latents,
            condition_frame_indexes=list(action.clean),
            mrope_offset=text["vision_start_temporal_offset"],
            action_fps=fps,
            curr=text["und_len"] + vision["num_vision_tokens"] + audio.get("sound_len", 0),
            device=device,
        )
    mrope = [text["text_mrope_ids"], vision["vision_mrope_ids"]]
    mrope += [segment[f"{name}_mrope_ids"] for name, segment in (("sound", audio), ("action", acting)) if segment]
    packed = {
        **text,
        **vision,
        **audio,
        **acting,
        "position_ids": torch.cat(mrope, dim=1),
        "sequence_length": text["und_len"]
        + vision["num_vision_tokens"]
        + audio.get("sound_len", 0)
        + acting.get("action_len", 0),
    }
    return Branch(text["input_ids"], text["text_mrope_ids"], GeneratorLayout.from_packed(packed))


@dataclass(frozen=True)
class PromptTemplates:
    """The switches of the pipeline's prompt templates, with `tokenize_prompt`'s defaults (a diffusers call
    may set them; `use_system_prompt` None: the pipeline's own default)."""

    use_system_prompt: bool | None = None
    add_resolution_template: bool = True
    add_duration_template: bool = True


def prepare_branches(
    pipe: Cosmos3OmniPipeline,
    config: GenerationConfig,
    latents: torch.Tensor,
    condition_frames: tuple[int, ...] = (),
    sound: torch.Tensor | None = None,
    templates: PromptTemplates = PromptTemplates(),
    action: ActionPacking | None = None,
) -> list[Branch]:
    """[cond] or [cond, uncond], tokenized with the pipeline's templates; `condition_frames` stay clean.
    An `action` run (its input, tokens and canvas): the prompt is the pipeline's action caption at the
    canvas size, the negative prompt goes in as it is, and the action tokens follow the video's."""
    height, width = (config.height, config.width) if action is None else action.canvas
    cond_ids, uncond_ids = pipe.tokenize_prompt(
        config.prompt,
        config.negative_prompt,
        num_frames=config.frames,
        height=height,
        width=width,
        fps=config.fps,
        use_system_prompt=templates.use_system_prompt,
        add_resolution_template=templates.add_resolution_template,
        add_duration_template=templates.add_duration_template,
        action_mode=None if action is None else action.action.mode,
        action_view_point=None if action is None else action.action.view,
    )
    prompts = [cond_ids, uncond_ids] if config.uses_guidance else [cond_ids]
    tokens = None if action is None else action.tokens
    return [
        pack_branch(pipe, ids, latents, config.fps, latents.device, condition_frames, sound, tokens) for ids in prompts
    ]


def prefill_branches(
    pipe: Cosmos3OmniPipeline,
    branches: list[Branch],
    *,
    layers: Iterable[nn.Module] | None = None,
    kernels: Kernels = EAGER,
) -> list[ReasonerMemory]:
    """One reasoner pass for all branches; nothing of the reasoner is needed after this."""
    prompts = [(b.input_ids, b.text_position_ids) for b in branches]
    return prefill_prompts(pipe.transformer, prompts, layers=layers, kernels=kernels)


@dataclass(frozen=True)
class Sampling:
    """How a distilled checkpoint samples (all None: the pipeline's UniPC loop): its fixed sigmas, the
    generator its stochastic Euler steps re-noise from, and (mask [T, 1, 1], clean latents) to put the
    conditioned frames back after each step, as diffusers' distilled modular pipeline does."""

    distilled_sigmas: tuple[float, ...] | None = None
    generator: torch.Generator | None = None
    anchor: tuple[torch.Tensor, torch.Tensor] | None = None


class Latents(NamedTuple):
    """What the loop denoises: video [1, C, T, H, W], with sound audio [sound_dim, T'], in an action run
    the actions [chunk, action_dim] (float32)."""

    vision: torch.Tensor
    sound: torch.Tensor | None = None
    action: torch.Tensor | None = None


def denoise_latents(
    pipe: Cosmos3OmniPipeline,
    config: GenerationConfig,
    branches: list[Branch],
    memories: list[ReasonerMemory],
    latents: Latents,
    *,
    progress: bool = True,
    layers: Callable[[], Iterable[nn.Module]] | None = None,
    mlp_chunk: int | None = None,
    on_step: Callable[[int], None] | None = None,
    sampling: Sampling | None = None,
    before_step: Callable[[int, int], None] | None = None,
    kernels: Kernels = EAGER,
    step_cache: SeaCache | None = None,
    mesh: ProcessMesh | None = None,
    action: ActionInput | None = None,
    after_step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    interrupted: Callable[[], bool] | None = None,
    on_denoised: Callable[[int, Callable[[], torch.Tensor]], None] | None = None,
) -> Latents:
    """The sampling loop: both CFG branches through each layer, `v_u + g (v_c - v_u)`, a scheduler step
    per modality (the sound's on its own copy of the schedule, as the pipeline keeps one per modality).
    `sampling` says how a distilled checkpoint's few-step schedule runs (see `Sampling`).

    `layers()` gives each step's layer sequence (default `model.layers`); `before_step(i, steps)` is
    called before step i (it sets the FP8 precision); `on_step(i)` after step i is queued
    (benchmarks synchronize and time there). With a `step_cache`, a step it reuses runs no decoder
    layer at all: `layers()` is not called, so a streamed generator copies nothing that step and its
    ring stays as the last computed step left it (the next step's first layers already in their slots).
    With a `mesh`, `branches` are this rank's (see `mesh_branches`) and every rank of the mesh calls this.
    An `action` run's actions get their own copy of the schedule too and step only when some are noisy;
    their velocity and values past the embodiment's width stay zero, as in the pipeline.
    `after_step(i, t, video latents)` (a diffusers callback) returns the latents the loop goes on with;
    while `interrupted()` is true the remaining steps are skipped, as diffusers' `interrupt` skips them.
    `on_denoised(i, denoised)` (a preview) is called after step i with a function that gives step i's estimate of
    the clean video latents, `x_t - sigma * v` float32 (conditioned frames as they are kept), computed only when
    called; nothing it does changes the loop's latents.
    """
    model = pipe.transformer
    model_dtype = memories[0].keys[0].dtype
    pairs = [(b.layout, m) for b, m in zip(branches, memories)]
    sampling = sampling or Sampling()
    set_timesteps(pipe, config.steps, latents.vision.device, sampling.distilled_sigmas)
    vision, sound, acts = latents
    sound_scheduler = copy.deepcopy(pipe.scheduler) if sound is not None else None
    action_scheduler = copy.deepcopy(pipe.scheduler) if acts is not None else None
    domain_id = None if action is None else torch.tensor([action.domain_id], device=vision.device)
    timesteps = pipe.scheduler.timesteps
    sequence = None if mesh is None else mesh.sequence
    for index, t in enumerate(tqdm(timesteps, desc="denoise", unit="step", disable=not progress)):
        if interrupted is not None and interrupted():
            continue
        if before_step is not None:
            before_step(index, len(timesteps))
        inputs = GeneratorInputs(
            vision=vision.to(model_dtype),
            timestep=t.item(),
            sound=None if sound is None else sound.to(model_dtype),
            action=None if acts is None else acts.to(model_dtype),
            action_domain_id=domain_id,
        )
        sigma = float(pipe.scheduler.sigmas[index])
        predictions = _predict(
            model, pairs, inputs, (index, len(timesteps), sigma), step_cache, layers, mlp_chunk, kernels, sequence
        )
        predictions = all_branches(predictions, mesh)
        velocity = _guided([p.vision for p in predictions], config)
        noisy = vision
        vision = _step(pipe.scheduler, velocity, t, vision, sampling)
        if sampling.anchor is not None:
            mask, clean = sampling.anchor
            vision = mask * clean + (1.0 - mask) * vision
        if on_denoised is not None:
            on_denoised(index, functools.partial(_denoised, noisy, velocity, sigma, sampling.anchor))
        if sound is not None:
            sound = _step(sound_scheduler, _guided([p.sound for p in predictions], config), t, sound, sampling)
        if acts is not None and action.predicts_actions:
            velocities = [p.action.clone() for p in predictions]
            for velocity in velocities:
                velocity[:, action.width :] = 0
            acts = _step(action_scheduler, _guided(velocities, config), t, acts, sampling)
            acts[:, action.width :] = 0
        if after_step is not None:
            vision = after_step(index, t, vision).float()
        if on_step is not None:
            on_step(index)
    return Latents(vision, sound, acts)


def _denoised(
    noisy: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float,
    anchor: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """The flow's estimate of the clean latents from `noisy` at `sigma` and its guided `velocity`
    (x_t = (1 - sigma) x_0 + sigma noise, v = noise - x_0), with an anchor's conditioned frames kept clean."""
    denoised = noisy.float() - sigma * velocity.float().reshape(noisy.shape)
    if anchor is not None:
        mask, clean = anchor
        denoised = mask * clean + (1.0 - mask) * denoised
    return denoised


def _predict(
    model: nn.Module,
    pairs: list[tuple[GeneratorLayout, ReasonerMemory]],
    inputs: GeneratorInputs,
    step: tuple[int, int, float],
    step_cache: SeaCache | None,
    layers: Callable[[], Iterable[nn.Module]] | None,
    mlp_chunk: int | None,
    kernels: Kernels,
    sequence: SequenceShards | None = None,
) -> list[GeneratorPrediction]:
    """Every branch's predictions for one step (index, steps, sigma); the cache decides per branch
    whether the decoder stack runs or its residual is reused. With `sequence` the stack (and the
    cache's residuals) hold this rank's rows; the rows meet again before the read-out."""
    states = embed_branches(model, [layout for layout, _ in pairs], inputs, pairs[0][1].keys[0].dtype)
    if sequence is not None:
        states = [sequence.shard(h) for h in states]
    compute = [True] * len(pairs) if step_cache is None else step_cache.decide(*step, inputs.vision)
    ran = [b for b, yes in enumerate(compute) if yes]
    stack_inputs = [states[b] for b in ran]
    for b in ran:
        states[b] = None  # the stack replaces its inputs as it goes; without a cache nothing else holds them
    if ran:
        kept = list(stack_inputs) if step_cache is not None else []  # the cache's residual needs them
        outputs = run_decoder_stack(
            model,
            [pairs[b] for b in ran],
            stack_inputs,
            layers=None if layers is None else layers(),
            mlp_chunk=mlp_chunk,
            kernels=kernels,
            sequence=sequence,
        )
        for b, out in zip(ran, outputs):
            states[b] = out
        for b, stack_input in zip(ran, kept):
            step_cache.record(b, stack_input, states[b])
    for b, yes in enumerate(compute):
        if not yes:
            states[b] = step_cache.reuse(b, states[b])
    if sequence is not None:
        states = [sequence.gather(h) for h in states]
    return [read_out_predictions(model, layout, inputs, out) for (layout, _), out in zip(pairs, states)]


def mesh_branches(branches: list[Branch], mesh: ProcessMesh | None) -> list[Branch]:
    """The branches this rank runs: all of them, or with CFG-parallel the one of its CFG group index."""
    if mesh is None or mesh.layout.cfg == 1:
        return branches
    assert len(branches) == mesh.layout.cfg, (len(branches), mesh.layout)
    return [branches[mesh.branch]]


def all_branches(predictions: list[GeneratorPrediction], mesh: ProcessMesh | None) -> list[GeneratorPrediction]:
    """Every branch's predictions on every rank: with CFG-parallel, one exchange of this rank's
    branch (the velocities of every modality in one buffer) with the other branch's rank."""
    if mesh is None or mesh.layout.cfg == 1:
        return predictions
    (mine,) = predictions
    names = [name for name in ("vision", "sound", "action") if getattr(mine, name) is not None]
    parts = [getattr(mine, name) for name in names]
    flat = torch.cat([p.float().flatten() for p in parts])  # one exchange a step
    gathered = []
    for buffer in mesh.gather_branches(flat):
        pieces = buffer.split([p.numel() for p in parts])
        shaped = [piece.view(p.shape).to(p.dtype) for piece, p in zip(pieces, parts)]
        gathered.append(GeneratorPrediction(**dict(zip(names, shaped))))
    return gathered


def set_timesteps(
    pipe: Cosmos3OmniPipeline, steps: int, device: torch.device, distilled_sigmas: tuple[float, ...] | None = None
) -> None:
    """The request's schedule, as `Cosmos3OmniPipeline.__call__` sets it (its native flow schedule when
    the folder's pipeline index asks for it), or a distilled checkpoint's fixed sigmas."""
    scheduler = pipe.scheduler
    if distilled_sigmas is not None:
        assert steps == len(distilled_sigmas), (steps, distilled_sigmas)
        scheduler.set_timesteps(sigmas=list(distilled_sigmas), device=device)
    elif pipe.config.use_native_flow_schedule:
        sigmas = np.linspace(1.0 - 1.0 / scheduler.config.num_train_timesteps, 0.0, steps + 1)[:-1]
        scheduler.set_timesteps(steps, device=device, sigmas=sigmas)
    else:
        scheduler.set_timesteps(steps, device=device)


def _guided(velocities: list[torch.Tensor], config: GenerationConfig) -> torch.Tensor:
    """`v_u + g (v_c - v_u)` in float32 over [cond, uncond]; the conditional alone without guidance."""
    if len(velocities) == 1:
        return velocities[0].float()
    cond, uncond = (v.float() for v in velocities)
    return uncond + config.guidance * (cond - uncond)


def _step(scheduler, velocity: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    # The scheduler's update wants a batch axis in front of the per-modality latents; a stochastic
    # (distilled) Euler step re-noises from the request's generator, so a seed still fixes the video.
    extra = {"generator": sampling.generator} if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) else {}
    return scheduler.step(velocity.unsqueeze(0), t, sample.unsqueeze(0), return_dict=False, **extra)[0].squeeze(0)


@torch.no_grad()
def raw_latents(pipe: Cosmos3OmniPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Normalized latents [1, C, T, h, w] -> the VAE's raw latents, in its dtype (what the VAE decodes)."""
    vae = pipe.vae
    mean = pipe._vae_latents_mean.to(device=latents.device, dtype=vae.dtype).view(1, -1, 1, 1, 1)
    inv_std = pipe._vae_latents_inv_std.to(device=latents.device, dtype=vae.dtype).view(1, -1, 1, 1, 1)
    return latents.to(vae.dtype) / inv_std + mean


def decode_frames(
    pipe: Cosmos3OmniPipeline,
    latents: torch.Tensor,
    *,
    grid: TileGrid = UNTILED,
    mesh: ProcessMesh | None = None,
    on_piece: Callable[[int, int], None] | None = None,
) -> np.ndarray | None:
    """Normalized latents [1, C, T, H, W] -> uint8 frames [T, H, W, 3] on the host.

    Decoded in the tiles of `grid` (one tile: diffusers' untiled decode); frames leave the device
    as they are decoded (see vae/decode.py). With a `mesh` every rank decodes every n-th tile of a
    grid with at least n tiles, and the leader gets the frames (the others None). `on_piece(index, total)`
    is called before each piece this rank decodes (see vae/decode.py) (what it raises stops the decode);
    NaN or infinite pixels raise `NonFinitePixels` on the rank that decoded them.
    """
    vae = pipe.vae
    raw = raw_latents(pipe, latents)
    if mesh is None or mesh.layout.world_size == 1:
        return decode_to_host(vae, raw, grid, on_piece=on_piece)
    grid = at_least_tiles(grid, mesh.layout.world_size)
    tiles = grid.rows * grid.cols
    mine = range(mesh.rank, tiles, mesh.layout.world_size)
    frames = torch.from_numpy(decode_to_host(vae, raw, grid, only=set(mine), on_piece=on_piece))
    frames = mesh.sum_to_leader(frames, latents.device)  # the tiles are disjoint: the sum is each pixel once
    return None if frames is None else frames.numpy()


def at_least_tiles(grid: TileGrid, count: int) -> TileGrid:
    """`grid`, or with more rows when it has fewer than `count` tiles (one for each rank)."""
    if grid.rows * grid.cols >= count:
        return grid
    return dataclasses.replace(grid, rows=-(-count // grid.cols))


def conditioned_latents(
    pipe: Cosmos3OmniPipeline, conditioning: Conditioning, vision: torch.Tensor, height: int, width: int, device
) -> torch.Tensor:
    """`vision` with the clean latents of the conditioning frames put in (the VAE encoder must be usable)."""
    pixels = condition_pixels(
        pipe,
        image=conditioning.image,
        video=conditioning.video,
        condition_frames=conditioning.indexes,
        height=height,
        width=width,
        device=device,
    )
    return conditioned_noise(pipe, pixels, conditioning.indexes, vision)
