"""One call of a placed pipeline through the split, returned as `Cosmos3OmniPipeline.__call__` returns it.

The order of work is generate_video's (app/runner.py): (encode,) prefill each CFG branch once,
denoise with the generator alone, decode, each while its group's weights are on the device. What
the work reads is the pipeline's: its prompt templates and their switches, its scheduler as the user
configured it (any scheduler its own loop steps, stepped the same way), the call's generator and
starting latents, its safety checker and its output types. Noise is drawn as the pipeline draws it:
from the call's generator, in the same shape, on the same device and in the same order (video, then
sound), so a seed gives the video the unpatched pipeline gives.

Frames are decoded to 8 bits on the host as they leave the device (vae/decode.py), so "np" and "pt"
videos hold multiples of 1/255 (within half a level of diffusers' unrounded floats) and live on the
host; "pil" rounds as diffusers does.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipelineOutput, CosmosSafetyChecker
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..app.generate import (
    Latents,
    conditioned_latents,
    decode_frames,
    denoise_latents,
    initial_sound_noise,
    pack_branch,
    prefill_branches,
)
from ..errors import InputError
from ..model.geometry import latent_frames
from ..model.groups import GENERATOR, REASONER, SOUND, VAE, VAE_ENCODER
from ..offload.engine import OffloadEngine
from ..planning.plan import Plan
from .call import CallInputs, PipelineCall
from .state import OffloadState


def generate(
    pipe: Cosmos3OmniPipeline, state: OffloadState, call: PipelineCall, inputs: CallInputs, *, progress: bool
) -> Cosmos3OmniPipelineOutput | tuple:
    """Generate `call` with `pipe`'s placed modules, which `state.engine` moves as `state.plan` says (and whose
    FP8 linears, if any, `state.fp8` switches before the prefill and each step)."""
    engine, plan, kernels, fp8 = state.engine, state.plan, state.kernels, state.fp8
    device = engine.device
    if call.safety_check:
        _check_prompt_safety(pipe, call.prompt, device)
    prompts = _prompt_ids(pipe, call)
    vision, sound = initial_latents(pipe, call, inputs, device)
    conditioning = inputs.conditioning
    indexes = () if conditioning is None else conditioning.indexes
    if conditioning is not None and inputs.latents is None:  # given latents start as they are, as in diffusers
        with engine.use(VAE_ENCODER):
            vision = conditioned_latents(pipe, conditioning, vision, call.height, call.width, device)
    if fp8 is not None:
        fp8.before_prefill()
    with engine.use(REASONER):
        branches = [pack_branch(pipe, prompt, vision, call.fps, device, indexes, sound) for prompt in prompts]
        memories = prefill_branches(pipe, branches, layers=engine.layers(REASONER), kernels=kernels)
    with engine.use(GENERATOR):
        latents = denoise_latents(
            pipe,
            call,
            branches,
            memories,
            Latents(vision, sound),
            progress=progress,
            layers=lambda: engine.layers(GENERATOR),
            mlp_chunk=plan.mlp_chunk,
            before_step=None if fp8 is None else fp8.before_step,
            kernels=kernels,
        )
        del memories
    video, waveform = _decode(pipe, engine, plan, call, latents)
    return Cosmos3OmniPipelineOutput(video=video, sound=waveform) if call.return_dict else (video, waveform)


def _prompt_ids(pipe: Cosmos3OmniPipeline, call: PipelineCall) -> list[list[int]]:
    """[cond, uncond] token ids (or [cond] without guidance), with the call's template switches."""
    cond, uncond = pipe.tokenize_prompt(
        call.prompt,
        call.negative_prompt,
        num_frames=call.frames,
        height=call.height,
        width=call.width,
        fps=call.fps,
        use_system_prompt=call.use_system_prompt,
        add_resolution_template=call.add_resolution_template,
        add_duration_template=call.add_duration_template,
    )
    return [cond, uncond] if call.uses_guidance else [cond]


def _decode(
    pipe: Cosmos3OmniPipeline, engine: OffloadEngine, plan: Plan, call: PipelineCall, latents: Latents
) -> tuple[np.ndarray | torch.Tensor | list[Image.Image], torch.Tensor | None]:
    """(the video as `call.output_type` asks, the waveform [channels, samples] or None), safety-checked as
    the pipeline checks them."""
    video = latents.vision
    if call.output_type != "latent":
        with engine.use(VAE):
            video = video_as(call.output_type, decode_frames(pipe, latents.vision, grid=plan.decode_grid))
    waveform = None
    if latents.sound is not None:
        with engine.use(SOUND):
            waveform = pipe.decode_sound(latents.sound)
    if call.safety_check and call.output_type != "latent" and isinstance(pipe.safety_checker, CosmosSafetyChecker):
        video = pipe._apply_video_safety_check(video, output_type=call.output_type, device=engine.device)
    return video, waveform


def initial_latents(
    pipe: Cosmos3OmniPipeline, call: PipelineCall, inputs: CallInputs, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(video [1, C, T, h, w], sound [sound_dim, T'] or None) float32: the call's own latents, or noise drawn
    as `prepare_latents` draws it (the video's, then the sound's). Conditioning frames are mixed in later."""
    vae = pipe.vae.config
    shape = (
        1,
        vae.z_dim,
        latent_frames(call.frames, vae.scale_factor_temporal),
        call.height // vae.scale_factor_spatial,
        call.width // vae.scale_factor_spatial,
    )
    if inputs.latents is None:
        vision = randn_tensor(shape, generator=inputs.generator, device=device, dtype=torch.float32)
    elif tuple(inputs.latents.shape) != shape:
        raise InputError(f"latents have shape {list(inputs.latents.shape)}; this call's are {list(shape)}")
    else:
        vision = inputs.latents.to(device=device, dtype=torch.float32)
    if not call.sound:
        return vision, None
    if inputs.sound_latents is not None:
        return vision, inputs.sound_latents.to(device=device, dtype=torch.float32)
    return vision, initial_sound_noise(pipe, call, device, inputs.generator)


def video_as(output_type: str, frames: np.ndarray) -> np.ndarray | torch.Tensor | list[Image.Image]:
    """uint8 frames [T, H, W, 3] as diffusers' `output_type` gives them: "np" float32 [T, H, W, 3] in [0, 1],
    "pt" float32 [T, 3, H, W] in [0, 1], "pil" a list of images."""
    if output_type == "pil":
        return [Image.fromarray(frame) for frame in frames]
    values = torch.from_numpy(frames).float().div_(255)
    return values.numpy() if output_type == "np" else values.permute(0, 3, 1, 2)


def _check_prompt_safety(pipe: Cosmos3OmniPipeline, prompt: str, device: torch.device) -> None:
    """The pipeline's text guardrail, when it has one, run as `__call__` runs it (on the device, then back)."""
    if not isinstance(pipe.safety_checker, CosmosSafetyChecker):
        return
    pipe.safety_checker.to(device)
    try:
        if not pipe.safety_checker.check_text_safety(prompt):
            raise ValueError(
                f"Cosmos Guardrail detected unsafe text in the prompt: {prompt}. "
                "Please ensure that the prompt abides by the NVIDIA Open Model License Agreement."
            )
    finally:
        pipe.safety_checker.to("cpu")
