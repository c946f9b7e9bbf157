"""What a run produced and what each phase cost: the report `run` returns and the CLI prints.

Paths are printed as they are, or quoted with escapes when they hold a character a terminal acts on
(ESC, a newline, a bidi override; an undecodable byte): a file's name cannot clear the screen,
recolour the report or forge a line of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..kernels.choice import EAGER, Kernels
from ..kernels.fused import compile_failed, compile_seconds
from ..loading.components import Components
from ..planning.parallel import SINGLE, ParallelLayout
from ..stepcache.seacache import SeaCache
from .config import GenerationConfig
from .outputs import actions_beside, resolve_target
from .timer import PhaseTimer


@dataclass(frozen=True)
class RunReport:
    """What a run produced and what each phase cost."""

    config: GenerationConfig
    components: Components
    device: torch.device
    dtype: torch.dtype
    timer: PhaseTimer
    step_cache: SeaCache | None = None
    kernels: Kernels = EAGER
    layout: ParallelLayout = SINGLE
    actions: np.ndarray | None = None  # an action run's predicted actions [chunk, width]
    shape: tuple[int, int, int] | None = None  # (frames, height, width) written

    def summary(self) -> str:
        c = self.config
        if c.action is not None:
            return "\n".join([self._action_line(), *self._details()])
        return "\n".join([self._video_line(), *self._details()])

    def _action_line(self) -> str:
        c = self.config
        frames, height, width = self.shape
        predicted = ""
        if self.actions is not None:
            rows, numbers = self.actions.shape
            npy, text = (shown_path(p) for p in actions_beside(resolve_target(c.output)))
            predicted = f"; {rows} predicted actions of {numbers} numbers in {npy} and {text}"
        return (
            f"wrote {shown_path(c.output)} ({c.action}, {c.domain}, chunk {c.chunk_size}: {frames} frames, "
            f"{width}x{height}, {c.steps} steps, guidance {c.guidance:g}, seed {c.seed}{predicted})"
        )

    def _video_line(self) -> str:
        c = self.config
        return (
            f"wrote {shown_path(c.output)} ({c.frames} frame{'s' if c.frames > 1 else ''}, {c.width}x{c.height}, "
            f"{c.steps} steps, guidance {c.guidance:g}, shift {c.flow_shift:g}, seed {c.seed}"
            f"{', with sound' if c.sound else ''})"
        )

    def _details(self) -> list[str]:
        lines = [
            f"model: {shown_path(self.components.source)} on {self.device} in {str(self.dtype).removeprefix('torch.')}",
        ]
        if self.components.random_weights:
            lines.append("note: random weights produce noise; pass --checkpoint DIR for a real video")
        lines.append(f"plan: {self.components.plan.describe()}")
        if self.layout.parallel:
            per = "process" if self.layout.on_cpu else "GPU"
            lines.append(f"parallel: {self.layout.describe()}; the plan, memory and copies are per {per}")
        if self.components.quantization.quantized:
            lines.append(f"fp8: {self.components.switches.describe()}")
        lines.append(f"kernels: {describe_kernels(self.kernels)}")
        if self.step_cache is not None:
            lines.append(self.step_cache.summary())
        lines.append(self.components.engine.summary())
        lines.append(self.timer.summary())
        return lines


def shown_path(path: str | os.PathLike) -> str:
    """`path` as the report prints it: as it is when every character is printable, else its quoted repr."""
    text = os.fspath(path)
    return text if text.isprintable() else repr(text)


def describe_kernels(kernels: Kernels) -> str:
    """'attention cudnn; fused norms, rotary, gating and residual adds (compiled in 13.0 s)' and the like."""
    attention = "diffusers' dispatcher" if kernels.attention is None else kernels.attention_name
    if not kernels.fused:
        return f"attention {attention}; eager norms and rotary"
    if compile_failed():
        return f"attention {attention}; fused norms, rotary, gating and residual adds (eager: compiling failed)"
    return (
        f"attention {attention}; fused norms, rotary, gating and residual adds (compiled in {compile_seconds():.1f} s)"
    )
