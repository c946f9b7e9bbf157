"""The plan `enable(pipe, vram_budget=...)` follows, and the check each call makes against the budget.

A plan depends on the request's shape, but the pipeline is placed once, before any call: the plan is
chosen for the largest call the user declares (`LargestCall`: by default the pipeline's own default
request, 189 frames at 1280x720, with guidance, and with sound when the pipeline can make it). Every
call is then predicted under that plan before anything runs, and one whose peak would not fit the
budget is refused with the numbers; a smaller call fits it, a different aspect ratio of the same size
usually does too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers import Cosmos3OmniPipeline

from ..app.device_profile import DeviceSetup, device_setup, probe_shape
from ..app.planned_request import planner_request
from ..errors import InputError
from ..loading.quantization import NONE, Quantization
from ..loading.sizes import DTYPES, model_sizes
from ..model.geometry import frames_to_encode
from ..planning.request import MAX_BUDGET, DeviceProfile, Request, parse_budget
from ..planning.search import Choice, choose_plan, describe_choice, predict
from ..planning.sizes import ModelSizes
from ..request.checks import check_integer
from ..request.spec import FIELDS_BY_NAME, MAX_FRAMES
from ..units import GIB, MIB
from .call import DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH, CallInputs, PipelineCall

DEFAULT_FPS = FIELDS_BY_NAME["fps"].default  # the pipeline's too: what a sound track's length is planned for
MAX_SIDE = 8192  # pixels: far beyond any Cosmos3 tier, low enough that a typo cannot plan for a giant frame


@dataclass(frozen=True, kw_only=True)
class LargestCall:
    """The largest call the plan is chosen for (the pipeline's defaults: 189 frames at 1280x720)."""

    frames: int = DEFAULT_FRAMES
    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH

    def __post_init__(self) -> None:
        check_integer("max_frames", self.frames, 1, MAX_FRAMES)
        check_integer("max_height", self.height, 16, MAX_SIDE)
        check_integer("max_width", self.width, 16, MAX_SIDE)

    def describe(self) -> str:
        return f"{self.frames} frames at {self.width}x{self.height}"


@dataclass(frozen=True)
class BudgetPlan:
    """The planner's choice for a budget, and what a call is predicted with."""

    choice: Choice
    budget_bytes: int
    host_budget_bytes: int | None
    sizes: ModelSizes
    profile: DeviceProfile
    largest: LargestCall

    def check_call(self, request: Request, *, action: bool = False) -> None:
        """An InputError, before anything runs, when `request` would not fit the budget under this plan
        (`action`: an action call, whose chunk and tier set its size)."""
        peak = predict(self.choice.plan, self.sizes, request, self.profile).peak
        usable = self.budget_bytes * self.profile.headroom
        if peak > usable:
            lower = "the action's chunk_size or resolution_tier" if action else "num_frames, height or width"
            raise InputError(
                f"this call ({request.frames} frames at {request.width}x{request.height}) needs about "
                f"{peak / GIB:.2f} GiB under the plan enable() chose for {self.largest.describe()}, more than the "
                f"{usable / GIB:.2f} GiB the {self.budget_bytes / GIB:.2f} GiB budget leaves: lower {lower}, "
                "or enable() a freshly loaded pipeline with max_frames, max_height and max_width covering it"
            )

    def describe(self) -> str:
        return f"for {self.largest.describe()}: " + describe_choice(
            self.choice, self.budget_bytes, self.host_budget_bytes
        )


def read_budget(name: str, value: object) -> int:
    """A budget given as text ('8GiB', '7500MiB', see parse_budget) or as a whole number of bytes."""
    if isinstance(value, str):
        return parse_budget(value)
    if isinstance(value, bool) or not isinstance(value, int) or not MIB <= value <= MAX_BUDGET:
        raise InputError(f"{name} must be text like '8GiB' or a number of bytes from 1 MiB to 1 PiB, got {value!r}")
    return value


def choose_pipeline_plan(
    pipe: Cosmos3OmniPipeline,
    setup: DeviceSetup,
    *,
    budget: int,
    host_budget: int | None,
    largest: LargestCall,
    quantization: Quantization = NONE,
    cache: str = "none",
    cache_threshold: float | None = None,
) -> BudgetPlan:
    """The planner's fastest plan for `pipe`'s models (their FP8 linears at a byte a weight, with
    `quantization`) and the largest call (with the step cache's held residuals) that fits `budget` (and
    `host_budget`); an InputError with the least budget that works when none fits. Nothing can be mapped
    from files: the weights come from the pipeline's modules."""
    sizes = pipeline_sizes(pipe, quantization)
    largest_request = planner_request(
        frames=largest.frames,
        height=largest.height,
        width=largest.width,
        guidance=True,
        steps=FIELDS_BY_NAME["steps"].default,  # the steps do not change a step's memory
        fps=DEFAULT_FPS,
        sound=pipeline_sound(pipe),
        cache=cache,
        cache_threshold=cache_threshold,
    )
    choice = choose_plan(sizes, largest_request, budget, setup.profile, host_budget=host_budget, mapped=False)
    return BudgetPlan(choice, budget, host_budget, sizes, setup.profile, largest)


def pipeline_sizes(pipe: Cosmos3OmniPipeline, quantization: Quantization = NONE) -> ModelSizes:
    """The planner's sizes of `pipe`'s models, in the transformer's dtype (the VAE's is assumed the same), with
    the action heads in the generator when the transformer has them (enable() places them: see
    pipeline_weights.py)."""
    dtype_bytes = pipe.transformer.dtype.itemsize
    if dtype_bytes not in DTYPES:
        raise InputError(
            f"the transformer's weights are {pipe.transformer.dtype}; load the pipeline in bfloat16, float16 or "
            "float32 (torch_dtype=torch.bfloat16) to plan for a budget"
        )
    sound = None if pipe.sound_tokenizer is None else {**pipe.sound_tokenizer.config, "encoder_enabled": False}
    config = dict(pipe.transformer.config)
    actions = makes_actions(pipe)
    return model_sizes(
        config, dict(pipe.vae.config), dtype_bytes, sound_config=sound, quantization=quantization, actions=actions
    )


def call_request(pipe: Cosmos3OmniPipeline, call: PipelineCall, inputs: CallInputs) -> Request:
    """The planner's view of one call (a call that starts from given latents encodes nothing). An action
    call's video is counted at its canvas size, `call`'s (an upper bound: the video keeps the content's size,
    at most the canvas), its clip as the frames its mode encodes, and an action token per transition joins
    the generator's tokens."""
    encode = 0
    conditioning, action = inputs.conditioning, inputs.action
    if action is not None and inputs.latents is None:
        encode = action.pixel_frames()
    elif conditioning is not None and inputs.latents is None:
        encode = frames_to_encode(
            image=conditioning.image is not None,
            video=conditioning.video is not None,
            condition_frames=conditioning.indexes,
        )
    request = planner_request(
        frames=call.frames,
        height=call.height,
        width=call.width,
        guidance=call.uses_guidance,
        steps=call.steps,
        fps=call.fps,
        encode_frames=encode,
        sound=pipeline_sound(pipe) if call.sound else None,
        cache=call.cache,
        cache_threshold=call.cache_threshold,
    )
    return request if action is None else dataclasses.replace(request, tokens=request.tokens + action.chunk)


def pipeline_sound(pipe: Cosmos3OmniPipeline) -> dict | None:
    """The sound tokenizer's config when the pipeline makes a sound track, else None."""
    return dict(pipe.sound_tokenizer.config) if makes_sound(pipe) else None


def makes_sound(pipe: Cosmos3OmniPipeline) -> bool:
    """Whether the pipeline can generate a sound track (a sound tokenizer and a transformer trained with sound)."""
    return pipe.sound_tokenizer is not None and bool(pipe.transformer.config.get("sound_gen", False))


def makes_actions(pipe: Cosmos3OmniPipeline) -> bool:
    """Whether the transformer has action heads (`action_gen`): enable() places them for action calls."""
    return bool(pipe.transformer.config.get("action_gen", False))


def measure_device(pipe: Cosmos3OmniPipeline, device: torch.device, *, attention: str, h2d_GBps: float | None):
    """The device's profile and attention (probed on a GPU, cached per GPU; nothing runs on a CPU)."""
    shape = probe_shape(pipe.transformer.config)
    return device_setup(device, attention=attention, shape=shape, dtype=pipe.transformer.dtype, h2d_GBps=h2d_GBps)
