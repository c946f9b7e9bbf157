"""Reading the user's files, bounded, before anything is loaded.

An image is checked for its pixel count and aspect ratio from its header, before a single pixel is
decoded (the pipeline scales an image to cover the frame, so a 100000x1 strip would ask for tens of
gigabytes); a clip is read frame by frame and only as far as the frames that condition (its header's
frame size is checked first, and ffmpeg's decoder is told to refuse frames past twice the bound,
padding included, so a lying header cannot make it allocate more), so a long or huge file costs no
more than what is used. A text file (a sample file, a prompt file) is read only when it is a regular
file of at most a bound's bytes: a FIFO, a device or `/dev/zero` is refused without being opened.
A file that cannot be used is an InputError naming it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from ..loading.file_kinds import open_regular
from ..model.actions import ACTION_WIDTHS
from ..model.geometry import SPATIAL_COMPRESSION, frames_to_encode
from ..request.spec import RequestSpec
from ..units import format_bytes
from .action_files import read_actions
from .action_input import ActionInput

MAX_INPUT_PIXELS = 8192 * 8192  # per image or clip frame; every tier is resized down from this
# Longest side over shortest, per image or clip frame: a 32:9 screen or a 6:1 panorama, not a strip.
# Covering a 9:16 frame, an 8:1 image is resized to at most 14 frames' pixels.
MAX_ASPECT_RATIO = 8


def _too_large(kind: str, path: Path, size: str | None) -> InputError:
    """The refusal of an oversized image or clip; `size` is WxH when known."""
    said = f"is {size}; the largest accepted is" if size else "is larger than the largest accepted,"
    return InputError(f"{kind} {str(path)!r} {said} {MAX_INPUT_PIXELS} pixels (8192x8192): scale it down first")


def _check_pixels(kind: str, path: Path, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{kind} {str(path)!r} has no pixels")
    if width * height > MAX_INPUT_PIXELS:
        raise _too_large(kind, path, f"{width}x{height}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InputError(
            f"{kind} {str(path)!r} is {width}x{height}, longer than {MAX_ASPECT_RATIO}:1 on one side; crop it "
            f"to at most {MAX_ASPECT_RATIO}:1 first"
        )


def _check_file(kind: str, path: Path) -> None:
    """Refuse a path that is not a regular file (a folder, a FIFO that would block, a device)."""
    if not path.exists():
        raise InputError(f"{kind} {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"{kind} {str(path)!r} is not a regular file")


def read_image(path: Path) -> Image.Image:
    """The conditioning image as RGB; missing, unreadable, empty or oversized files are refused."""
    _check_file("image", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_pixels("image", path, *image.size)  # from the header: nothing decoded yet
                image.load()
                return image.convert("RGB")
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own header check (above its MAX_IMAGE_PIXELS) fires inside Image.open, before ours.
        raise _too_large("image", path, None) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InputError(f"image {str(path)!r} cannot be read as an image") from None


def read_video(path: Path, frames: int) -> list[Image.Image]:
    """The clip's first `frames` frames as RGB (fewer when it is shorter); missing, unreadable,
    frameless or oversized files are refused. Reads no frame past those."""
    _check_file("video", path)
    kept: list[Image.Image] = []
    # ffmpeg checks the padded size of what it decodes (a 160x96 clip is 192x96 to it): hence twice the bound.
    limit = ["-max_pixels", str(2 * MAX_INPUT_PIXELS)]
    try:
        with imageio.get_reader(path, format="FFMPEG", input_params=limit) as reader:
            width, height = reader.get_meta_data().get("size", (0, 0))
            _check_pixels("video", path, int(width), int(height))
            for frame in reader:
                frame = np.asarray(frame)
                if frame.ndim != 3 or 0 in frame.shape[:2]:
                    break
                kept.append(Image.fromarray(frame[..., :3]))
                if len(kept) == frames:
                    break
    except InputError:
        raise
    except Exception as error:  # imageio and ffmpeg raise many kinds of errors for a file they cannot decode
        if "exceeds specified max pixel count" in str(error):  # ffmpeg's refusal, with its log
            raise _too_large("video", path, None) from None
        raise InputError(f"video {str(path)!r} cannot be read as a video") from None
    if not kept:
        raise InputError(f"video {str(path)!r} has no frames")
    return kept


def input_frame_size(kind: str, path: Path, stride: int = SPATIAL_COMPRESSION) -> tuple[int, int]:
    """(height, width) of an image's or a clip's frames, floored to the VAE's `stride` as diffusers' video
    processor floors them; read from the header (a clip: its first frame), bounded like the reads."""
    if kind == "image":
        _check_file("image", path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    width, height = image.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _too_large("image", path, None) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise InputError(f"image {str(path)!r} cannot be read as an image") from None
        _check_pixels("image", path, width, height)
    else:
        width, height = read_video(path, 1)[0].size
    return max(height // stride * stride, stride), max(width // stride * stride, stride)


@dataclass(frozen=True)
class Conditioning:
    """What conditions a generation: one image (latent frame 0) or a clip (latent frames `indexes`), or
    an action run's inputs (its clip and action rows: see action_input.py)."""

    image: Image.Image | None
    video: list[Image.Image] | None
    indexes: tuple[int, ...]
    action: ActionInput | None = None


def read_conditioning(request: RequestSpec) -> Conditioning | None:
    """Read the request's conditioning files (before anything is loaded); None for text-only."""
    if request.action is not None:
        return Conditioning(None, None, (), read_action(request))
    return read_frames(request.image, request.video, request.condition_frames)


def read_frames(image: Path | None, video: Path | None, condition_frames: tuple[int, ...]) -> Conditioning | None:
    """An image (latent frame 0) or the frames of a clip that condition the latent frames `condition_frames`."""
    if image is not None:
        return Conditioning(read_image(image), None, (0,))
    if video is not None:
        indexes = tuple(sorted(set(condition_frames)))
        needed = frames_to_encode(image=False, video=True, condition_frames=indexes)
        return Conditioning(None, read_video(video, needed), indexes)
    return None


def read_action(request: RequestSpec) -> ActionInput:
    """An action run's clip (the frames its mode encodes: the first, or chunk + 1 for inverse dynamics)
    and action rows, read and checked."""
    if request.video is not None:
        clip = read_video(request.video, request.frames if request.action == "inverse_dynamics" else 1)
    else:
        clip = [read_image(request.image)]
    rows = None
    if request.actions is not None:
        rows = read_actions(request.actions, ACTION_WIDTHS[request.domain], request.domain)
    return ActionInput(
        mode=request.action,
        domain=request.domain,
        chunk=request.chunk_size,
        tier=request.resolution,
        view=request.view,
        clip=clip,
        raw_actions=rows,
    )


def read_text_file(kind: str, path: Path, max_bytes: int) -> str:
    """A UTF-8 text file of at most `max_bytes`: a FIFO, a device (`/dev/zero`) or a folder is refused
    without being read (`open_regular`, as the checkpoint's files are), one grown past the bound since is
    read no further."""
    if not os.path.lexists(path):
        raise InputError(f"{kind} {str(path)!r} does not exist")
    try:
        with open_regular(path, kind) as file:
            if os.fstat(file.fileno()).st_size > max_bytes:
                raise _too_long(kind, path, max_bytes)
            data = file.read(max_bytes + 1)
    except InputError:
        raise
    except (OSError, ValueError) as error:  # too long a name, a symlink loop, a NUL byte (the Python API only)
        raise InputError(f"{kind} {str(path)!r} cannot be read: {getattr(error, 'strerror', None) or error}") from None
    if len(data) > max_bytes:
        raise _too_long(kind, path, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{kind} {str(path)!r} is not UTF-8 text") from None


def _too_long(kind: str, path: Path, max_bytes: int) -> InputError:
    return InputError(f"{kind} {str(path)!r} is larger than {format_bytes(max_bytes)}, the most a {kind} may hold")
