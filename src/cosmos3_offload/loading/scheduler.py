"""A checkpoint's scheduler config, checked to build the scheduler a run samples with before anything loads.

A run builds its scheduler from `scheduler/scheduler_config.json` only after the weights are loaded
(see app/schedule.py): UniPC for a full checkpoint, the distilled repos' flow-matching Euler for a
distilled one, whichever class the file names. A value diffusers cannot use would fail there, in a
traceback, minutes in. So the same class is built here from the same file and takes a few steps of a
schedule on a 4-number sample (microseconds each); whatever it raises becomes one line naming the
file. `num_train_timesteps` is bounded first: the constructor allocates arrays of that length.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from ..errors import InputError, first_line
from .file_kinds import present
from .files import read_json

SCHEDULER_FILE = Path("scheduler") / "scheduler_config.json"
MAX_TRAIN_TIMESTEPS = 1_000_000  # Cosmos3 trains with 1000; the constructor allocates arrays of this length
TRIAL_STEPS = 4


def scheduler_config(checkpoint: Path | None, distilled_sigmas: tuple[float, ...] | None = None) -> dict[str, Any]:
    """The folder's scheduler config ({} without one: the scheduler's defaults), or an InputError naming the file
    when the scheduler a run builds from it (Euler with `distilled_sigmas`, UniPC otherwise) cannot sample."""
    file = None if checkpoint is None else checkpoint / SCHEDULER_FILE
    if file is None or not present(file):
        return {}
    config = read_json(file, "scheduler config")
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_TRAIN_TIMESTEPS:
        raise InputError(
            f"scheduler config {str(file)!r} has num_train_timesteps {steps!r}; it must be a whole number "
            f"from 1 to {MAX_TRAIN_TIMESTEPS} (Cosmos3's is 1000)"
        )
    problem = _trial_problem(json.dumps(config, sort_keys=True), distilled_sigmas)
    if problem is not None:
        raise InputError(f"scheduler config {str(file)!r} cannot be used: {problem}")
    return config


@functools.lru_cache(maxsize=16)
def _trial_problem(config_text: str, distilled_sigmas: tuple[float, ...] | None) -> str | None:
    """Why the scheduler a run builds from this config fails a short schedule (None: it samples)."""
    config = json.loads(config_text)
    cls = UniPCMultistepScheduler if distilled_sigmas is None else FlowMatchEulerDiscreteScheduler
    try:
        scheduler = cls.from_config(config)
        if distilled_sigmas is None:
            scheduler.set_timesteps(TRIAL_STEPS)
        else:
            scheduler.set_timesteps(sigmas=list(distilled_sigmas))
        sample = torch.zeros(1, 4)
        for t in scheduler.timesteps:
            sample = scheduler.step(torch.ones(1, 4), t, sample, return_dict=False)[0]
    except Exception as error:  # diffusers raises many kinds for values it cannot use
        return f"diffusers' {cls.__name__} refuses it: {first_line(error)}"
    if not bool(torch.isfinite(sample).all()):
        return f"diffusers' {cls.__name__} samples NaN or infinity with it"
    return None
