"""One call of a placed pipeline: diffusers' arguments read into what the split runs, and every
argument the split cannot honour refused by name.

The pipeline's own `check_inputs` runs first, so what diffusers refuses is refused with diffusers'
message (a ValueError). What the split does not do is then an InputError naming the argument:
per-step callbacks, diffusers' FP8 mixed-precision switches, more than one prompt (diffusers would
quietly use the first) and a video's conditioning frames taken from its end. Every other argument
means what it means to diffusers, defaults included.

An `action=CosmosActionCondition(...)` call (policy, forward or inverse dynamics) is diffusers' too:
no num_frames, height, width, image or video of its own (the chunk and the input's shape fix them),
a transformer with action heads. Beyond diffusers, what the other doors refuse of an action run is
refused here in their words: a chunk past MAX_CHUNK, an unknown view point (diffusers would drop the
caption's framing with a warning), action rows that are not finite or absurdly large, and
`action_latents` without an action (diffusers would ignore them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition

from ..app.action_files import check_action_values
from ..app.action_input import ActionInput, action_geometry
from ..app.inputs import Conditioning
from ..errors import InputError
from ..model.actions import ACTION_WIDTHS
from ..model.tiers import frame_size
from ..request.checks import FieldError
from ..request.spec import (
    DEFAULT_ASPECT_RATIO,
    DEFAULT_FRAMES,
    DEFAULT_RESOLUTION,
    FIELDS_BY_NAME,
    REQUEST_FIELDS,
    named_at,
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")  # what `output_type` takes, as in diffusers
# The pipeline's defaults for a call without them: the request's (189 frames of 1280x720).
DEFAULT_WIDTH, DEFAULT_HEIGHT = frame_size(DEFAULT_RESOLUTION, DEFAULT_ASPECT_RATIO)
# Arguments the split cannot honour, each with why; any value but None is refused.
UNSUPPORTED = {
    "mixed_precision_format": "diffusers' FP8 step switches are for its quantized transformers, which enable() "
    "does not take",
    "mixed_precision_first_steps": "diffusers' FP8 step switches are for its quantized transformers",
    "mixed_precision_last_steps": "diffusers' FP8 step switches are for its quantized transformers",
    "mixed_precision_reasoner_policy": "diffusers' FP8 step switches are for its quantized transformers",
}


@dataclass(frozen=True, kw_only=True)
class PipelineCall:
    """What one call generates and returns. It carries, under the same names, what the generation path
    reads of a `GenerationConfig` (app/doors.py's `Request`): `steps` and `guidance` (the denoising loop),
    `frames` and `fps` (the sound track's noise), `cache` and `cache_threshold` (the step cache, which
    `read_call` leaves off: the pipeline's call sets what `enable()` was given)."""

    prompt: str
    negative_prompt: str | None
    frames: int
    height: int
    width: int
    fps: float
    steps: int
    guidance: float
    sound: bool
    output_type: str
    return_dict: bool
    safety_check: bool
    system_prompt: bool | None
    add_resolution_template: bool
    add_duration_template: bool
    cache: str = "none"
    cache_threshold: float | None = None

    @property
    def uses_guidance(self) -> bool:
        return self.guidance != 1.0


class CallInputs(NamedTuple):
    """The call's tensors and images: what its noise is drawn from or starts as, and what conditions it
    (an action call's `conditioning.action`: its clip and rows)."""

    generator: torch.Generator | list[torch.Generator] | None
    latents: torch.Tensor | None
    sound_latents: torch.Tensor | None
    conditioning: Conditioning | None
    action_latents: torch.Tensor | None = None
    callback: Callable | None = None  # callback_on_step_end, called with `callback_inputs` after each step
    callback_inputs: tuple[str, ...] = ()

    @property
    def action(self) -> ActionInput | None:
        return None if self.conditioning is None else self.conditioning.action


def read_call(pipe: Cosmos3OmniPipeline, arguments: Mapping[str, Any]) -> tuple[PipelineCall, CallInputs]:
    """`arguments`: every argument of `Cosmos3OmniPipeline.__call__`, by name, as the caller gave them."""
    for name, why in UNSUPPORTED.items():
        if arguments[name] is not None:
            raise InputError(f"{name} cannot be honoured by a pipeline under cosmos3_offload.enable(): {why}")
    if arguments["condition_video_keep"] != "first":
        raise InputError(
            f"condition_video_keep={arguments['condition_video_keep']!r}: a pipeline under cosmos3_offload.enable() "
            "conditions on a video's first frames; pass the clip's last frames as `video` instead"
        )
    _check_declared_numbers(arguments)
    condition = _action_condition(arguments["action"], arguments["action_latents"])
    frames, height, width = arguments["num_frames"], arguments["height"], arguments["width"]
    if condition is None:  # an action call leaves them to diffusers' check (None) and its own rules
        frames = _given_or(frames, DEFAULT_FRAMES)
        height = _given_or(height, DEFAULT_HEIGHT)
        width = _given_or(width, DEFAULT_WIDTH)
    image, video, indexes = arguments["image"], arguments["video"], arguments["condition_frame_indexes_vision"]
    callback, callback_inputs = arguments["callback_on_step_end"], arguments["callback_on_step_end_tensor_inputs"]
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):  # as diffusers: its own tensor inputs
        callback_inputs = callback.tensor_inputs
    pipe.check_inputs(
        arguments["prompt"],
        arguments["negative_prompt"],
        image,
        height,
        width,
        frames,
        arguments["guidance_scale"],
        arguments["enable_sound"],
        callback_inputs,
        condition,
        video=video,
        condition_frame_indexes_vision=indexes,
    )
    if condition is None:
        conditioning = _conditioning(image, video, indexes, frames)
    else:
        action = _action_input(pipe, condition)
        conditioning = Conditioning(None, None, (), action=action)
        # The video has chunk + 1 frames; the canvas the clip is padded into is the call's size (the prompt's,
        # and the planner's bound: the video keeps the content's size, at most the canvas).
        frames, (height, width) = action.frames, action_geometry(pipe, action).canvas
    call = _pipeline_call(arguments, frames, height, width)
    inputs = CallInputs(
        generator=arguments["generator"],
        latents=arguments["latents"],
        sound_latents=arguments["sound_latents"] if call.sound else None,  # diffusers reads them only with sound
        conditioning=conditioning,
        action_latents=arguments["action_latents"],
        callback=callback,
        callback_inputs=tuple(callback_inputs),
    )
    return call, inputs


def _pipeline_call(arguments: Mapping[str, Any], frames: int, height: int, width: int) -> PipelineCall:
    """The call's values of `frames` x `height` x `width` (the output type checked)."""
    output_type = arguments["output_type"]
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    return PipelineCall(
        prompt=_one("prompt", arguments["prompt"]),
        negative_prompt=_one("negative_prompt", arguments["negative_prompt"]),
        frames=frames,
        height=height,
        width=width,
        fps=float(arguments["fps"]),
        steps=arguments["num_inference_steps"],
        guidance=float(arguments["guidance_scale"]),
        sound=bool(arguments["enable_sound"]),
        output_type=output_type,
        return_dict=bool(arguments["return_dict"]),
        safety_check=bool(arguments["enable_safety_check"]),
        system_prompt=arguments["use_system_prompt"],
        add_resolution_template=bool(arguments["add_resolution_template"]),
        add_duration_template=bool(arguments["add_duration_template"]),
    )


def check_step_cache(call: PipelineCall, inputs: CallInputs) -> None:
    """The step cache `enable()` was given does not run action calls: SeaCache's gate reads the video's
    latents alone, and would skip steps the action tokens still move (the CLI refuses --cache with --action)."""
    if call.cache != "none" and inputs.action is not None:
        raise InputError(
            f"this pipeline was enabled with cache={call.cache!r}, which does not go with action= (its gate reads "
            "the video alone): enable a freshly loaded pipeline without cache for action calls"
        )


def _check_declared_numbers(arguments: Mapping[str, Any]) -> None:
    """The request's numbers (frames, steps, guidance, fps) checked by their declaration, as every door
    checks them, and refused under diffusers' keyword (`num_inference_steps must be ...`)."""
    for spec in REQUEST_FIELDS:
        keyword = spec.door("diffusers")
        if keyword is not None and spec.kind in (int, float) and arguments[keyword] is not None:
            try:
                spec.check(arguments[keyword])
            except FieldError as error:
                raise named_at(error, "diffusers") from None


def _given_or(value: int | None, default: int) -> int:
    return default if value is None else value


def _one(name: str, text: str | list[str] | None) -> str | None:
    """A prompt, or the only prompt of a list (diffusers' pipeline runs one sample a call)."""
    if not isinstance(text, list):
        return text
    if len(text) != 1:
        raise InputError(
            f"{name} is a list of {len(text)}; the pipeline generates one video a call (diffusers would use only the "
            "first): call it once per prompt"
        )
    return text[0]


def _conditioning(image: Any, video: Any, indexes: Any, frames: int) -> Conditioning | None:
    """What conditions the call, as diffusers reads it: an image anchors latent frame 0 (and is ignored for a
    single frame), a video the latent frames `condition_frame_indexes_vision`; None for text alone."""
    if video is not None:
        return Conditioning(None, video, tuple(sorted(set(indexes))))
    if image is not None and frames > 1:
        return Conditioning(image, None, (0,))
    return None


def _action_condition(action: Any, action_latents: Any) -> CosmosActionCondition | None:
    """The call's action condition, checked again by diffusers' own construction (so one changed since it was
    built is held to diffusers' rules, and its action width is its domain's); None without one."""
    if action is None:
        if action_latents is not None:
            raise InputError(
                "action_latents start an action call's actions; without action=CosmosActionCondition(...) "
                "diffusers would ignore them: pass the action too, or drop them"
            )
        return None
    if not isinstance(action, CosmosActionCondition):
        raise InputError(f"action must be a diffusers CosmosActionCondition, got {type(action).__name__}")
    return dataclasses.replace(action)  # runs CosmosActionCondition.__post_init__: a ValueError, as diffusers'


def _action_input(pipe: Cosmos3OmniPipeline, condition: CosmosActionCondition) -> ActionInput:
    """`condition` as the generation path takes it, refused where the other doors refuse the same run."""
    chunk = _named("chunk_size", "action.chunk_size", condition.chunk_size)
    view = _named("view", "action.view_point", condition.view_point)
    width, action_dim = ACTION_WIDTHS[condition.domain_name], pipe.transformer.config.action_dim
    if width > action_dim:  # diffusers' prepare_latents refuses it, in these words
        raise ValueError(
            f"raw_action_dim={width} exceeds the model's trained action_dim={action_dim}; this checkpoint cannot "
            "represent that action width."
        )
    rows = condition.raw_actions if condition.mode == "forward_dynamics" else None
    if rows is not None:
        _check_rows(rows)
    return ActionInput(
        mode=condition.mode,
        domain=condition.domain_name,
        chunk=chunk,
        tier=int(condition.resolution_tier),
        view=view,
        clip=[condition.image] if condition.image is not None else condition.video,
        raw_actions=rows,
    )


def _named(field: str, name: str, value: Any) -> Any:
    """`value` checked by the request field `field` (its bounds, its choices), refused under `name`."""
    try:
        return FIELDS_BY_NAME[field].check(value)
    except FieldError as error:
        raise error.named(name) from None


def _check_rows(rows: torch.Tensor | np.ndarray) -> None:
    """Forward dynamics' rows: real numbers, finite and within MAX_ACTION_MAGNITUDE (actions are normalized
    poses and gripper states), as an actions file's are."""
    values = torch.as_tensor(rows)
    if values.dtype == torch.bool or values.is_complex():
        raise InputError(f"action.raw_actions holds {values.dtype} values, not real numbers")
    check_action_values(values.detach().to("cpu", torch.float64).numpy(), "action.raw_actions")
