"""The validated request: what to generate and where to run it.

Every check that depends only on the user's input happens here, before anything is loaded, with
a message that says how to fix it. The CLI turns a `ValueError` from this module into a one-line
error and exit status 2.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError
from .tiers import DEFAULT_SHIFT, check_frame_count, frame_size

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def resolve_device(name: str | None) -> torch.device:
    """`None` picks CUDA when present, else the CPU; anything else must name a usable device."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
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


def check_output_path(path: Path, frames: int) -> None:
    """The folder must exist and be writable; the suffix must match a video or an image."""
    suffixes = IMAGE_SUFFIXES if frames == 1 else VIDEO_SUFFIXES
    kind = "an image (1 frame)" if frames == 1 else "a video"
    if path.suffix.lower() not in suffixes:
        raise InputError(f"output {str(path)!r} is {kind}: give it one of the suffixes {', '.join(suffixes)}")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"output folder {str(folder)!r} does not exist; create it first")
    if path.is_dir():
        raise InputError(f"output {str(path)!r} is a folder; give a file name")
    # Try it: permission bits say nothing to root, and read-only mounts say nothing to os.access.
    try:
        probe, probe_name = tempfile.mkstemp(prefix=".cosmos3-offload-probe-", dir=folder)
    except OSError:
        raise InputError(f"output folder {str(folder)!r} is not writable; choose another --output") from None
    os.close(probe)
    os.unlink(probe_name)


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """One text-to-video (or text-to-image, frames=1) request.

    `shift=None` takes the tier's default; `negative_prompt=None` is the empty prompt, as in
    diffusers' pipeline; `guidance=1` runs the conditional branch only. `image` conditions latent
    frame 0 (image-to-video); `video` conditions the latent frames `condition_frames`
    (video-to-video, by default the first two: 5 pixel frames).
    """

    prompt: str
    negative_prompt: str | None = None
    frames: int = 189
    resolution: int = 720
    aspect_ratio: str = "16,9"
    steps: int = 35
    guidance: float = 6.0
    shift: float | None = None
    fps: float = 24.0
    seed: int = 0
    output: Path = Path("output.mp4")
    image: Path | None = None
    video: Path | None = None
    condition_frames: tuple[int, ...] = (0, 1)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError("the prompt is empty; pass --prompt 'what the video shows'")
        check_frame_count(self.frames)
        frame_size(self.resolution, self.aspect_ratio)
        if self.steps < 1:
            raise InputError(f"steps must be at least 1, got {self.steps}")
        if not self.guidance >= 0:
            raise InputError(f"guidance must be >= 0 (1 disables classifier-free guidance), got {self.guidance}")
        if self.shift is not None and not self.shift > 0:
            raise InputError(f"shift must be > 0, got {self.shift}")
        if not self.fps > 0:
            raise InputError(f"fps must be > 0, got {self.fps}")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")
        object.__setattr__(self, "output", Path(self.output))
        check_output_path(self.output, self.frames)
        self._check_conditioning()

    def _check_conditioning(self) -> None:
        if self.image is not None and self.video is not None:
            raise InputError("pass either --image (image-to-video) or --video (video-to-video), not both")
        if (self.image is not None or self.video is not None) and self.frames == 1:
            raise InputError("--image and --video condition a video: use --frames 5 or more")
        latent_frames = (self.frames - 1) // 4 + 1
        indexes = self.condition_frames
        if self.video is not None and (not indexes or any(i < 0 or i >= latent_frames for i in indexes)):
            raise InputError(
                f"condition frames {list(indexes)} must be latent frame indexes in 0..{latent_frames - 1} "
                f"for {self.frames} frames"
            )
        for path in (self.image, self.video):
            if path is not None and not Path(path).is_file():
                raise InputError(f"{str(path)!r} does not exist")

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
