"""One whole request, phase by phase: load, (encode,) prefill, denoise, decode, write.

This is the library's entry point (`cosmos3_offload.run`); the CLI only translates flags into
its arguments and prints the report it returns. Everything that can be refused is refused before
anything loads; the output is held (locked) for the run and written whole or not at all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import InputError
from ..loading.checkpoint import check_checkpoint
from ..loading.components import Components, load_components
from ..model.groups import GENERATOR, REASONER, VAE, VAE_ENCODER
from ..model.specs import model_spec
from ..planning.plan import Plan
from ..vae.encode import condition_pixels, conditioned_noise
from .config import GenerationConfig, resolve_device, resolve_dtype
from .feasibility import check_fits
from .generate import (
    decode_frames,
    denoise_latents,
    helper_pipeline,
    initial_noise,
    prefill_branches,
    prepare_branches,
)
from .inputs import Conditioning, read_conditioning
from .outputs import OutputLock, write_output
from .schedule import flow_scheduler
from .timer import PhaseTimer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunReport:
    """What a run produced and what each phase cost."""

    config: GenerationConfig
    components: Components
    device: torch.device
    dtype: torch.dtype
    timer: PhaseTimer

    def summary(self) -> str:
        c = self.config
        lines = [
            f"wrote {c.output} ({c.frames} frame{'s' if c.frames > 1 else ''}, {c.width}x{c.height}, "
            f"{c.steps} steps, guidance {c.guidance:g}, shift {c.flow_shift:g}, seed {c.seed})",
            f"model: {self.components.source} on {self.device} in {str(self.dtype).removeprefix('torch.')}",
        ]
        if self.components.random_weights:
            lines.append("note: random weights produce noise; pass --checkpoint DIR for a real video")
        lines.append(f"plan: {self.components.plan.describe()}")
        lines.append(self.components.engine.summary())
        lines.append(self.timer.summary())
        return "\n".join(lines)


def run(
    config: GenerationConfig,
    *,
    checkpoint: Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    plan: Plan | None = None,
    model: str = "tiny",
    progress: bool = True,
    budgeted: bool = False,
) -> RunReport:
    """Generate `config.output` following `plan` (default: everything resident).

    Without a checkpoint the weights are seeded random values of the registered size `model`.
    Bad input raises InputError before anything is loaded; `budgeted` says the plan already came
    from the planner for a budget, so the fit against this machine's memory is not asked again.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    plan = plan or Plan()
    check_single_process(plan)
    checkpoint = None if checkpoint is None else Path(checkpoint)
    if checkpoint is not None:
        check_checkpoint(checkpoint)
    else:
        model_spec(model)
    if not budgeted:
        check_fits(config, plan, checkpoint=checkpoint, model=model, device=torch_device, dtype=torch_dtype)
    conditioning = read_conditioning(config.image, config.video, config.condition_frames)
    with OutputLock(config.output):
        timer = PhaseTimer(torch_device)
        with timer.phase("load"):
            components = load_components(checkpoint, torch_device, torch_dtype, plan, random_model=model)
        video = generate_video(config, components, timer, progress=progress, conditioning=conditioning)
        with timer.phase("write"):
            write_output(video.frames, config.output, config.fps)
    return RunReport(config, components, torch_device, torch_dtype, timer)


class GeneratedVideo(NamedTuple):
    latents: torch.Tensor  # [1, C, T, H, W] float32, after the last step
    frames: np.ndarray  # uint8 [T, H, W, 3]


def generate_video(
    config: GenerationConfig,
    components: Components,
    timer: PhaseTimer,
    *,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    conditioning: Conditioning | None = None,
) -> GeneratedVideo:
    """(Encode,) prefill, denoise and decode, each while its group's weights are on the device."""
    pipe = helper_pipeline(components, flow_scheduler(config.flow_shift, components.scheduler_config))
    engine, plan = components.engine, components.plan
    with torch.no_grad():
        latents = initial_noise(pipe, config, engine.device)
        indexes = () if conditioning is None else conditioning.indexes
        if conditioning is not None:
            with timer.phase("encode"), engine.use(VAE_ENCODER):
                pixels = condition_pixels(
                    pipe,
                    image=conditioning.image,
                    video=conditioning.video,
                    condition_frames=indexes,
                    height=config.height,
                    width=config.width,
                    device=engine.device,
                )
                latents = conditioned_noise(pipe, pixels, indexes, latents)
        with timer.phase("prefill"), engine.use(REASONER):
            branches = prepare_branches(pipe, config, latents, indexes)
            memories = prefill_branches(pipe, branches, layers=engine.layers(REASONER))
        with timer.phase("denoise"), engine.use(GENERATOR):
            latents = denoise_latents(
                pipe,
                config,
                branches,
                memories,
                latents,
                progress=progress,
                layers=lambda: engine.layers(GENERATOR),
                mlp_chunk=plan.mlp_chunk,
                on_step=on_step,
            )
            del memories
        check_finite(latents)
        with timer.phase("decode"), engine.use(VAE):
            return GeneratedVideo(latents, decode_frames(pipe, latents, grid=plan.decode_grid))


def check_finite(latents: torch.Tensor) -> None:
    """Refuse to decode NaN or infinite latents (they decode to a black or garbage video). Waits for the device."""
    if not bool(torch.isfinite(latents).all()):
        raise InputError(
            "the denoised latents are not finite (NaN or infinity), so no video was written; "
            "lower --guidance or --shift, or use --dtype float32"
        )


def check_single_process(plan: Plan) -> None:
    """Staging assumes it owns the GPU: refuse a multi-process launch before anything is allocated."""
    text = os.environ.get("WORLD_SIZE", "").strip() or "1"
    try:
        world_size = int(text)
    except ValueError:
        raise InputError(f"WORLD_SIZE={text!r} is not a process count; unset it or set a whole number") from None
    if world_size < 1:
        raise InputError(f"WORLD_SIZE={text!r} must be at least 1; unset it or set a whole number")
    if plan.moves_weights and world_size > 1:
        raise InputError(f"staging runs one process on one GPU, but WORLD_SIZE={world_size}; launch a single process")
