"""The class of a pipeline `enable()` has placed: a `Cosmos3OmniPipeline` whose `__call__` runs our split.

`enable()` turns the user's pipeline object into this subclass (its `__class__`, nothing else of it
changes), so it is still a `Cosmos3OmniPipeline` to every `isinstance`, keeps its components and
config, and `pipe(...)` takes exactly diffusers' arguments (tests/integration checks the signature
against diffusers'). What would move the placed weights behind the engine's back (`to`, diffusers'
own offloading) is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Literal

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline
from PIL import Image

from ..errors import InputError
from .budget import call_request
from .call import check_step_cache, read_call
from .generation import generate_call
from .state import OffloadState

DIFFUSERS_OFFLOAD_REFUSED = (
    "this pipeline's weights are placed by cosmos3_offload.enable(); diffusers' offloading would move them behind "
    "its back: use one or the other, on a freshly loaded pipeline"
)


class OffloadedCosmos3OmniPipeline(Cosmos3OmniPipeline):
    """A `Cosmos3OmniPipeline` placed by `cosmos3_offload.enable`: the reasoner runs once per prompt, the
    denoising loop runs the generator alone, and each group's weights are where `offload.plan` puts them."""

    offload: OffloadState

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        image: Image.Image | np.ndarray | torch.Tensor | None = None,
        video: list[Image.Image] | torch.Tensor | np.ndarray | None = None,
        condition_frame_indexes_vision: Iterable[int] = (0, 1),
        condition_video_keep: Literal["first", "last"] = "first",
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        fps: float = 24.0,
        num_inference_steps: int = 35,
        guidance_scale: float = 6.0,
        enable_sound: bool = False,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        sound_latents: torch.Tensor | None = None,
        action_latents: torch.Tensor | None = None,
        action: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        use_system_prompt: bool | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        add_resolution_template: bool = True,
        add_duration_template: bool = True,
        enable_safety_check: bool = True,
        mixed_precision_format: str | None = None,
        mixed_precision_first_steps: int | None = None,
        mixed_precision_last_steps: int | None = None,
        mixed_precision_reasoner_policy: str | None = None,
    ):
        """`Cosmos3OmniPipeline.__call__`, run through the split with the placed weights; same arguments, same
        output (with an `action`, the predicted actions too; `callback_on_step_end` is called after each step
        as diffusers calls it). Refused with an InputError naming the argument: `mixed_precision_*`, more than
        one prompt, `condition_video_keep="last"`,
        an `action` under `enable(cache="seacache")`, and (under a VRAM budget) a call whose predicted peak
        does not fit the budget. Latents that turn NaN or infinite are an InputError too, as in the CLI,
        instead of a black video."""
        arguments = dict(locals())
        del arguments["self"]
        call, inputs = read_call(self, arguments)
        state = self.offload
        call = dataclasses.replace(call, cache=state.cache, cache_threshold=state.cache_threshold)
        check_step_cache(call, inputs)
        placed = (self.transformer, self.vae, self.sound_tokenizer)
        if any(now is not then for now, then in zip(placed, state.modules)):
            raise InputError(
                "a module of this pipeline was replaced after cosmos3_offload.enable(); load the pipeline again, "
                "set its modules, then enable it"
            )
        if state.budget is not None:
            request = call_request(self, call, inputs)  # the step cache's residuals and the action tokens counted
            state.budget.check_call(request, action=inputs.action is not None)
        self._guidance_scale, self._current_timestep, self._interrupt = call.guidance, None, False
        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)  # set_progress_bar_config
        output = generate_call(self, state, call, inputs, progress=progress)
        self._num_timesteps = len(self.scheduler.timesteps)
        return output

    def to(self, *args: Any, **kwargs: Any) -> Cosmos3OmniPipeline:
        raise InputError(
            "cosmos3_offload.enable() placed this pipeline's weights (see pipe.offload.summary()); moving them "
            "would break the plan: load the pipeline again to place it differently"
        )

    def enable_model_cpu_offload(self, *args: Any, **kwargs: Any) -> None:
        raise InputError(DIFFUSERS_OFFLOAD_REFUSED)

    def enable_sequential_cpu_offload(self, *args: Any, **kwargs: Any) -> None:
        raise InputError(DIFFUSERS_OFFLOAD_REFUSED)

    def enable_group_offload(self, *args: Any, **kwargs: Any) -> None:
        raise InputError(DIFFUSERS_OFFLOAD_REFUSED)
