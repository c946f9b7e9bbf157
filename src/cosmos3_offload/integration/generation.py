"""One call of a placed pipeline through the generation path, returned as `Cosmos3OmniPipeline.__call__` returns it.

The phases and their order are app/generation_path.py's `generate`, the CLI's own: (encode,) prefill each CFG
branch once, denoise with the generator alone (with the step cache `enable()` was given), refuse
non-finite latents, decode, each while its group's weights are on the device. What this door hands
it is the pipeline's: its prompt templates and the call's switches of them, its scheduler as the user
configured it (any scheduler its own loop steps, stepped the same way), the call's generator and
starting latents. What it makes of the result is the pipeline's too: its safety checker and its output
types. Noise is drawn as the pipeline draws it: from the call's generator, in the same shape, on the
same device and in the same order (video, then sound, then actions), so a seed gives the video (and
the actions) the unpatched pipeline gives. An action call returns its predicted actions as diffusers
does: `action=[float32 [chunk, width of the domain]]` (None for forward dynamics), and with
`return_dict=False` the triple (video, sound, action).

Frames are decoded to 8 bits on the host as they leave the device (vae/decode.py), so "np" and "pt"
videos hold multiples of 1/255 (within half a level of diffusers' unrounded floats) and live on the
host; "pil" rounds as diffusers does.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipelineOutput, CosmosSafetyChecker
from PIL import Image

from ..app.action_input import action_geometry, action_latent_shape
from ..app.doors import GenerationHooks, PlacedPipeline
from ..app.generate import PromptTemplates, latent_shape
from ..app.generation_path import generate
from ..errors import InputError
from .call import CallInputs, PipelineCall
from .state import OffloadState


def generate_call(
    pipe: Cosmos3OmniPipeline, state: OffloadState, call: PipelineCall, inputs: CallInputs, *, progress: bool
) -> Cosmos3OmniPipelineOutput | tuple:
    """Generate `call` with `pipe`'s placed modules, which `state.engine` moves as `state.plan` says (and whose
    FP8 linears, if any, `state.fp8` switches before the prefill and each step)."""
    device = state.engine.device
    if call.safety_check:
        _check_prompt_safety(pipe, call.prompt, device)
    _check_given_latents(pipe, call, inputs)
    fp8 = None if state.fp8 is None else state.fp8.steps
    placed = PlacedPipeline(pipe=pipe, engine=state.engine, plan=state.plan, kernels=state.kernels, fp8=fp8)
    hooks = GenerationHooks(
        generator=inputs.generator,
        latents=inputs.latents,
        sound_latents=inputs.sound_latents,
        action_latents=inputs.action_latents,
        templates=PromptTemplates(call.system_prompt, call.add_resolution_template, call.add_duration_template),
        progress=progress,
        decode_video=call.output_type != "latent",
        after_step=_callback(pipe, call, inputs),
        interrupted=lambda: pipe._interrupt,
    )
    pipe._interrupt, pipe._guidance_scale, pipe._num_timesteps = False, call.guidance, call.steps
    try:
        generated = generate(placed, call, hooks, conditioning=inputs.conditioning)
    finally:
        pipe._current_timestep = None
    state.last_call.step_cache = generated.step_cache
    video = generated.latents.vision
    if generated.frames is not None:
        video = video_as(call.output_type, generated.frames)
        if call.safety_check and isinstance(pipe.safety_checker, CosmosSafetyChecker):
            video = pipe._apply_video_safety_check(video, output_type=call.output_type, device=device)
    action = None if generated.actions is None else [generated.actions]
    if not call.return_dict:
        return (video, generated.waveform) if inputs.action is None else (video, generated.waveform, action)
    return Cosmos3OmniPipelineOutput(video=video, sound=generated.waveform, action=action)


def _callback(pipe: Cosmos3OmniPipeline, call: PipelineCall, inputs: CallInputs):
    """The call's `callback_on_step_end` as the loop's `after_step`, called as diffusers calls it: with the
    pipeline, the step, its timestep and {name: tensor} of `callback_on_step_end_tensor_inputs` (the
    latents); the latents it returns go on (its `pipe._interrupt = True` skips the remaining steps)."""
    if inputs.callback is None:
        return None

    def after_step(index: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        pipe._current_timestep = t
        outputs = inputs.callback(pipe, index, t, {name: latents for name in inputs.callback_inputs})
        return outputs.pop("latents", latents)

    return after_step


def _check_given_latents(pipe: Cosmos3OmniPipeline, call: PipelineCall, inputs: CallInputs) -> None:
    """Starting latents of another shape than the call's are refused (diffusers would fail deep in the model):
    the video's [1, C, T, h, w] (an action call's at the content's size), the actions' [chunk, action_dim]."""
    action = inputs.action
    if inputs.latents is not None:
        shape = (
            latent_shape(pipe, call)
            if action is None
            else action_latent_shape(pipe, action, action_geometry(pipe, action))
        )
        if tuple(inputs.latents.shape) != shape:
            raise InputError(f"latents have shape {list(inputs.latents.shape)}; this call's are {list(shape)}")
    if inputs.action_latents is not None:
        shape = (action.chunk, pipe.transformer.config.action_dim)
        if tuple(inputs.action_latents.shape) != shape:
            raise InputError(
                f"action_latents have shape {list(inputs.action_latents.shape)}; this call's are {list(shape)} "
                "(chunk_size x the action heads' action_dim)"
            )


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
