"""The planner's view of a request: one builder for every caller (generate, plan, serve, check,
the fit check, and enable()'s budget), so what a request costs is derived in one place: its tokens
and branches, the frames its conditioning encodes, the sound track's samples, the step cache's
held activations and the latent frames an exact preview decodes during the denoise.
"""

from __future__ import annotations

from ..loading.layout import sound_samples
from ..model.geometry import frames_to_encode
from ..planning.parallel import SINGLE, ParallelLayout
from ..planning.request import Request
from ..request.spec import RequestSpec
from ..stepcache.seacache import held_hiddens, seacache_config


def planner_request(
    *,
    frames: int,
    height: int,
    width: int,
    guidance: bool,
    steps: int,
    fps: float,
    encode_frames: int = 0,
    sound: dict | None = None,
    cache: str = "none",
    cache_threshold: float | None = None,
    layout: ParallelLayout = SINGLE,
    action_tokens: int = 0,
    preview_frames: int = 0,
) -> Request:
    """A request of `frames` x `height` x `width` (with both CFG branches when `guidance`), on one GPU of
    `layout`; `sound`: the sound tokenizer's config when the request makes a sound track; `action_tokens`:
    an action run's chunk, which joins the generator's tokens; `preview_frames`: latent frames an exact preview
    decodes (app/previews.py `preview_frames`; 0: none)."""
    return Request.for_video(
        frames,
        height,
        width,
        guidance=guidance,
        steps=steps,
        action_tokens=action_tokens,
        encode_frames=encode_frames,
        sound_samples=0 if sound is None else sound_samples(sound, frames, fps),
        cached_hiddens=cached_hiddens(cache, cache_threshold),
        parallel=layout,
        preview_frames=preview_frames,
    )


def request_of(
    request: RequestSpec, sound: dict | None = None, layout: ParallelLayout = SINGLE, *, preview_frames: int = 0
) -> Request:
    """The planner's view of a declared request (its image or video is encoded first). An action run is
    planned at its canvas (the input is scaled into it, and the video is at most that size) with its chunk's
    action tokens; its clip is encoded whole in inverse dynamics, else its first frame. `preview_frames`: see
    `planner_request`."""
    encode = frames_to_encode(
        image=request.image is not None, video=request.video is not None, condition_frames=request.condition_frames
    )
    if request.action is not None:
        encode = request.frames if request.action == "inverse_dynamics" else 1
    return planner_request(
        frames=request.frames,
        height=request.height,
        width=request.width,
        guidance=request.uses_guidance,
        steps=request.steps,
        fps=request.fps,
        encode_frames=encode,
        sound=sound,
        cache=request.cache,
        cache_threshold=request.cache_threshold,
        layout=layout,
        action_tokens=0 if request.action is None else request.chunk_size,
        preview_frames=preview_frames,
    )


def cached_hiddens(cache: str, threshold: float | None) -> int:
    """What a step cache holds per branch, in [tokens, hidden] tensors (0 without one)."""
    return held_hiddens(seacache_config(threshold)) if cache == "seacache" else 0
