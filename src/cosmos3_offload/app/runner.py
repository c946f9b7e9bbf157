"""One whole request, phase by phase: load, (encode,) prefill, denoise, decode, write.

This is the library's entry point (`cosmos3_offload.run`); the CLI only translates flags into
its arguments and prints the report it returns. Everything that can be refused is refused before
anything loads; the output is held (locked) for the run and written whole or not at all.

Launched over several processes (torchrun, or `generate --gpus N`), each rank runs this same code on
its own GPU with its part of the work (see app/distributed.py); rank 0 plans, writes the output and
returns the report, the others return None.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import InputError
from ..kernels.choice import EAGER, Kernels
from ..kernels.fused import compile_failed, compile_seconds
from ..kernels.probe import DIFFUSERS, choose_attention, kernel_rates
from ..loading.components import Components, load_components, model_configs
from ..loading.files import check_checkpoint
from ..loading.layout import default_negative_prompt, has_sound_tokenizer, pipeline_options, sound_config
from ..loading.quantization import NO_FP8_FLAGS, Fp8Options
from ..model.groups import GENERATOR, REASONER, SOUND, VAE, VAE_ENCODER
from ..model.specs import model_spec
from ..offload.shared import HostShare
from ..parallel.mesh import ProcessMesh
from ..planning.parallel import SINGLE, ParallelLayout
from ..planning.plan import Plan
from ..stepcache.seacache import SeaCache, seacache_config
from .config import DEFAULT_KERNELS, GenerationConfig, KernelOptions, resolve_device, resolve_dtype
from .device_profile import probe_shape
from .distributed import parallel_layout, rank_device, start_mesh
from .feasibility import check_fits
from .generate import (
    Latents,
    Sampling,
    Sound,
    conditioned_latents,
    decode_frames,
    decode_sound,
    denoise_latents,
    helper_pipeline,
    initial_noise,
    initial_sound_noise,
    mesh_branches,
    noise_generator,
    prefill_branches,
    prepare_branches,
)
from .inputs import Conditioning, read_conditioning
from .outputs import OutputLock, write_output
from .schedule import request_scheduler
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
    step_cache: SeaCache | None = None
    kernels: Kernels = EAGER
    layout: ParallelLayout = SINGLE

    def summary(self) -> str:
        c = self.config
        lines = [
            f"wrote {c.output} ({c.frames} frame{'s' if c.frames > 1 else ''}, {c.width}x{c.height}, "
            f"{c.steps} steps, guidance {c.guidance:g}, shift {c.flow_shift:g}, seed {c.seed}"
            f"{', with sound' if c.sound else ''})",
            f"model: {self.components.source} on {self.device} in {str(self.dtype).removeprefix('torch.')}",
        ]
        if self.components.random_weights:
            lines.append("note: random weights produce noise; pass --checkpoint DIR for a real video")
        lines.append(f"plan: {self.components.plan.describe()}")
        if self.layout.parallel:
            lines.append(f"parallel: {self.layout.describe()}; the plan, memory and copies are per GPU")
        if self.components.quantization.quantized:
            lines.append(f"fp8: {self.components.switches.describe()}")
        lines.append(f"kernels: {describe_kernels(self.kernels)}")
        if self.step_cache is not None:
            lines.append(self.step_cache.summary())
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
    fp8: Fp8Options = NO_FP8_FLAGS,
    kernels: KernelOptions = DEFAULT_KERNELS,
    cfg_parallel: str = "auto",
) -> RunReport | None:
    """Generate `config.output` following `plan` (default: everything resident).

    Without a checkpoint the weights are seeded random values of the registered size `model`.
    Bad input raises InputError before anything is loaded; `budgeted` says the plan already came
    from the planner for a budget, so the fit against this machine's memory is not asked again.
    Over several processes every rank calls this; rank 0's plan is everyone's, rank 0 writes the
    output and gets the report (the others None). `cfg_parallel`: auto, on or off (planning/parallel.py).
    """
    loaded = LoadedModel.open(
        checkpoint=checkpoint,
        device=device,
        dtype=dtype,
        plan=plan,
        model=model,
        sound=config.sound,
        fp8=fp8,
        kernel_options=kernels,
    )
    layout = parallel_layout(config, model_configs(loaded.checkpoint, loaded.model)[0], cfg_parallel)
    config = loaded.check(config, budgeted=budgeted, layout=layout)
    # Read before the load: a conditioning file that cannot be used costs nothing.
    conditioning = read_conditioning(config.image, config.video, config.condition_frames)
    mesh = start_mesh(layout, loaded.device)
    try:
        leader = mesh is None or mesh.leader
        if mesh is not None:
            loaded.plan = mesh.broadcast_from_leader(loaded.plan)  # each rank measured its own budget
            loaded.mesh = mesh
        with OutputLock(config.output) if leader else nullcontext():
            timer = PhaseTimer(loaded.device)
            loaded.load(timer, progress=progress and leader)
            return loaded.write(config, timer, conditioning=conditioning, progress=progress and leader)
    finally:
        if mesh is not None:
            mesh.close()


@dataclass
class LoadedModel:
    """A model opened for a run: checked on `open`, loaded once by `load`, then asked for any number
    of requests with `check` and `write` (a sample file's requests share one load)."""

    checkpoint: Path | None
    device: torch.device
    dtype: torch.dtype
    plan: Plan
    model: str
    sound: bool = False
    fp8: Fp8Options = NO_FP8_FLAGS
    kernel_options: KernelOptions = DEFAULT_KERNELS
    components: Components | None = None
    kernels: Kernels | None = None  # chosen by `load` (a GPU's probe, cached per GPU)
    mesh: ProcessMesh | None = None  # the other ranks, over several processes

    @classmethod
    def open(
        cls,
        *,
        checkpoint: Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        plan: Plan | None = None,
        model: str = "tiny",
        sound: bool = False,
        fp8: Fp8Options = NO_FP8_FLAGS,
        kernel_options: KernelOptions = DEFAULT_KERNELS,
    ) -> LoadedModel:
        """`sound` loads the sound tokenizer too, for requests with sound; `fp8`: the FP8 flags;
        `kernel_options`: the attention and compile choices (a named attention is checked here)."""
        torch_device = rank_device(resolve_device(device))
        torch_dtype = resolve_dtype(dtype, torch_device)
        plan = plan or Plan()
        checkpoint = None if checkpoint is None else Path(checkpoint)
        if checkpoint is not None:
            check_checkpoint(checkpoint)
        else:
            model_spec(model)
        if fp8.quantize is not None and plan.maps_checkpoint:
            raise InputError(
                "--quantize writes FP8 copies of the weights, so the reasoner cannot be read from the files"
            )
        kernel_options.check_available(torch_device, torch_dtype)
        return cls(checkpoint, torch_device, torch_dtype, plan, model, sound, fp8, kernel_options)

    def check(
        self, config: GenerationConfig, *, budgeted: bool = False, layout: ParallelLayout = SINGLE
    ) -> GenerationConfig:
        """The request as this model runs it, or an InputError before anything loads: sound without a
        sound branch, a request that does not fit this machine (unless a budget's planner chose the
        plan). Without a negative prompt it gets the checkpoint's default (see loading/layout.py)."""
        check_sound(config, self.checkpoint)
        check_distilled(config, self.checkpoint)
        if config.sound and not self.sound:
            raise InputError("this model was opened without sound; open it with sound=True for requests with sound")
        if not budgeted:
            check_fits(
                config,
                self.plan,
                checkpoint=self.checkpoint,
                model=self.model,
                device=self.device,
                dtype=self.dtype,
                fp8=self.fp8,
                layout=layout,
            )
        if config.negative_prompt is None:
            conditioned = config.image is not None or config.video is not None
            default = default_negative_prompt(self.checkpoint, frames=config.frames, conditioned=conditioned)
            if default is not None:
                logger.info("negative prompt: the checkpoint's default from assets/")
                config = dataclasses.replace(config, negative_prompt=default)
        return config

    def load(self, timer: PhaseTimer, *, progress: bool = False) -> Components:
        if self.kernels is None:
            self.kernels = self._choose_kernels(timer)
        if self.components is None:
            with timer.phase("load"):
                self.components = load_components(
                    self.checkpoint,
                    self.device,
                    self.dtype,
                    self.plan,
                    random_model=self.model,
                    sound=self.sound,
                    progress=progress,
                    fp8=self.fp8,
                    host_share=self._host_share(),
                )
        return self.components

    def _host_share(self) -> HostShare | None:
        """Over several processes: one host copy of the weights, filled by the host's first rank."""
        if self.mesh is None:
            return None
        return HostShare(name=self.mesh.run_name, owner=self.mesh.host_leader, wait=self.mesh.wait_for_all)

    def _choose_kernels(self, timer: PhaseTimer) -> Kernels:
        """The attention (a GPU's probe picks it, once per GPU: see kernels/probe.py) and the fused ops."""
        options = self.kernel_options
        rates = None
        if self.device.type == "cuda":
            with timer.phase("probe"):
                rates = kernel_rates(self.device, probe_shape(model_configs(self.checkpoint, self.model)[0]))
        kernels = choose_attention(self.device, options.attention, dtype=self.dtype, rates=rates)
        if self.mesh is not None:
            # Every rank runs the leader's pick: timing noise must not give ranks different roundings.
            mine = DIFFUSERS if kernels.attention is None else kernels.attention_name
            leaders = self.mesh.broadcast_from_leader(mine)
            if leaders != mine:
                kernels = choose_attention(self.device, leaders, dtype=self.dtype, rates=rates)
        return dataclasses.replace(kernels, fused=options.fused(self.device))

    def write(
        self,
        config: GenerationConfig,
        timer: PhaseTimer,
        *,
        conditioning: Conditioning | None = None,
        progress: bool = True,
        on_step: Callable[[int], None] | None = None,
    ) -> RunReport | None:
        """Generate one request into `config.output` (the caller holds its OutputLock). Over several
        processes every rank calls this and only the leader writes and reports. `on_step(i)` is called
        after denoising step i (a server reports progress there, or raises to stop the request)."""
        components = self.load(timer)
        video = generate_video(
            config,
            components,
            timer,
            progress=progress,
            on_step=on_step,
            conditioning=conditioning,
            kernels=self.kernels,
            mesh=self.mesh,
        )
        if video.frames is None:
            return None  # not the leader: it has written the video
        with timer.phase("write"):
            write_output(video.frames, config.output, config.fps, sound=video.sound)
        layout = SINGLE if self.mesh is None else self.mesh.layout
        return RunReport(config, components, self.device, self.dtype, timer, video.step_cache, self.kernels, layout)


class GeneratedVideo(NamedTuple):
    latents: torch.Tensor  # [1, C, T, H, W] float32, after the last step
    frames: np.ndarray | None  # uint8 [T, H, W, 3]; None on a rank that is not the leader
    sound: Sound | None = None  # the audio track of a request with sound
    step_cache: SeaCache | None = None  # with --cache seacache: which steps it computed and reused


def generate_video(
    config: GenerationConfig,
    components: Components,
    timer: PhaseTimer,
    *,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    conditioning: Conditioning | None = None,
    kernels: Kernels = EAGER,
    mesh: ProcessMesh | None = None,
) -> GeneratedVideo:
    """(Encode,) prefill, denoise and decode, each while its group's weights are on the device;
    the reasoner and generator layers run on `kernels` (attention implementation, fused ops).
    With a `mesh`, this rank's branches and tokens (see generate.py); the leader gets the frames."""
    if config.sound and components.sound_tokenizer is None:
        raise InputError("this model was loaded without its sound tokenizer; load it with sound to generate sound")
    options = components.options
    scheduler = request_scheduler(config.flow_shift, components.scheduler_config, distilled=options.distilled)
    pipe = helper_pipeline(components, scheduler)
    engine, plan = components.engine, components.plan
    with torch.no_grad():
        generator = noise_generator(config)
        vision = initial_noise(pipe, config, engine.device, generator)
        sound = initial_sound_noise(pipe, config, engine.device, generator) if config.sound else None
        indexes = () if conditioning is None else conditioning.indexes
        if conditioning is not None:
            with timer.phase("encode"), engine.use(VAE_ENCODER):
                vision = conditioned_latents(pipe, conditioning, vision, config.height, config.width, engine.device)
        sampling = Sampling()
        if options.distilled:
            sampling = Sampling(options.distilled_sigmas, generator, _anchor(vision, indexes) if indexes else None)
        switches, schedule = components.switches, components.schedule
        fp8 = components.quantization.quantized
        if fp8:
            switches.before_prefill(schedule)
        with timer.phase("prefill"), engine.use(REASONER):
            branches = mesh_branches(prepare_branches(pipe, config, vision, indexes, sound), mesh)
            if mesh is not None:
                mesh.layout.check_tokens(branches[0].layout.tokens)  # with sound: its tokens too
            memories = prefill_branches(pipe, branches, layers=engine.layers(REASONER), kernels=kernels)
        step_cache = (
            SeaCache(seacache_config(config.cache_threshold), len(branches)) if config.cache != "none" else None
        )
        with timer.phase("denoise"), engine.use(GENERATOR):
            latents = denoise_latents(
                pipe,
                config,
                branches,
                memories,
                Latents(vision, sound),
                progress=progress,
                layers=lambda: engine.layers(GENERATOR),
                mlp_chunk=plan.mlp_chunk,
                on_step=on_step,
                sampling=sampling,
                before_step=(lambda step, steps: switches.before_step(schedule, step, steps)) if fp8 else None,
                step_cache=step_cache,
                kernels=kernels,
                mesh=mesh,
            )
            del memories
        check_finite(
            latents.vision if latents.sound is None else torch.cat([latents.vision.flatten(), latents.sound.flatten()])
        )
        with timer.phase("decode"):
            with engine.use(VAE):
                frames = decode_frames(pipe, latents.vision, grid=plan.decode_grid, mesh=mesh)
            audio = None
            if latents.sound is not None and frames is not None:
                with engine.use(SOUND):
                    audio = decode_sound(pipe, latents.sound)
        return GeneratedVideo(latents.vision, frames, audio, step_cache)


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


def _anchor(conditioned: torch.Tensor, indexes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [T, 1, 1] with 1 at the conditioned latent frames, the latents holding them clean)."""
    mask = torch.zeros(conditioned.shape[2], 1, 1, device=conditioned.device, dtype=conditioned.dtype)
    mask[list(indexes)] = 1.0
    return mask, conditioned.clone()


def check_distilled(config: GenerationConfig, checkpoint: Path | None) -> None:
    """A distilled checkpoint's step count is its schedule's and its guidance is baked in (scale 1)."""
    sigmas = pipeline_options(checkpoint).distilled_sigmas
    if sigmas is not None and (config.steps != len(sigmas) or config.guidance != 1.0):
        raise InputError(
            f"checkpoint {str(checkpoint)!r} is distilled: it samples in exactly {len(sigmas)} steps with guidance "
            f"baked in; use --steps {len(sigmas)} --guidance 1, or leave both out"
        )


def check_sound(config: GenerationConfig, checkpoint: Path | None) -> None:
    """Sound needs a checkpoint with a sound tokenizer whose transformer was trained with sound."""
    if not config.sound:
        return
    if not has_sound_tokenizer(checkpoint):
        where = "the embedded model" if checkpoint is None else f"checkpoint {str(checkpoint)!r}"
        raise InputError(f"--sound needs a checkpoint with a sound_tokenizer/ folder, and {where} has none")
    sound_config(checkpoint)  # builds, with a usable sampling rate
    transformer_config, _ = model_configs(checkpoint)
    if not transformer_config.get("sound_gen", False):
        raise InputError(
            f"--sound: the transformer of {str(checkpoint)!r} was not trained with sound (sound_gen is off)"
        )


def check_finite(latents: torch.Tensor) -> None:
    """Refuse to decode NaN or infinite latents (they decode to a black or garbage video). Waits for the device."""
    if not bool(torch.isfinite(latents).all()):
        raise InputError(
            "the denoised latents are not finite (NaN or infinity), so no video was written; "
            "lower --guidance or --shift, or use --dtype float32"
        )
