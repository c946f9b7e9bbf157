"""One whole request, stage by stage: load, prefill, denoise, decode, write.

This is the library's entry point (`cosmos3_offload.run`); the CLI only translates flags into
its arguments and prints the report it returns.
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

from .conditioning import Conditioning, condition_pixels, conditioned_noise, read_conditioning
from .config import GenerationConfig, resolve_device, resolve_dtype
from .errors import InputError
from .generate import (
    decode_frames,
    denoise_latents,
    flow_scheduler,
    helper_pipeline,
    initial_noise,
    prefill_branches,
    prepare_branches,
)
from .groups import GENERATOR, REASONER, VAE, VAE_ENCODER
from .loading import Components, check_checkpoint, load_components
from .model_specs import model_spec
from .plan import Plan
from .stages import StageRecorder
from .video_io import write_frames

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunReport:
    """What a run produced and what each stage cost."""

    config: GenerationConfig
    components: Components
    device: torch.device
    dtype: torch.dtype
    stages: StageRecorder

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
        lines.append(self.stages.summary())
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
) -> RunReport:
    """Generate `config.output` following `plan` (default: everything resident).

    Without a checkpoint the weights are seeded random values of the registered size `model`.
    Bad input raises InputError before anything is loaded.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    plan = plan or Plan()
    check_single_process(plan)
    if checkpoint is not None:
        check_checkpoint(Path(checkpoint))
    else:
        model_spec(model)
    conditioning = read_conditioning(config.image, config.video, config.condition_frames)
    recorder = StageRecorder(torch_device)
    with recorder.stage("load"):
        components = load_components(
            checkpoint and Path(checkpoint), torch_device, torch_dtype, plan, random_model=model
        )
    video = generate_video(config, components, recorder, progress=progress, conditioning=conditioning)
    with recorder.stage("write"):
        write_frames(video.frames, config.output, config.fps)
    return RunReport(config, components, torch_device, torch_dtype, recorder)


class GeneratedVideo(NamedTuple):
    latents: torch.Tensor  # [1, C, T, H, W] float32, after the last step
    frames: np.ndarray  # uint8 [T, H, W, 3]


def generate_video(
    config: GenerationConfig,
    components: Components,
    recorder: StageRecorder,
    *,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    conditioning: Conditioning | None = None,
) -> GeneratedVideo:
    """(Encode,) prefill, denoise and decode, each inside its group's staging phase."""
    pipe = helper_pipeline(components, flow_scheduler(config.flow_shift, components.scheduler_config))
    engine, plan = components.engine, components.plan
    with torch.no_grad():
        latents = initial_noise(pipe, config, engine.device)
        indexes = () if conditioning is None else conditioning.indexes
        if conditioning is not None:
            with recorder.stage("encode"), engine.phase(VAE_ENCODER):
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
        with recorder.stage("prefill"), engine.phase(REASONER):
            branches = prepare_branches(pipe, config, latents, indexes)
            memories = prefill_branches(pipe, branches, layers=engine.layers(REASONER))
        with recorder.stage("denoise"), engine.phase(GENERATOR):
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
        with recorder.stage("decode"), engine.phase(VAE):
            return GeneratedVideo(latents, decode_frames(pipe, latents, grid=plan.decode_grid))


def check_single_process(plan: Plan) -> None:
    """Staging assumes it owns the GPU: refuse a multi-process launch before anything is allocated."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if plan.moves_weights and world_size > 1:
        raise InputError(f"staging runs one process on one GPU, but WORLD_SIZE={world_size}; launch a single process")
