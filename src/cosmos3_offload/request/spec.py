"""`RequestSpec`: what one generation asks for, each field declared once.

Every door is derived from these declarations: the CLI's flags of `generate`, `plan` and `serve`
(app/cli/flags.py), the fields of a sample file (app/sample_files.py), the HTTP API's fields
(serve/requests.py) and diffusers' call keywords (integration/call.py). A door either takes a field
under the name it declares or says, in the declaration, why it does not. The checks that need
nothing but the values live here; app/config.py's `GenerationConfig` adds those that look at the
machine (the files exist, the output is writable, the scheduler can run the schedule).

Defaults are Cosmos3's (720p, 189 frames, 35 steps, guidance 6); `request_defaults` gives the
embedded tiny model's and a distilled checkpoint's, which every door applies the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..model.actions import (
    ACTION_MODES,
    ACTION_TIERS,
    ACTION_WIDTHS,
    DEFAULT_ACTION_TIER,
    DEFAULT_CHUNK,
    DEFAULT_VIEW,
    DOMAIN_IDS,
    MAX_CHUNK,
    VIEW_POINTS,
    action_frames,
)
from ..model.geometry import generator_tokens, latent_frames
from ..model.tiers import ASPECT_RATIOS, DEFAULT_SHIFT, RESOLUTION_TIERS, check_frame_count
from .checks import FieldError, shown
from .field import Absent, FieldSpec, declare, fields_of

# Upper bounds: far beyond any sensible request, low enough that a typo cannot hang or exhaust the machine.
MAX_FRAMES = 1025  # 4 x 256 + 1: 43 s at 24 fps (Cosmos3's default is 189)
MAX_STEPS = 1000  # the flow schedule's training timesteps
MAX_GUIDANCE = 100.0
MIN_SHIFT = 0.01  # below about 1e-15 the flow schedule divides 0 by 0; every tier's default is 3 to 10
MAX_SHIFT = 1000.0
MIN_FPS, MAX_FPS = 0.1, 240.0
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_CACHE_THRESHOLD = 100.0  # an accumulated relative L1 distance: far above any step's (the default is 0.25)
STEP_CACHES = ("none", "seacache")  # "seacache" reuses the generator's residual on steps that barely move
# Without a checkpoint the embedded tiny model runs on any CPU; Cosmos3's 720p x 189-frame default
# would take it minutes, so it defaults to the smallest tier and a short clip.
TINY_SHAPE = {"resolution": 256, "frames": 17}
# The rules of the fields whose default depends on the request: None takes these (an action run: its chunk
# fixes the frames, its tier is 480, its input's shape picks the aspect ratio).
DEFAULT_FRAMES, DEFAULT_RESOLUTION, DEFAULT_ASPECT_RATIO = 189, 720, "16,9"
_ACTION = Absent("the action object: action=CosmosActionCondition(...)")
_ACTION_OBJECT = Absent("the `action` object of the request")

_OWN_FOLDER = Absent("each sample is written to -o DIR/<name>/vision.mp4")
_SERVER_FILE = Absent("the server writes the job's file: GET /v1/videos/{id}/content")
_RETURNED = Absent("the pipeline returns the video (output_type)")
_NO_CLIP = Absent("the server conditions on an image (input_reference); an action run's clip is the input_video part")
_PLACED_ONCE = Absent("the pipeline is placed once: enable(pipe, cache=..., cache_threshold=...)")
_HEIGHT_WIDTH = Absent("height and width: any frame size diffusers' check_inputs takes")


@dataclass(frozen=True, kw_only=True)
class RequestSpec:
    """One text-to-video (or text-to-image, frames=1) request. `shift=None` takes the tier's default;
    `negative_prompt=None` the checkpoint's default (see loading/layout.py; otherwise diffusers' empty
    prompt); `guidance=1` runs the conditional branch only; `image` conditions latent frame 0, `video`
    the latent frames `condition_frames`; `sound` generates the audio track too; `cache="seacache"`
    skips the generator's layers on steps whose latents barely moved (`cache_threshold` None: 0.25)."""

    prompt: str = declare(
        help="what the video shows",
        cli="--prompt", sample="prompt", http="prompt", diffusers="prompt",
    )  # fmt: skip
    negative_prompt: str | None = declare(
        None,
        help="what to steer away from (default: with a checkpoint, its assets/negative_prompt.json for a video, "
        "negative_prompt_i2v.json with an image or video, as the Cosmos3 docs pass them; else empty)",
        cli="--negative-prompt", sample="negative_prompt", http="negative_prompt", diffusers="negative_prompt",
    )  # fmt: skip
    frames: int | None = declare(
        None,
        help="frame count: 1 (an image) or 4k+1, e.g. 93 or 189 (default 189; 17 with the embedded tiny model; "
        "with --action the chunk fixes it: chunk + 1)",
        unit="frames", low=1, high=MAX_FRAMES,
        cli="--frames", sample="num_frames", http="frames", diffusers="num_frames",
    )  # fmt: skip
    resolution: int | None = declare(
        None,
        help="resolution tier (default 720; 256 with the embedded tiny model); with --action the action tier "
        "(256, 480, 704 or 720; default 480) whose canvas the input is padded into",
        choices=tuple(sorted(set(RESOLUTION_TIERS) | set(ACTION_TIERS))),
        cli="--resolution", sample="resolution", http="size", diffusers=_HEIGHT_WIDTH,
    )  # fmt: skip
    aspect_ratio: str | None = declare(
        None,
        help="aspect ratio (default 16,9, which gives 320x192, 832x480, 1280x720, 1360x768; with --action the "
        "input's shape picks it)",
        choices=ASPECT_RATIOS,
        cli="--aspect-ratio", sample="aspect_ratio", http="size", diffusers=_HEIGHT_WIDTH,
    )  # fmt: skip
    steps: int = declare(
        35,
        help="denoising steps (a distilled checkpoint: its own count)",
        unit="steps", low=1, high=MAX_STEPS,
        cli="--steps", sample="num_steps", http="steps", diffusers="num_inference_steps",
    )  # fmt: skip
    guidance: float = declare(
        6.0,
        help="classifier-free guidance scale; 1 skips the unconditional pass (a distilled checkpoint: 1)",
        low=0.0, high=MAX_GUIDANCE,
        cli="--guidance", sample="guidance", http="guidance", diffusers="guidance_scale",
    )  # fmt: skip
    shift: float | None = declare(
        None,
        help="flow shift of the UniPC schedule (default by tier: "
        + ", ".join(f"{t}: {s:g}" for t, s in DEFAULT_SHIFT.items()) + ")",
        low=MIN_SHIFT, high=MAX_SHIFT,
        cli="--shift", sample="shift", http="shift",
        diffusers=Absent("the flow shift is the pipeline's scheduler's (its flow_shift)"),
    )  # fmt: skip
    fps: float = declare(
        24.0,
        help="frames per second (also part of the prompt template and the mRoPE timing)",
        unit="fps", low=MIN_FPS, high=MAX_FPS,
        cli="--fps", sample="fps", http="fps", diffusers="fps",
    )  # fmt: skip
    seed: int = declare(
        0,
        help="noise seed; the same seed gives the same video on any device (the server: random when left out)",
        low=0, high=MAX_SEED,
        cli="--seed", sample="seed", http="seed", diffusers=Absent("generator=torch.Generator().manual_seed(seed)"),
    )  # fmt: skip
    output: Path | None = declare(
        None,
        help="output file: .mp4, or .jpg/.png for one frame (default: output.mp4, or output.jpg for one frame)",
        cli="--output", sample=_OWN_FOLDER, http=_SERVER_FILE, diffusers=_RETURNED,
    )  # fmt: skip
    image: Path | None = declare(
        None,
        help="image-to-video: this image (resized, centre-cropped) is frame 0",
        cli="--image", sample="vision_path", http="input_reference", diffusers="image",
    )  # fmt: skip
    video: Path | None = declare(
        None,
        help="video-to-video: this clip's first frames condition the latent frames of the condition frames",
        cli="--video", sample="vision_path", http=_NO_CLIP, diffusers="video",
    )  # fmt: skip
    condition_frames: tuple = declare(
        (0, 1),
        help="with a video: latent frame indexes the clip keeps clean; latent frame k covers pixel frames "
        "4k-3..4k (the default is the clip's first 5 frames)",
        cli="--condition-frames", sample="condition_frame_indexes_vision", http=_NO_CLIP,
        diffusers="condition_frame_indexes_vision",
    )  # fmt: skip
    sound: bool = declare(
        False,
        help="generate the audio track too (a checkpoint with a sound_tokenizer/)",
        cli="--sound", sample="enable_sound", http="sound", diffusers="enable_sound",
    )  # fmt: skip
    system_prompt: bool | None = declare(
        None,
        help="wrap the prompt in the checkpoint's system prompt, as the model was trained (default: the "
        "checkpoint's own choice, its model_index.json default_use_system_prompt)",
        cli="--system-prompt", sample="use_system_prompt", http="system_prompt", diffusers="use_system_prompt",
    )  # fmt: skip
    cache: str = declare(
        "none",
        help="'seacache' skips the generator's layers on steps whose latents barely moved and reuses its "
        "residual (diffusers' SeaCache; not exact, so off by default)",
        choices=STEP_CACHES,
        cli="--cache", sample="cache", http="cache", diffusers=_PLACED_ONCE,
    )  # fmt: skip
    cache_threshold: float | None = declare(
        None,
        help="with the seacache cache: the accumulated change allowed before a step is computed again "
        "(default 0.25, diffusers' and NVIDIA's; 0 computes every step)",
        low=0.0, high=MAX_CACHE_THRESHOLD,
        cli="--cache-threshold", sample="cache_threshold", http="cache_threshold", diffusers=_PLACED_ONCE,
    )  # fmt: skip

    action: str | None = declare(
        None,
        help="a Cosmos3 action mode: forward_dynamics rolls a video out of --image and --actions; "
        "inverse_dynamics infers the actions of a --video clip; policy rolls out video and actions from --image",
        choices=ACTION_MODES,
        cli="--action", sample="model_mode", http=_ACTION_OBJECT, diffusers=_ACTION,
    )  # fmt: skip
    domain: str | None = declare(
        None,
        help="with --action: the embodiment, which picks the action heads' projection and the numbers per "
        "action row",
        choices=tuple(DOMAIN_IDS),
        cli="--domain", sample="domain_name", http=_ACTION_OBJECT, diffusers=_ACTION,
    )  # fmt: skip
    chunk_size: int | None = declare(
        None,
        help=f"with --action: action steps in the chunk; the video has one frame more (default {DEFAULT_CHUNK})",
        unit="actions", low=1, high=MAX_CHUNK,
        cli="--chunk-size", sample="action_chunk_size", http=_ACTION_OBJECT, diffusers=_ACTION,
    )  # fmt: skip
    actions: Path | None = declare(
        None,
        help="with --action forward_dynamics: the action rows (.npy, .json or .csv; one row per step, as many "
        "numbers as the domain takes; fewer rows than the chunk repeat the last one, more are cut)",
        cli="--actions", sample="action_path", http=_ACTION_OBJECT, diffusers=_ACTION,
    )  # fmt: skip
    view: str | None = declare(
        None,
        help=f"with --action: the camera's view point, said in the action caption (default {DEFAULT_VIEW})",
        choices=VIEW_POINTS,
        cli="--view", sample="view_point", http=_ACTION_OBJECT, diffusers=_ACTION,
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.action is None:
            self._set("frames", DEFAULT_FRAMES if self.frames is None else self.frames)
            self._set("resolution", DEFAULT_RESOLUTION if self.resolution is None else self.resolution)
            self._set("aspect_ratio", DEFAULT_ASPECT_RATIO if self.aspect_ratio is None else self.aspect_ratio)
        else:
            self._resolve_action()
        for spec in REQUEST_FIELDS:
            value = spec.check(getattr(self, spec.name))
            if value is not getattr(self, spec.name):
                object.__setattr__(self, spec.name, value)
        if self.action is None:
            check_without_action(self)
            check_frame_count(self.frames)
        else:
            check_action(self)
        if self.image is not None and self.video is not None:
            raise InputError("pass either --image (image-to-video) or --video (video-to-video), not both")
        if (self.image is not None or self.video is not None) and self.frames == 1:
            raise InputError("--image and --video condition a video: use --frames 5 or more")
        if self.video is not None and self.action is None:
            count = latent_frames(self.frames)
            bad = [i for i in self.condition_frames if not 0 <= i < count]
            if not self.condition_frames or bad:
                listed = ", ".join(shown(i) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
                raise InputError(
                    f"condition frames [{listed}] must be latent frame indexes in 0..{count - 1} for {self.frames} "
                    "frames"
                )
        if self.sound and self.frames == 1:
            raise InputError("--sound goes with a video: use --frames 5 or more, or drop --sound")
        check_cache(self.cache, self.cache_threshold)
        if self.output is None:
            object.__setattr__(self, "output", Path("output.jpg" if self.frames == 1 else "output.mp4"))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _resolve_action(self) -> None:
        """An action run's rules: the chunk fixes the frames, the tier defaults to 480, the view to ego_view.
        The aspect ratio stays None until the input's shape picks it (app/config.py)."""
        if self.chunk_size is None:
            self._set("chunk_size", DEFAULT_CHUNK)
        FIELDS_BY_NAME["chunk_size"].check(self.chunk_size)
        frames = action_frames(self.chunk_size)
        if self.frames is not None and self.frames != frames:
            raise InputError(
                f"--frames does not go with --action: the chunk fixes the video at chunk + 1 = {frames} frames "
                "(and the VAE decodes whole groups of 4 after the first); set --chunk-size instead"
            )
        self._set("frames", frames)
        if self.resolution is None:
            self._set("resolution", DEFAULT_ACTION_TIER)
        if self.view is None:
            self._set("view", DEFAULT_VIEW)

    @property
    def canvas(self) -> tuple[int, int]:
        """(height, width): an action run's padded canvas (until the input's shape has picked the aspect
        ratio, the tier's canvas of the most tokens, which bounds the others)."""
        if self.aspect_ratio is not None:
            return ACTION_TIERS[self.resolution][self.aspect_ratio]
        return max(ACTION_TIERS[self.resolution].values(), key=lambda c: generator_tokens(1, *c))

    @property
    def width(self) -> int:
        if self.action is not None:
            return self.canvas[1]
        return RESOLUTION_TIERS[self.resolution][self.aspect_ratio][0]

    @property
    def height(self) -> int:
        if self.action is not None:
            return self.canvas[0]
        return RESOLUTION_TIERS[self.resolution][self.aspect_ratio][1]

    @property
    def flow_shift(self) -> float:
        return DEFAULT_SHIFT[self.resolution] if self.shift is None else self.shift

    @property
    def uses_guidance(self) -> bool:
        return self.guidance != 1.0


REQUEST_FIELDS: tuple[FieldSpec, ...] = fields_of(RequestSpec)
FIELDS_BY_NAME = {spec.name: spec for spec in REQUEST_FIELDS}


def request_defaults(*, tiny: bool = False, distilled_steps: int | None = None, action: bool = False) -> dict[str, Any]:
    """Every field's default for a run of the embedded tiny model (`tiny`: a smaller shape) or a distilled
    checkpoint (`distilled_steps`: its schedule's length, with guidance baked in); the prompt has none.
    A video's frames, tier and aspect ratio are Cosmos3's (189, 720, 16,9); an `action` run's frames and
    aspect ratio are left to its rules (the chunk and the input fix them) and its tier is 480 (the tiny
    model's: 256)."""
    defaults = {s.name: s.default for s in REQUEST_FIELDS if s.default is not dataclasses.MISSING}
    if action:
        defaults |= {"resolution": TINY_SHAPE["resolution"] if tiny else DEFAULT_ACTION_TIER}
    else:
        shape = {"frames": DEFAULT_FRAMES, "resolution": DEFAULT_RESOLUTION, "aspect_ratio": DEFAULT_ASPECT_RATIO}
        defaults |= shape | (TINY_SHAPE if tiny else {})
    if distilled_steps is not None:
        defaults |= {"steps": distilled_steps, "guidance": 1.0}
    return defaults


def check_cache(cache: object, threshold: object) -> None:
    """A step cache and its threshold, as the request's fields take them (enable() takes them apart)."""
    FIELDS_BY_NAME["cache"].check(cache)
    FIELDS_BY_NAME["cache_threshold"].check(threshold)
    if threshold is not None and cache != "seacache":
        raise InputError("--cache-threshold tunes SeaCache; pass --cache seacache too, or drop it")


def named_at(error: FieldError, door: str) -> FieldError:
    """A field's refusal naming the field as `door` names it (`num_frames`, `num_inference_steps`)."""
    name = None if error.field is None else FIELDS_BY_NAME[error.field].door(door)
    return error if name is None else error.named(name)


def door_fields(door: str) -> dict[str, str]:
    """{field: its name at `door`} for every field the door takes (see field.DOORS)."""
    return {s.name: s.door(door) for s in REQUEST_FIELDS if s.door(door) is not None}


def check_action(spec: RequestSpec) -> None:
    """An action run's fields together: a domain with an action width, an input for the mode, action rows
    exactly for forward dynamics, an action tier, no step cache."""
    if spec.domain is None:
        raise InputError(f"--action needs --domain, the embodiment: one of {', '.join(ACTION_WIDTHS)}")
    if spec.domain not in ACTION_WIDTHS:
        raise InputError(
            f"--domain {spec.domain} has no fixed action width, so no action mode runs it; use one of "
            f"{', '.join(ACTION_WIDTHS)}"
        )
    if spec.resolution not in ACTION_TIERS:
        raise InputError(
            f"--resolution {spec.resolution} is no action tier; with --action use one of "
            f"{', '.join(map(str, ACTION_TIERS))} (default {DEFAULT_ACTION_TIER})"
        )
    if spec.action == "inverse_dynamics" and spec.video is None:
        raise InputError("--action inverse_dynamics infers the actions of a clip: pass --video")
    if spec.image is None and spec.video is None:
        raise InputError(f"--action {spec.action} starts from a frame: pass --image (or --video, its first frame)")
    if spec.action == "forward_dynamics" and spec.actions is None:
        raise InputError("--action forward_dynamics rolls the video out of given actions: pass --actions FILE")
    if spec.action != "forward_dynamics" and spec.actions is not None:
        raise InputError(f"--actions drives forward_dynamics; --action {spec.action} predicts them: drop --actions")
    if spec.cache != "none":
        raise InputError("--cache seacache does not go with --action (its gate reads the video alone); drop it")


def check_without_action(spec: RequestSpec) -> None:
    """The action fields need --action; the action tier 704 too."""
    names = ("domain", "chunk_size", "actions", "view")
    given = [FIELDS_BY_NAME[name].flag for name in names if getattr(spec, name) is not None]
    if given:
        raise InputError(f"{given[0]} goes with --action (forward_dynamics, inverse_dynamics or policy); add it")
    if spec.resolution not in RESOLUTION_TIERS:
        raise InputError(
            f"--resolution {spec.resolution} is an action tier; a video takes one of "
            f"{', '.join(map(str, RESOLUTION_TIERS))}"
        )
