"""What a door hands the one generation path (`generation_path.generate`), and what it gets back.

The doors are the CLI, sample files and the server (through `LoadedModel.write`) and a diffusers
pipeline under `enable()` (integration/generation.py). Each translates its input into a
`PlacedPipeline`, a request and its `GenerationHooks`, and its output from `Generated`; the phases
and their order are the path's alone, so what one door gains (the step cache, the refusal of
non-finite latents, frames or waveform) every door has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline

from ..kernels.choice import EAGER, Kernels
from ..offload.engine import OffloadEngine
from ..parallel.mesh import ProcessMesh
from ..planning.plan import Plan
from ..quant.linear import Precision
from ..quant.policy import StepPolicy, TowerSwitches, Uniform
from ..stepcache.seacache import SeaCache
from .generate import Latents, PromptTemplates, Sound


class Request(Protocol):
    """What the path reads of a request: `GenerationConfig` (app/config.py) and `PipelineCall`
    (integration/call.py) both carry it under these names."""

    prompt: str
    negative_prompt: str | None
    frames: int
    fps: float
    steps: int
    guidance: float
    sound: bool
    cache: str  # "none" or "seacache"
    cache_threshold: float | None

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def uses_guidance(self) -> bool: ...


class Fp8Steps(NamedTuple):
    """The FP8 linears' precision switches and the schedule that sets them before the prefill and before
    each denoising step (quant/policy.py)."""

    switches: TowerSwitches
    schedule: StepPolicy | Uniform

    def before_prefill(self) -> None:
        self.switches.before_prefill(self.schedule)

    def before_step(self, step: int, steps: int) -> Precision:
        return self.switches.before_step(self.schedule, step, steps)


@dataclass(frozen=True, kw_only=True)
class PlacedPipeline:
    """What runs a generation: a diffusers pipeline (its templates, packing, scheduler, VAE and sound
    decoder) whose weight groups `engine` moves as `plan` says, its layers on `kernels`. `fp8`: the
    precision switches of its FP8 linears (None: it has none); `distilled_sigmas`: a distilled
    checkpoint's fixed schedule (None: the scheduler's own); `mesh`: the other ranks, over several GPUs."""

    pipe: Cosmos3OmniPipeline
    engine: OffloadEngine
    plan: Plan
    kernels: Kernels = EAGER
    fp8: Fp8Steps | None = None
    distilled_sigmas: tuple[float, ...] | None = None
    mesh: ProcessMesh | None = None


@dataclass(frozen=True, kw_only=True)
class GenerationHooks:
    """How a door takes part in the path.

    - `generator`: what the noise is drawn from, in the pipeline's order (video, then sound): the CLI's
      request seed on the CPU, or a diffusers call's own (None: torch's global generator, as diffusers);
    - `latents`, `sound_latents`, `action_latents`: a diffusers call's starting latents, which start as
      they are (no conditioning frame is encoded into them, as in diffusers); None: drawn from `generator`;
    - `templates`: the prompt templates' switches;
    - `progress`: a progress bar over the steps; `on_step(i)`: called after step i (a server reports
      progress there, or raises to stop the request);
    - `on_decode_tile()`: called before each piece of the video decode (each latent frame of each tile;
      untiled, the frame is one tile), so what it raises stops a long decode within a piece; it propagates
      and nothing is written;
    - `decode_video`: False leaves the video as latents (diffusers' output_type="latent");
    - `after_step(i, t, latents)`: a diffusers call's `callback_on_step_end`, after step i's scheduler steps;
      what it returns are the video latents the loop goes on with; `interrupted()`: True skips the
      remaining steps (diffusers' `pipe._interrupt`), and the latents so far are decoded;
    - `preview`: shows the run as it renders (see `Preview`); None: no preview.
    """

    generator: torch.Generator | list[torch.Generator] | None
    latents: torch.Tensor | None = None
    sound_latents: torch.Tensor | None = None
    action_latents: torch.Tensor | None = None
    templates: PromptTemplates = PromptTemplates()
    progress: bool = True
    on_step: Callable[[int], None] | None = None
    on_decode_tile: Callable[[], None] | None = None
    decode_video: bool = True
    after_step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    interrupted: Callable[[], bool] | None = None
    preview: Preview | None = None


class Preview(Protocol):
    """What shows a run as it renders (app/previews.py): after step i of n, when `due(i, n)`, `show` gets the
    step's estimate of the clean video latents (float32, normalized, [1, C, T, h, w] on the device) and the
    pipeline, and writes its image whole before it returns. It must not change anything the run goes on with.
    `kind`: what it shows ("fast": a linear map of the latents; "exact": the VAE's decode of some frames)."""

    kind: str

    def due(self, index: int, steps: int) -> bool: ...

    def show(self, index: int, steps: int, denoised: torch.Tensor, placed: PlacedPipeline) -> None: ...


class Generated(NamedTuple):
    """What the path gives back; over several GPUs only the leader gets the frames and the waveform."""

    latents: Latents  # float32, after the last step
    frames: np.ndarray | None  # uint8 [T, H, W, 3]; None without `decode_video`, or off the leader
    waveform: torch.Tensor | None  # the sound decoder's [channels, samples]; None without sound, or off the leader
    step_cache: SeaCache | None  # which steps the cache computed and reused (its residuals let go)
    actions: torch.Tensor | None = (
        None  # float32 [chunk, width]: an action run's predicted actions (not forward dynamics)
    )


class GeneratedVideo(NamedTuple):
    """What the CLI's door (`runner.generate_video`) gets: the latents, the frames and sound to write."""

    latents: torch.Tensor  # [1, C, T, H, W] float32, after the last step
    frames: np.ndarray | None  # uint8 [T, H, W, 3]; None on a rank that is not the leader
    sound: Sound | None = None  # the audio track of a request with sound
    step_cache: SeaCache | None = None  # with --cache seacache: which steps it computed and reused
    actions: np.ndarray | None = None  # float32 [chunk, width]: an action run's predicted actions
