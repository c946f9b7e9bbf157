"""One whole request, phase by phase: load, (encode,) prefill, denoise, decode, write.

This is the library's entry point (`cosmos3_offload.run`); the CLI only translates flags into
its arguments and prints the report it returns. Everything that can be refused is refused before
anything loads; the output is held (locked) for the run and written whole or not at all.

`generate` (generation_path.py) is the one generation path: the CLI, sample files and the server reach it through
`generate_video`, a diffusers pipeline under `enable()` through integration/generation.py (see doors.py).

Launched over several processes (torchrun, or `generate --gpus N`), each rank runs this same code on
its own GPU with its part of the work (see app/distributed.py); rank 0 plans, writes the output and
returns the report, the others return None.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError, first_line
from ..kernels.choice import EAGER, Kernels
from ..kernels.probe import DIFFUSERS, choose_attention, kernel_rates
from ..loading.components import Components, load_components, model_configs
from ..loading.files import check_checkpoint
from ..loading.layout import default_negative_prompt
from ..loading.mapped_reasoner import check_mapped_reasoner
from ..loading.quantization import NO_FP8_FLAGS, Fp8Options
from ..model.specs import model_spec
from ..offload.node_share import NodeShare
from ..offload.shared import HostShare
from ..parallel.mesh import ProcessMesh
from ..planning.parallel import SINGLE, ParallelLayout
from ..planning.plan import Plan
from ..planning.request import Request
from ..planning.sizes import ModelSizes
from .config import (
    DEFAULT_KERNELS,
    GenerationConfig,
    KernelOptions,
    check_output_spares_checkpoint,
    resolve_device,
    resolve_dtype,
)
from .decode_order import decode_frames_first
from .device_profile import probe_shape
from .distributed import parallel_layout, rank_device, start_mesh
from .doors import Fp8Steps, GeneratedVideo, GenerationHooks, PlacedPipeline, Preview
from .events import RunEvents
from .feasibility import check_fits, run_sizes
from .generate import (
    PromptTemplates,
    Sound,
    helper_pipeline,
    noise_generator,
)
from .generation_path import VideoSink, generate
from .inputs import Conditioning, read_conditioning
from .model_checks import check_action_heads, check_distilled, check_sound
from .outputs import ActionRows, OutputLock, StreamedOutput, actions_beside, resolve_target, write_output
from .planned_request import request_of
from .previews import PreviewOptions, check_preview_output, check_preview_plan, make_preview, preview_frames
from .report import RunReport
from .schedule import request_scheduler
from .timer import PhaseTimer
from .video_io import VIDEO_SUFFIXES

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
    events: RunEvents | None = None,
    preview: PreviewOptions | None = None,
) -> RunReport | None:
    """Generate `config.output` following `plan` (default: everything resident).

    Without a checkpoint the weights are seeded random values of the registered size `model`.
    Bad input raises InputError before anything is loaded; `budgeted` says the plan already came
    from the planner for a budget, so the fit against this machine's memory is not asked again.
    Over several processes every rank calls this; rank 0's plan is everyone's, rank 0 writes the
    output and gets the report (the others None). `cfg_parallel`: auto, on or off (planning/parallel.py).
    `events` hears the run's phases, steps and decode pieces (app/events.py; on the leader only). `preview`: the
    leader keeps an image of the video as it renders there (app/previews.py); exact previews need a plan that
    keeps the VAE on the device.
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
    if preview is not None:
        check_preview_plan(preview, loaded.plan)
        check_preview_output(preview, config, loaded.checkpoint)
    config = loaded.check(config, budgeted=budgeted, layout=layout, preview_frames=preview_frames(preview))
    check_output_spares_checkpoint(config.output, loaded.checkpoint)
    # Read before the load: a conditioning file that cannot be used costs nothing.
    conditioning = read_conditioning(config)
    loaded.probe_request = request_of(config, None, layout)  # the kernels are picked at this run's shape
    mesh = start_mesh(layout, loaded.device)
    try:
        leader = mesh is None or mesh.leader
        if mesh is not None:
            loaded.plan = mesh.broadcast_from_leader(loaded.plan)  # each rank measured its own budget
            loaded.mesh = mesh
        with OutputLock(config.output) if leader else nullcontext():
            timer = PhaseTimer(loaded.device, events=events if leader else None)
            components = loaded.load(timer, progress=progress and leader)
            previewer = None
            if preview is not None and leader:
                previewer = make_preview(preview, components, checkpoint=loaded.checkpoint, model=loaded.model)
            steps_bar = progress and leader and events is None  # the events' listener shows the steps
            return loaded.write(config, timer, conditioning=conditioning, progress=steps_bar, preview=previewer)
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
    node_share: NodeShare | None = None  # serve's replicas on one node: one host copy (offload/node_share.py)
    probe_request: Request | None = None  # the request the GPU's probe times attention at (None: its 32k default)
    measured_sizes: dict = field(default_factory=dict, repr=False)  # `_run_sizes`, per kind of request

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
        self,
        config: GenerationConfig,
        *,
        budgeted: bool = False,
        layout: ParallelLayout = SINGLE,
        preview_frames: int = 0,
    ) -> GenerationConfig:
        """The request as this model runs it, or an InputError before anything loads: sound without a
        sound branch, a request that does not fit this machine (unless a budget's planner chose the
        plan; `preview_frames`: latent frames an exact preview decodes during the denoise, see previews.py).
        Without a negative prompt a video gets the checkpoint's default (see loading/layout.py), an action
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
                preview_frames=preview_frames,
                measured=self._run_sizes(config),
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

    def _host_share(self) -> HostShare | NodeShare | None:
        """Over several processes: one host copy of the weights, filled by the host's first rank; for serve's
        replicas on one node, the node's copy (`node_share`), filled by the first replica that loads."""
        if self.mesh is None:
            return self.node_share
        return HostShare(name=self.mesh.run_name, owner=self.mesh.host_leader, wait=self.mesh.wait_for_all)

    def _choose_kernels(self, timer: PhaseTimer) -> Kernels:
        """The attention (a GPU's probe picks it, once per GPU: see kernels/probe.py) and the fused ops."""
        options = self.kernel_options
        rates = None
        if self.device.type == "cuda":
            with timer.phase("probe"):
                shape = probe_shape(model_configs(self.checkpoint, self.model)[0], self.probe_request)
                rates = kernel_rates(self.device, shape)
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
        preview: Preview | None = None,
    ) -> RunReport | None:
        """Generate one request into `config.output` (the caller holds its OutputLock). Over several
        processes every rank calls this and only the leader writes and reports. `on_step(i)` is called
        after denoising step i, `on_decode_tile()` before each piece of the video decode (a server
        reports progress there, or raises to stop the request: nothing is written). `action_paths`: where an action
        run's predicted actions go, (the .npy, the .json); default NAME.actions.* beside the video. `preview`: shows
        the video as it renders (app/previews.py `make_preview`; it never changes the output)."""
        components = self.load(timer)
        streamed = self._streamed_output(config)
        with streamed if streamed is not None else nullcontext():
            sink = None
            if streamed is not None:
                sink = VideoSink(streamed.frames_ready, frames_first=self._decode_frames_first(config))
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
                preview=preview,
                video_sink=sink,
            )
            if video.frames is None:
                return None  # not the leader: it has written the video
            with timer.phase("write"):  # streamed: what the encoder has left after the decode
                actions = None
                if video.actions is not None:
                    actions = ActionRows(video.actions, config.action, config.domain, action_paths)
                if streamed is not None:
                    streamed.finish(actions)
                else:
                    write_output(video.frames, config.output, config.fps, sound=video.sound, actions=actions)
                if config.action == "forward_dynamics":  # its actions were given: an earlier run's must not pass
                    remove_stale_actions(action_paths or actions_beside(resolve_target(config.output)), config.actions)
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

    def _streamed_output(self, config: GenerationConfig) -> StreamedOutput | None:
        """The mp4 encoded while the video decodes, for a silent video in one process; None: written after the
        decode (an image; several processes, whose frames are whole only once gathered; a video with sound, whose
        track is decoded after the video while ffmpeg wants it when it starts)."""
        if self.mesh is not None or config.sound or config.output.suffix.lower() not in VIDEO_SUFFIXES:
            return None
        return StreamedOutput(config.output, config.fps)

    def _decode_frames_first(self, config: GenerationConfig) -> bool:
        """Decode frames first when the plan's peak has room for it (app/decode_order.py)."""
        return decode_frames_first(config, self.plan, self._run_sizes(config), SINGLE)

    def _run_sizes(self, config: GenerationConfig) -> tuple[ModelSizes, dict | None]:
        """`feasibility.run_sizes` for this model, measured once per kind of request (sound, actions): a third of a
        second at Nano size that every request would pay at its check and again at its decode."""
        kind = (config.sound, config.action is not None)
        if kind not in self.measured_sizes:
            self.measured_sizes[kind] = run_sizes(
                config, checkpoint=self.checkpoint, model=self.model, dtype=self.dtype, fp8=self.fp8
            )
        return self.measured_sizes[kind]


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
    preview: Preview | None = None,
    video_sink: VideoSink | None = None,
) -> GeneratedVideo:
    """`config` through the generation path (`generate`) on loaded `components`: the noise from the request's
    seed, the scheduler of its shift (a distilled checkpoint's own), the layers on `kernels`. With a `mesh`,
    this rank's branches and tokens (see generate.py); the leader gets the frames and the sound. `preview`
    draws the video after the steps it is due (doors.`Preview`; the leader's). `video_sink` hears the frames as
    the decode makes them final (one process; see generation_path.py)."""
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
        preview=preview,
    )
    generated = generate(placed, config, hooks, conditioning=conditioning, timer=timer, video_sink=video_sink)
    sound = None
    if generated.waveform is not None:
        rate = int(components.sound_tokenizer.config.sampling_rate)
        sound = Sound(generated.waveform.float().cpu().numpy(), rate)
    actions = None if generated.actions is None else generated.actions.numpy()
    return GeneratedVideo(generated.latents.vision, generated.frames, sound, generated.step_cache, actions)


def remove_stale_actions(files: tuple[Path, Path], given: Path | None) -> None:
    """Remove an earlier run's predicted actions beside a forward-dynamics video, never the run's own input
    (`--actions out.actions.json` drives a run from an earlier run's output)."""
    for stale in files:
        if stale.exists() and not (given is not None and os.path.samefile(stale, given)):
            stale.unlink(missing_ok=True)
