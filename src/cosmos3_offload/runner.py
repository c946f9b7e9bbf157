"""One whole request, stage by stage: load, prefill, denoise, decode, write.

This is the library's entry point (`cosmos3_offload.run`); the CLI only translates flags into
its arguments and prints the report it returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import GenerationConfig, resolve_device, resolve_dtype
from .generate import (
    decode_frames,
    denoise_latents,
    flow_scheduler,
    helper_pipeline,
    initial_noise,
    prefill_branches,
    prepare_branches,
)
from .loading import check_checkpoint, load_components
from .stages import StageRecorder
from .video_io import write_frames

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunReport:
    """What a run produced and what each stage cost."""

    config: GenerationConfig
    source: str
    random_weights: bool
    device: torch.device
    dtype: torch.dtype
    stages: StageRecorder

    def summary(self) -> str:
        c = self.config
        lines = [
            f"wrote {c.output} ({c.frames} frame{'s' if c.frames > 1 else ''}, {c.width}x{c.height}, "
            f"{c.steps} steps, guidance {c.guidance:g}, shift {c.flow_shift:g}, seed {c.seed})",
            f"model: {self.source} on {self.device} in {str(self.dtype).removeprefix('torch.')}",
        ]
        if self.random_weights:
            lines.append("note: random weights produce noise; pass --checkpoint DIR for a real video")
        lines.append(self.stages.summary())
        return "\n".join(lines)


def run(
    config: GenerationConfig,
    *,
    checkpoint: Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> RunReport:
    """Generate `config.output`. Bad input raises ValueError before anything is loaded."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if checkpoint is not None:
        check_checkpoint(Path(checkpoint))
    recorder = StageRecorder(torch_device)
    with recorder.stage("load"):
        components = load_components(checkpoint and Path(checkpoint), torch_device, torch_dtype)
    pipe = helper_pipeline(components, flow_scheduler(components, config.flow_shift))
    with torch.no_grad():
        with recorder.stage("prefill"):
            latents = initial_noise(pipe, config, torch_device)
            branches = prepare_branches(pipe, config, latents)
            memories = prefill_branches(pipe, branches)
        with recorder.stage("denoise"):
            latents = denoise_latents(pipe, config, branches, memories, latents, progress=progress)
            del memories
        with recorder.stage("decode"):
            frames = decode_frames(pipe, latents)
    with recorder.stage("write"):
        write_frames(frames, config.output, config.fps)
    return RunReport(config, components.source, components.random_weights, torch_device, torch_dtype, recorder)
