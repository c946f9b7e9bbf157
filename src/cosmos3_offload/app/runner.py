"""One whole request, phase by phase: load, (encode,) prefill, denoise, decode, write.

This is the library's entry point (`cosmos3_offload.run`); the CLI only translates flags into
its arguments and prints the report it returns. Everything that can be refused is refused before
anything loads; the output is held (locked) for the run and written whole or not at all.

`generate` is the one generation path: the CLI, sample files and the server reach it through
`generate_video`, a diffusers pipeline under `enable()` through integration/generation.py (see doors.py).

Launched over several processes (torchrun, or `generate --gpus N`), each rank runs this same code on
its own GPU with its part of the work (see app/distributed.py); rank 0 plans, writes the output and
returns the report, the others return None.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.utils.torch_utils import randn_tensor

from ..errors import InputError, first_line
from ..kernels.choice import EAGER, Kernels
from ..kernels.probe import DIFFUSERS, choose_attention, kernel_rates
from ..loading.components import Components, load_components, model_configs
from ..loading.files import check_checkpoint
from ..loading.layout import default_negative_prompt
from ..loading.mapped_reasoner import check_mapped_reasoner
from ..loading.quantization import NO_FP8_FLAGS, Fp8Options
from ..model.groups import GENERATOR, REASONER, SOUND, VAE, VAE_ENCODER
from ..model.specs import model_spec
from ..offload.shared import HostShare
from ..parallel.mesh import ProcessMesh
from ..planning.parallel import SINGLE, ParallelLayout
from ..planning.plan import Plan
from ..stepcache.seacache import SeaCache, seacache_config
from ..vae.decode import NonFinitePixels
from ..vae.encode import action_pixels, conditioned_noise
from .action_input import ActionGeometry, ActionInput, action_geometry, action_latent_shape, initial_action_latents
from .config import (
    DEFAULT_KERNELS,
    GenerationConfig,
    KernelOptions,
    check_output_spares_checkpoint,
    resolve_device,
    resolve_dtype,
)
from .device_profile import probe_shape
from .distributed import parallel_layout, rank_device, start_mesh
from .doors import Fp8Steps, Generated, GeneratedVideo, GenerationHooks, PlacedPipeline, Request
from .feasibility import check_fits
from .finite import SOUND_BROKEN, VAE_BROKEN, check_finite, not_finite
from .generate import (
    ActionTokens,
    Latents,
    PromptTemplates,
    Sampling,
    Sound,
    conditioned_latents,
    decode_frames,
    denoise_latents,
    helper_pipeline,
    initial_sound_noise,
    latent_shape,
    mesh_branches,
    noise_generator,
    prefill_branches,
    prepare_branches,
)
from .inputs import Conditioning, read_conditioning
from .model_checks import check_action_heads, check_distilled, check_sound
from .outputs import ActionRows, OutputLock, write_output
from .report import RunReport
from .schedule import request_scheduler
from .timer import PhaseTimer

logger = logging.getLogger(__name__)


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
        actions=config.action is not None,
        fp8=fp8,
        kernel_options=kernels,
    )
    layout = parallel_layout(config, model_configs(loaded.checkpoint, loaded.model)[0], cfg_parallel)
    config = loaded.check(config, budgeted=budgeted, layout=layout)
    check_output_spares_checkpoint(config.output, loaded.checkpoint)
    # Read before the load: a conditioning file that cannot be used costs nothing.
    conditioning = read_conditioning(config)
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
    actions: bool = False
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
        actions: bool = False,
        fp8: Fp8Options = NO_FP8_FLAGS,
        kernel_options: KernelOptions = DEFAULT_KERNELS,
    ) -> LoadedModel:
        """`sound` loads the sound tokenizer too, for requests with sound; `actions` the action heads, for
        action runs (refused for a model without them); `fp8`: the FP8 flags;
        `kernel_options`: the attention and compile choices (a named attention is checked here)."""
        torch_device = rank_device(resolve_device(device))
        torch_dtype = resolve_dtype(dtype, torch_device)
        plan = plan or Plan()
        checkpoint = None if checkpoint is None else Path(checkpoint)
        if checkpoint is not None:
            check_checkpoint(checkpoint)
        else:
            model_spec(model)
        check_mapped_reasoner(plan, has_files=checkpoint is not None, rewrites_weights=fp8.quantize is not None)
        kernel_options.check_available(torch_device, torch_dtype)
        if actions:
            check_action_heads(checkpoint, model)
        return cls(checkpoint, torch_device, torch_dtype, plan, model, sound, actions, fp8, kernel_options)

    def check(
        self, config: GenerationConfig, *, budgeted: bool = False, layout: ParallelLayout = SINGLE
    ) -> GenerationConfig:
        """The request as this model runs it, or an InputError before anything loads: sound without a
        sound branch, a request that does not fit this machine (unless a budget's planner chose the
        plan). Without a negative prompt a video gets the checkpoint's default (see loading/layout.py), an action
        run none (diffusers' empty one)."""
        check_sound(config, self.checkpoint)
        check_distilled(config, self.checkpoint)
        if config.sound and not self.sound:
            raise InputError("this model was opened without sound; open it with sound=True for requests with sound")
        if config.action is not None:
            check_action_heads(self.checkpoint, self.model, config.domain)
            if not self.actions:
                raise InputError("this model was opened without its action heads; open it with actions=True")
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
        if config.negative_prompt is None and config.action is None:  # an action run's is empty, as in diffusers
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
                    actions=self.actions,
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
        on_decode_tile: Callable[[], None] | None = None,
        action_paths: tuple[Path, Path] | None = None,
    ) -> RunReport | None:
        """Generate one request into `config.output` (the caller holds its OutputLock). Over several
        processes every rank calls this and only the leader writes and reports. `on_step(i)` is called
        after denoising step i, `on_decode_tile()` before each piece of the video decode (a server
        reports progress there, or raises to stop the request: nothing is written). `action_paths`: where an action
        run's predicted actions go, (the .npy, the .json); default NAME.actions.* beside the video."""
        components = self.load(timer)
        video = generate_video(
            config,
            components,
            timer,
            progress=progress,
            on_step=on_step,
            on_decode_tile=on_decode_tile,
            conditioning=conditioning,
            kernels=self.kernels,
            mesh=self.mesh,
        )
        if video.frames is None:
            return None  # not the leader: it has written the video
        with timer.phase("write"):
            actions = None
            if video.actions is not None:
                actions = ActionRows(video.actions, config.action, config.domain, action_paths)
            write_output(video.frames, config.output, config.fps, sound=video.sound, actions=actions)
        layout = SINGLE if self.mesh is None else self.mesh.layout
        return RunReport(
            config,
            components,
            self.device,
            self.dtype,
            timer,
            video.step_cache,
            self.kernels,
            layout,
            video.actions,
            video.frames.shape[:3],
        )


def generate_video(
    config: GenerationConfig,
    components: Components,
    timer: PhaseTimer,
    *,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    on_decode_tile: Callable[[], None] | None = None,
    conditioning: Conditioning | None = None,
    kernels: Kernels = EAGER,
    mesh: ProcessMesh | None = None,
) -> GeneratedVideo:
    """`config` through the generation path (`generate`) on loaded `components`: the noise from the request's
    seed, the scheduler of its shift (a distilled checkpoint's own), the layers on `kernels`. With a `mesh`,
    this rank's branches and tokens (see generate.py); the leader gets the frames and the sound."""
    if config.sound and components.sound_tokenizer is None:
        raise InputError("this model was loaded without its sound tokenizer; load it with sound to generate sound")
    options = components.options
    try:  # the folder's config was checked before the load; the request's shift may still be refused
        scheduler = request_scheduler(config.flow_shift, components.scheduler_config, distilled=options.distilled)
    except Exception as error:
        raise InputError(f"the scheduler cannot be built for this request: {first_line(error)}") from None
    placed = PlacedPipeline(
        pipe=helper_pipeline(components, scheduler),
        engine=components.engine,
        plan=components.plan,
        kernels=kernels,
        fp8=Fp8Steps(components.switches, components.schedule) if components.quantization.quantized else None,
        distilled_sigmas=options.distilled_sigmas,
        mesh=mesh,
    )
    templates = PromptTemplates(use_system_prompt=config.system_prompt)
    hooks = GenerationHooks(
        generator=noise_generator(config),
        templates=templates,
        progress=progress,
        on_step=on_step,
        on_decode_tile=on_decode_tile,
    )
    generated = generate(placed, config, hooks, conditioning=conditioning, timer=timer)
    sound = None
    if generated.waveform is not None:
        rate = int(components.sound_tokenizer.config.sampling_rate)
        sound = Sound(generated.waveform.float().cpu().numpy(), rate)
    actions = None if generated.actions is None else generated.actions.numpy()
    return GeneratedVideo(generated.latents.vision, generated.frames, sound, generated.step_cache, actions)


def generate(
    placed: PlacedPipeline,
    request: Request,
    hooks: GenerationHooks,
    *,
    conditioning: Conditioning | None = None,
    timer: PhaseTimer | None = None,
) -> Generated:
    """The one generation path, for every door (see doors.py): (encode,) prefill each CFG branch once,
    denoise with the generator alone (and the request's step cache), refuse non-finite latents, decode
    the video and the sound (refusing non-finite frames or waveform), each while its group's weights are
    on the device (and, given a `timer`, timed as a phase). `conditioning` puts clean frames into the
    noise and keeps them clean; an action run's (`conditioning.action`) conditions on its clip and
    denoises its action tokens too (see action_input.py), and gives back the predicted actions."""
    pipe, engine, mesh = placed.pipe, placed.engine, placed.mesh
    action = None if conditioning is None else conditioning.action
    with torch.no_grad():
        geometry = None if action is None else action_geometry(pipe, action)
        vision, sound, acts = _starting_latents(pipe, request, hooks, engine.device, action, geometry)
        indexes = () if conditioning is None else conditioning.indexes
        if action is not None:
            indexes = action.clean_frames(vision.shape[2])
            if hooks.latents is None:  # given latents start as they are, as in diffusers
                with _phase(timer, "encode"), engine.use(VAE_ENCODER):
                    vision = _action_conditioned(pipe, action, indexes, vision, engine.device)
        elif conditioning is not None and hooks.latents is None:
            with _phase(timer, "encode"), engine.use(VAE_ENCODER):
                vision = conditioned_latents(pipe, conditioning, vision, request.height, request.width, engine.device)
        sampling = Sampling()
        if placed.distilled_sigmas is not None:
            anchor = _anchor(vision, indexes) if indexes else None
            sampling = Sampling(placed.distilled_sigmas, hooks.generator, anchor)
        if placed.fp8 is not None:
            placed.fp8.before_prefill()
        with _phase(timer, "prefill"), engine.use(REASONER):
            packing = None if action is None else (action, ActionTokens(acts, action.clean_actions), geometry.canvas)
            branches = prepare_branches(pipe, request, vision, indexes, sound, hooks.templates, packing)
            branches = mesh_branches(branches, mesh)
            if mesh is not None:
                mesh.layout.check_tokens(branches[0].layout.tokens)  # with sound: its tokens too
            memories = prefill_branches(pipe, branches, layers=engine.layers(REASONER), kernels=placed.kernels)
            model_dtype = memories[0].keys[0].dtype  # what the transformer computes in
        step_cache = None
        if request.cache != "none":
            step_cache = SeaCache(seacache_config(request.cache_threshold), len(branches))
        with _phase(timer, "denoise"), engine.use(GENERATOR):
            latents = denoise_latents(
                pipe,
                request,
                branches,
                memories,
                Latents(vision, sound, acts),
                progress=hooks.progress,
                layers=lambda: engine.layers(GENERATOR),
                mlp_chunk=placed.plan.mlp_chunk,
                on_step=hooks.on_step,
                sampling=sampling,
                before_step=None if placed.fp8 is None else placed.fp8.before_step,
                step_cache=step_cache,
                kernels=placed.kernels,
                mesh=mesh,
                action=action,
            )
            del memories
        check_finite(latents, model_dtype)
        if step_cache is not None:
            step_cache = dataclasses.replace(step_cache)  # its decisions, without the residuals it held on the device
        frames, waveform = _decode(placed, latents, hooks, timer)
    actions = None
    if action is not None and action.predicts_actions:
        actions = latents.action[:, : action.width].float().cpu()
    return Generated(latents, frames, waveform, step_cache, actions)


def _starting_latents(
    pipe: Cosmos3OmniPipeline,
    request: Request,
    hooks: GenerationHooks,
    device: torch.device,
    action: ActionInput | None = None,
    geometry: ActionGeometry | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(video [1, C, T, h, w], sound [sound_dim, T'] or None, actions [chunk, action_dim] or None) float32:
    the hooks' given latents, or noise drawn from their generator as `prepare_latents` draws it (the
    video's, then the sound's, then the actions')."""
    if hooks.latents is None:
        shape = latent_shape(pipe, request) if action is None else action_latent_shape(pipe, action, geometry)
        vision = randn_tensor(shape, generator=hooks.generator, device=device, dtype=torch.float32)
    else:
        vision = hooks.latents.to(device=device, dtype=torch.float32)
    sound = None
    if request.sound:
        if hooks.sound_latents is not None:
            sound = hooks.sound_latents.to(device=device, dtype=torch.float32)
        else:
            sound = initial_sound_noise(pipe, request, device, hooks.generator)
    acts = None
    if action is not None:
        if hooks.action_latents is not None:
            acts = hooks.action_latents.to(device=device, dtype=torch.float32)
        else:
            acts = initial_action_latents(pipe, action, hooks.generator, device)
    return vision, sound, acts


def _action_conditioned(
    pipe: Cosmos3OmniPipeline, action: ActionInput, indexes: tuple[int, ...], vision: torch.Tensor, device
) -> torch.Tensor:
    """`vision` with an action run's clean latent frames put in: its clip scaled into the canvas, encoded
    and cropped back to the content."""
    frames = action.pixel_frames(pipe.vae.config.scale_factor_temporal)
    pixels, image_size = action_pixels(pipe, action.clip, action.tier, frames, device)
    return conditioned_noise(pipe, pixels, indexes, vision, image_size)


def _decode(
    placed: PlacedPipeline, latents: Latents, hooks: GenerationHooks, timer: PhaseTimer | None
) -> tuple[np.ndarray | None, torch.Tensor | None]:
    """(uint8 frames [T, H, W, 3], the sound decoder's waveform), each None when not asked for; over several
    GPUs every rank decodes its tiles and the leader gets both. NaN or infinite frames or waveform are an
    InputError naming the decoder (they would be written as black frames or silence)."""
    pipe, engine, mesh = placed.pipe, placed.engine, placed.mesh
    frames = waveform = None
    with _phase(timer, "decode"):
        if hooks.decode_video:
            grid = placed.plan.decode_grid
            with engine.use(VAE):
                try:
                    frames = decode_frames(pipe, latents.vision, grid=grid, mesh=mesh, on_piece=hooks.on_decode_tile)
                except NonFinitePixels:
                    raise not_finite("the VAE decoder's frames are", VAE_BROKEN, pipe.vae.dtype) from None
        if latents.sound is not None and (mesh is None or mesh.leader):
            with engine.use(SOUND):
                waveform = pipe.decode_sound(latents.sound)
            if not bool(torch.isfinite(waveform).all()):
                raise not_finite("the sound decoder's waveform is", SOUND_BROKEN, waveform.dtype)
    return frames, waveform


def _phase(timer: PhaseTimer | None, name: str) -> AbstractContextManager:
    """`timer`'s phase `name` (it waits for the device at both ends), or nothing without a timer."""
    return nullcontext() if timer is None else timer.phase(name)


def _anchor(conditioned: torch.Tensor, indexes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [T, 1, 1] with 1 at the conditioned latent frames, the latents holding them clean)."""
    mask = torch.zeros(conditioned.shape[2], 1, 1, device=conditioned.device, dtype=conditioned.dtype)
    mask[list(indexes)] = 1.0
    return mask, conditioned.clone()
