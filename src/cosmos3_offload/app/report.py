"""What a run produced and what each phase cost: the report `run` returns and the CLI prints.

Paths are printed as they are, or quoted with escapes when they hold a character a terminal acts on
(ESC, a newline, a bidi override; an undecodable byte): a file's name cannot clear the screen,
recolour the report or forge a line of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..kernels.choice import EAGER, Kernels
from ..kernels.fused import compile_failed, compile_seconds
from ..loading.components import Components
from ..planning.parallel import SINGLE, ParallelLayout
from ..stepcache.seacache import SeaCache
from .config import GenerationConfig
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

    def summary(self) -> str:
        c = self.config
        lines = [
            f"wrote {shown_path(c.output)} ({c.frames} frame{'s' if c.frames > 1 else ''}, {c.width}x{c.height}, "
            f"{c.steps} steps, guidance {c.guidance:g}, shift {c.flow_shift:g}, seed {c.seed}"
            f"{', with sound' if c.sound else ''})",
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
        return "\n".join(lines)


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
