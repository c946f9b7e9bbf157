"""The flow-matching UniPC schedule of a request, and the check that it can run at all.

With a large shift or many steps the shifted sigmas crowd together at the top, UniPC's integer
timesteps repeat there and the scheduler fails inside its step (an assertion), after the prefill.
So a request's (steps, shift) is tried up front: the whole loop of scheduler steps on a 4-number
sample (microseconds a step), which fails exactly where the real loop would.
"""

from __future__ import annotations

import functools

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from ..errors import InputError


def flow_scheduler(shift: float, base_config: dict | None = None) -> UniPCMultistepScheduler:
    """UniPC in flow-matching mode with the request's shift, over a checkpoint's other settings."""
    overrides = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift}
    return UniPCMultistepScheduler.from_config({**(base_config or {}), **overrides, "use_karras_sigmas": False})


def request_scheduler(
    shift: float, base_config: dict | None = None, *, distilled: bool = False
) -> UniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler:
    """The flow UniPC of `flow_scheduler`; a distilled checkpoint's own (Euler) scheduler as it ships."""
    if distilled:
        return FlowMatchEulerDiscreteScheduler.from_config(base_config or {})
    return flow_scheduler(shift, base_config)


@functools.lru_cache(maxsize=64)
def _fails(steps: int, shift: float) -> bool:
    scheduler = flow_scheduler(shift)
    scheduler.set_timesteps(steps)
    sample = torch.zeros(1, 4)
    try:
        for t in scheduler.timesteps:
            sample = scheduler.step(torch.ones(1, 4), t, sample, return_dict=False)[0]
    except AssertionError:  # UniPC's own check that its order is positive
        return True
    return not bool(torch.isfinite(sample).all())


def check_schedule(steps: int, shift: float) -> None:
    """An InputError when UniPC cannot run `steps` steps at `shift`."""
    if _fails(steps, shift):
        raise InputError(
            f"{steps} steps at shift {shift:g} give a schedule with repeated timesteps, which UniPC cannot run; "
            "lower --shift or --steps"
        )
