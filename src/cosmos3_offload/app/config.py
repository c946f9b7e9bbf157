"""The validated request: what to generate and where to run it.

Every check that depends only on the user's input happens here, before anything is loaded, with
a message that says how to fix it: numbers must be finite and within bounds, text valid UTF-8,
files present, the output writable. `check_request` is the one validator of a request's shape that
`generate` (through `GenerationConfig`) and `plan` share. The CLI turns an InputError into a
one-line error and exit status 2.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..kernels.attention import available_attention
from ..kernels.probe import AUTO, DIFFUSERS, check_attention_choice
from ..model.geometry import latent_frames
from ..model.tiers import DEFAULT_SHIFT, check_frame_count, frame_size
from .outputs import check_output
from .schedule import check_schedule

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# Upper bounds: far beyond any sensible request, low enough that a typo cannot hang or exhaust the machine.
MAX_FRAMES = 1025  # 4 x 256 + 1: 43 s at 24 fps (Cosmos3's default is 189)
MAX_STEPS = 1000  # the flow schedule's training timesteps
MAX_GUIDANCE = 100.0
MIN_SHIFT = 0.01  # below about 1e-15 the flow schedule divides 0 by 0; every tier's default is 3 to 10
MAX_SHIFT = 1000.0
MIN_FPS, MAX_FPS = 0.1, 240.0
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_PROMPT_CHARS = 20_000
MIN_H2D_GBPS, MAX_H2D_GBPS = 0.1, 10_000.0  # --h2d-gbps: below PCIe 1.0 x1, ten times NVLink-C2C
MAX_CACHE_THRESHOLD = 100.0  # an accumulated relative L1 distance: far above any step's (the default is 0.25)
MAX_SHOWN_CHARS = 80  # of a refused value quoted back in an error message
# Cosmos3's default request, the pipeline's and the docs': 720p, 189 frames, 35 steps, guidance 6.
DEFAULT_RESOLUTION, DEFAULT_FRAMES, DEFAULT_STEPS, DEFAULT_GUIDANCE = 720, 189, 35, 6.0
STEP_CACHES = ("none", "seacache")  # --cache: "seacache" reuses the generator's residual on steps that barely move


def resolve_device(name: str | None) -> torch.device:
    """`None` picks CUDA when present, else the CPU; anything else must name a usable device."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cpu" and device.index not in (None, 0):
        raise InputError(f"device {name!r}: the CPU takes no index; use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} requested but this torch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`None` picks bfloat16 on a GPU and float32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def shown(value: object) -> str:
    """`value` as an error message quotes it: its repr, cut to MAX_SHOWN_CHARS (a huge int has no repr)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**MAX_SHOWN_CHARS:
        return f"a {len(hex(value)) - 2}-hex-digit number"
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


def check_integer(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InputError(f"{name} must be a whole number from {low} to {high}, got {shown(value)}")


def check_number(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> None:
    """A finite real in [low, high] (or (low, high] with `low_open`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InputError(f"{name} must be a finite number in {bracket}{low:g}, {high:g}], got {shown(value)}")


def check_text(name: str, value: object, *, required: bool) -> None:
    """Text that is valid UTF-8 (no undecodable bytes from the command line) and not too long."""
    if not isinstance(value, str):
        raise InputError(f"{name} must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise InputError(f"the {name} is empty; pass --{name.replace(' ', '-')} 'what the video shows'")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"the {name} is not valid UTF-8; pass it in UTF-8") from None
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(f"the {name} has {len(value)} characters; keep it to at most {MAX_PROMPT_CHARS}")


def _stat(kind: str, path: Path) -> os.stat_result | None:
    """`os.stat(path)`, None where nothing is there; a name no file can have is an InputError."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:  # a NUL byte, which only the Python API can pass
        raise InputError(f"{kind} {str(path)!r} is not a usable path (it holds a NUL byte)") from None
    except OSError as error:  # too long, a symlink loop, a folder we may not enter
        raise InputError(f"{kind} {str(path)!r} cannot be used: {error.strerror}") from None


def check_input_file(kind: str, path: Path) -> None:
    """An existing regular file (through symlinks), or an InputError naming it."""
    status = _stat(kind, Path(path))
    if status is None or not stat.S_ISREG(status.st_mode):
        raise InputError(f"{kind} {str(path)!r} does not exist or is not a file")


def check_input_folder(kind: str, path: Path, fix: str) -> None:
    """An existing folder (through symlinks), or an InputError naming it and saying `fix`."""
    status = _stat(kind, Path(path))
    if status is None or not stat.S_ISDIR(status.st_mode):
        raise InputError(f"{kind} {str(path)!r} is not a folder; {fix}")


def check_request(
    *,
    frames: int,
    resolution: int,
    aspect_ratio: str,
    steps: int,
    guidance: float,
    image: Path | None,
    video: Path | None,
    condition_frames: tuple[int, ...],
) -> None:
    """The shape of a request, as `generate` and `plan` both take it."""
    check_integer("frames", frames, 1, MAX_FRAMES)
    check_frame_count(frames)
    if not isinstance(resolution, int) or isinstance(resolution, bool):
        raise InputError(f"resolution must be a tier number, got {resolution!r}")
    frame_size(resolution, aspect_ratio)
    check_integer("steps", steps, 1, MAX_STEPS)
    check_number("guidance", guidance, 0.0, MAX_GUIDANCE)
    if image is not None and video is not None:
        raise InputError("pass either --image (image-to-video) or --video (video-to-video), not both")
    if (image is not None or video is not None) and frames == 1:
        raise InputError("--image and --video condition a video: use --frames 5 or more")
    count = latent_frames(frames)
    if video is not None:
        bad = [i for i in condition_frames if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count)]
        if not condition_frames or bad:
            listed = ", ".join(shown(i) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
            raise InputError(
                f"condition frames [{listed}] must be latent frame indexes in 0..{count - 1} for {frames} frames"
            )
    for kind, path in (("image", image), ("video", video)):
        if path is not None:
            check_input_file(kind, path)


def check_cache(cache: object, threshold: object) -> None:
    """--cache names a step cache; --cache-threshold is a finite number and goes with seacache only."""
    if cache not in STEP_CACHES:
        raise InputError(f"unknown cache {shown(cache)}; choose one of {', '.join(STEP_CACHES)}")
    if threshold is not None:
        if cache != "seacache":
            raise InputError("--cache-threshold tunes SeaCache; pass --cache seacache too, or drop it")
        check_number("cache threshold", threshold, 0.0, MAX_CACHE_THRESHOLD)


COMPILE_CHOICES = ("auto", "on", "off")  # --compile: auto is on for a GPU, off on the CPU


@dataclass(frozen=True, kw_only=True)
class KernelOptions:
    """Which kernels a run may use: `attention` is "auto" (the probe's fastest exact one on a GPU,
    diffusers' dispatcher on the CPU), "diffusers" or a registered implementation; `compile` fuses
    the layers' norms, rotary, gating and residual adds with torch.compile ("auto": on a GPU)."""

    attention: str = "auto"
    compile: str = "auto"

    def __post_init__(self) -> None:
        check_attention_choice(self.attention)
        if self.compile not in COMPILE_CHOICES:
            raise InputError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {shown(self.compile)}")

    def check_available(self, device: torch.device, dtype: torch.dtype) -> None:
        """A named attention must run on `device` in `dtype`: refused before anything is measured or loaded."""
        if self.attention not in (AUTO, DIFFUSERS):
            available_attention(self.attention, device, dtype)

    def fused(self, device: torch.device) -> bool:
        return self.compile == "on" or (self.compile == "auto" and device.type == "cuda")


DEFAULT_KERNELS = KernelOptions()


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """One text-to-video (or text-to-image, frames=1) request.

    `shift=None` takes the tier's default; `negative_prompt=None` is the empty prompt, as in
    diffusers' pipeline; `guidance=1` runs the conditional branch only. `image` conditions latent
    frame 0 (image-to-video); `video` conditions the latent frames `condition_frames`
    (video-to-video, by default the first two: 5 pixel frames). `sound` generates the audio track
    too (a checkpoint with a sound tokenizer and a transformer trained with sound; video only).
    `cache="seacache"` skips the generator's layers on steps whose latents barely moved (diffusers'
    SeaCache; `cache_threshold` None is its default, 0.25).
    """

    prompt: str
    negative_prompt: str | None = None
    frames: int = DEFAULT_FRAMES
    resolution: int = DEFAULT_RESOLUTION
    aspect_ratio: str = "16,9"
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    shift: float | None = None
    fps: float = 24.0
    seed: int = 0
    output: Path = Path("output.mp4")
    image: Path | None = None
    video: Path | None = None
    condition_frames: tuple[int, ...] = (0, 1)
    sound: bool = False
    cache: str = "none"
    cache_threshold: float | None = None

    def __post_init__(self) -> None:
        check_text("prompt", self.prompt, required=True)
        if self.negative_prompt is not None:
            check_text("negative prompt", self.negative_prompt, required=False)
        object.__setattr__(self, "condition_frames", tuple(self.condition_frames))
        check_request(
            frames=self.frames,
            resolution=self.resolution,
            aspect_ratio=self.aspect_ratio,
            steps=self.steps,
            guidance=self.guidance,
            image=self.image,
            video=self.video,
            condition_frames=self.condition_frames,
        )
        if self.shift is not None:
            check_number("shift", self.shift, 0.0, MAX_SHIFT, low_open=True)
            if self.shift < MIN_SHIFT:
                raise InputError(
                    f"shift {self.shift!r} is too small for the flow schedule; use at least {MIN_SHIFT:g} "
                    f"(this tier's default is {DEFAULT_SHIFT[self.resolution]:g})"
                )
        check_schedule(self.steps, self.flow_shift)
        if self.sound and self.frames == 1:
            raise InputError("--sound goes with a video: use --frames 5 or more, or drop --sound")
        check_number("fps", self.fps, MIN_FPS, MAX_FPS)
        check_integer("seed", self.seed, 0, MAX_SEED)
        check_cache(self.cache, self.cache_threshold)
        object.__setattr__(self, "output", Path(self.output))
        try:
            check_output(self.output, self.frames)
        except InputError:
            raise
        except ValueError:  # a NUL byte, which only the Python API can pass
            raise InputError(f"output {str(self.output)!r} is not a usable path (it holds a NUL byte)") from None
        except OSError as error:  # too long, a symlink loop, a folder we may not enter
            raise InputError(
                f"output {str(self.output)!r} cannot be used: {error.strerror}; choose another --output"
            ) from None

    @property
    def width(self) -> int:
        return frame_size(self.resolution, self.aspect_ratio)[0]

    @property
    def height(self) -> int:
        return frame_size(self.resolution, self.aspect_ratio)[1]

    @property
    def flow_shift(self) -> float:
        return DEFAULT_SHIFT[self.resolution] if self.shift is None else self.shift

    @property
    def uses_guidance(self) -> bool:
        return self.guidance != 1.0
