"""One call of a placed pipeline: diffusers' arguments read into what the split runs, and every
argument the split cannot honour refused by name.

The pipeline's own `check_inputs` runs first, so what diffusers refuses is refused with diffusers'
message (a ValueError). What the split does not do is then an InputError naming the argument:
action-conditioned generation, per-step callbacks, diffusers' FP8 mixed-precision switches, more
than one prompt (diffusers would quietly use the first) and a video's conditioning frames taken from
its end. Every other argument means what it means to diffusers, defaults included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from diffusers import Cosmos3OmniPipeline

from ..app.inputs import Conditioning
from ..errors import InputError
from ..model.tiers import frame_size
from ..request.checks import FieldError
from ..request.spec import REQUEST_FIELDS, named_at, request_defaults

OUTPUT_TYPES = ("pil", "np", "pt", "latent")  # what `output_type` takes, as in diffusers
# The pipeline's defaults for a call without them: the request's declared ones (189 frames of 1280x720).
_DECLARED = request_defaults()
DEFAULT_FRAMES = _DECLARED["frames"]
DEFAULT_WIDTH, DEFAULT_HEIGHT = frame_size(_DECLARED["resolution"], _DECLARED["aspect_ratio"])
# Arguments the split cannot honour, each with why; any value but None is refused.
UNSUPPORTED = {
    "action": "action-conditioned generation (policy, forward or inverse dynamics) is not part of the split",
    "action_latents": "action-conditioned generation (policy, forward or inverse dynamics) is not part of the split",
    "callback_on_step_end": "the split's denoising loop calls no per-step callback",
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
    """The call's tensors and images: what its noise is drawn from or starts as, and what conditions it."""

    generator: torch.Generator | list[torch.Generator] | None
    latents: torch.Tensor | None
    sound_latents: torch.Tensor | None
    conditioning: Conditioning | None


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
    frames = _given_or(arguments["num_frames"], DEFAULT_FRAMES)
    height = _given_or(arguments["height"], DEFAULT_HEIGHT)
    width = _given_or(arguments["width"], DEFAULT_WIDTH)
    image, video, indexes = arguments["image"], arguments["video"], arguments["condition_frame_indexes_vision"]
    pipe.check_inputs(
        arguments["prompt"],
        arguments["negative_prompt"],
        image,
        height,
        width,
        frames,
        arguments["guidance_scale"],
        arguments["enable_sound"],
        arguments["callback_on_step_end_tensor_inputs"],
        None,
        video=video,
        condition_frame_indexes_vision=indexes,
    )
    output_type = arguments["output_type"]
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    call = PipelineCall(
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
    inputs = CallInputs(
        generator=arguments["generator"],
        latents=arguments["latents"],
        sound_latents=arguments["sound_latents"] if call.sound else None,  # diffusers reads them only with sound
        conditioning=_conditioning(image, video, indexes, frames),
    )
    return call, inputs


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
