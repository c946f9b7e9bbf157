"""The one generation path, for every door (see doors.py): (encode,) prefill each CFG branch once,
denoise with the generator alone, refuse non-finite latents, decode the video and the sound, each
phase while its weight group is on the device. runner.py's `generate_video` (the CLI, sample files,
the server) and integration/generation.py (an `enable()`d diffusers pipeline) call `generate`.

Given a `VideoSink`, the decode tells it its frames as they become final (an mp4 encoder takes them while the
rest decodes, see outputs.py `StreamedOutput`), in the order the sink asks for (vae/decode.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.utils.torch_utils import randn_tensor

from ..model.groups import GENERATOR, REASONER, SOUND, VAE, VAE_ENCODER
from ..parallel.mesh import ProcessMesh
from ..planning.tiles import TileGrid
from ..stepcache.seacache import SeaCache, seacache_config
from ..vae.decode import NonFinitePixels, decode_to_host
from ..vae.encode import action_pixels, conditioned_noise
from .action_input import ActionGeometry, ActionInput, action_geometry, action_latent_shape, initial_action_latents
from .doors import Generated, GenerationHooks, PlacedPipeline, Request
from .finite import SOUND_BROKEN, VAE_BROKEN, check_finite, not_finite
from .generate import (
    ActionPacking,
    ActionTokens,
    Latents,
    Sampling,
    conditioned_latents,
    decode_frames,
    denoise_latents,
    initial_sound_noise,
    latent_shape,
    mesh_branches,
    prefill_branches,
    prepare_branches,
    raw_latents,
)
from .inputs import Conditioning
from .timer import PhaseTimer


@dataclass(frozen=True)
class VideoSink:
    """Where the video decode tells its frames as they become final: `frames_ready(video, done)`, `video` the
    uint8 [T, H, W, 3] array being filled and [0, done) its final frames (vae/decode.py `decode_to_host`);
    `frames_first`: decode latent frames outer, so whole frames come early (app/decode_order.py says when)."""

    frames_ready: Callable[[np.ndarray, int], None]
    frames_first: bool = False


def generate(
    placed: PlacedPipeline,
    request: Request,
    hooks: GenerationHooks,
    *,
    conditioning: Conditioning | None = None,
    timer: PhaseTimer | None = None,
    video_sink: VideoSink | None = None,
) -> Generated:
    """The one generation path, for every door (see doors.py): (encode,) prefill each CFG branch once,
    denoise with the generator alone (and the request's step cache), refuse non-finite latents, decode
    the video and the sound (refusing non-finite frames or waveform), each while its group's weights are
    on the device (and, given a `timer`, timed as a phase). `conditioning` puts clean frames into the
    noise and keeps them clean; an action run's (`conditioning.action`) conditions on its clip and
    denoises its action tokens too (see action_input.py), and gives back the predicted actions. `video_sink`
    hears the decode's frames as they become final (one process only)."""
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
            packing = None
            if action is not None:
                packing = ActionPacking(action, ActionTokens(acts, action.clean_actions), geometry.canvas)
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
                on_step=_stepped(hooks, timer, request.steps),
                sampling=sampling,
                before_step=None if placed.fp8 is None else placed.fp8.before_step,
                step_cache=step_cache,
                kernels=placed.kernels,
                mesh=mesh,
                action=action,
                after_step=hooks.after_step,
                interrupted=hooks.interrupted,
                on_denoised=_previewing(placed, hooks, timer, request.steps),
            )
            del memories
        check_finite(latents, model_dtype)
        if step_cache is not None:
            step_cache = dataclasses.replace(step_cache)  # its decisions, without the residuals it held on the device
        frames, waveform = _decode(placed, latents, hooks, timer, video_sink)
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
    pixels, image_size = action_pixels(pipe, action.clip, action.tier, action.pixel_frames(), device)
    return conditioned_noise(pipe, pixels, indexes, vision, image_size)


def _decode(
    placed: PlacedPipeline,
    latents: Latents,
    hooks: GenerationHooks,
    timer: PhaseTimer | None,
    sink: VideoSink | None = None,
) -> tuple[np.ndarray | None, torch.Tensor | None]:
    """(uint8 frames [T, H, W, 3], the sound decoder's waveform), each None when not asked for; over several
    GPUs every rank decodes its tiles and the leader gets both. NaN or infinite frames or waveform are an
    InputError naming the decoder (they would be written as black frames or silence). `sink` hears the frames
    as they become final (one process)."""
    pipe, engine, mesh = placed.pipe, placed.engine, placed.mesh
    assert sink is None or mesh is None, "over several processes the frames are whole only once gathered"
    frames = waveform = None
    with _phase(timer, "decode"):
        if hooks.decode_video:
            grid = placed.plan.decode_grid
            with engine.use(VAE):
                try:
                    on_piece = _decode_piece(hooks, timer)
                    frames = _decode_video(pipe, latents.vision, grid, mesh, on_piece, sink)
                except NonFinitePixels:
                    raise not_finite("the VAE decoder's frames are", VAE_BROKEN, pipe.vae.dtype) from None
    if latents.sound is not None and (mesh is None or mesh.leader):
        with _phase(timer, "sound"), engine.use(SOUND):
            waveform = pipe.decode_sound(latents.sound)
        if not bool(torch.isfinite(waveform).all()):
            raise not_finite("the sound decoder's waveform is", SOUND_BROKEN, waveform.dtype)
    return frames, waveform


def _decode_video(
    pipe: Cosmos3OmniPipeline,
    vision: torch.Tensor,
    grid: TileGrid,
    mesh: ProcessMesh | None,
    on_piece: Callable[[int, int], None] | None,
    sink: VideoSink | None,
) -> np.ndarray | None:
    """The frames of `vision` (see `decode_frames`), told to `sink` as they become final when one is given."""
    if sink is None:
        return decode_frames(pipe, vision, grid=grid, mesh=mesh, on_piece=on_piece)
    raw = raw_latents(pipe, vision)
    return decode_to_host(
        pipe.vae, raw, grid, on_piece=on_piece, frames_first=sink.frames_first, on_frames=sink.frames_ready
    )


def _stepped(hooks: GenerationHooks, timer: PhaseTimer | None, steps: int) -> Callable[[int], None] | None:
    """After step i: the run's events (through the timer), then the door's `on_step` (which may stop the run)."""
    if timer is None or timer.events is None:
        return hooks.on_step

    def stepped(index: int) -> None:
        timer.step(index, steps)
        if hooks.on_step is not None:
            hooks.on_step(index)

    return stepped


def _decode_piece(hooks: GenerationHooks, timer: PhaseTimer | None) -> Callable[[int, int], None] | None:
    """Before each piece of the video decode: the run's events, then the door's `on_decode_tile` (which may stop it)."""
    if hooks.on_decode_tile is None and (timer is None or timer.events is None):
        return None

    def piece(index: int, total: int) -> None:
        if timer is not None:
            timer.piece(index, total)
        if hooks.on_decode_tile is not None:
            hooks.on_decode_tile()

    return piece


def _previewing(
    placed: PlacedPipeline, hooks: GenerationHooks, timer: PhaseTimer | None, steps: int
) -> Callable[[int, Callable[[], torch.Tensor]], None] | None:
    """After each step the door's previewer wants: its preview of the step's clean estimate, written whole, then
    the run's preview event. Off the leader of several GPUs there is none (the leader shows the run)."""
    preview = hooks.preview
    if preview is None or (placed.mesh is not None and not placed.mesh.leader):
        return None

    def show(index: int, denoised: Callable[[], torch.Tensor]) -> None:
        if preview.due(index, steps):
            preview.show(index, steps, denoised(), placed)
            if timer is not None and timer.events is not None:
                timer.events.preview(index, steps, preview.kind)

    return show


def _phase(timer: PhaseTimer | None, name: str) -> AbstractContextManager:
    """`timer`'s phase `name` (it waits for the device at both ends), or nothing without a timer."""
    return nullcontext() if timer is None else timer.phase(name)


def _anchor(conditioned: torch.Tensor, indexes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [T, 1, 1] with 1 at the conditioned latent frames, the latents holding them clean)."""
    mask = torch.zeros(conditioned.shape[2], 1, 1, device=conditioned.device, dtype=conditioned.dtype)
    mask[list(indexes)] = 1.0
    return mask, conditioned.clone()
