"""Previews: a run shows its video as it renders, in one image file kept up to date.

After every `every`-th denoising step (and always after the last), the step's estimate of the clean video
(its x0) is drawn into `PreviewOptions.path`, a .png (the middle of the video), or an animated .webp or .gif
(frames across the video). Two kinds (doors.`Preview` is their interface):

- *fast* (`FastPreview`): each latent pixel drawn through a linear map of its channels to RGB
  (vae/preview_map.py), fitted from the checkpoint's own VAE once and cached per checkpoint in the cache
  folder (kernels/probe.py `cache_dir`, under preview-maps/). A few milliseconds; a few MiB of the device;
  one pixel per 16 x 16, scaled up for display;
- *exact* (`ExactPreview`): the VAE's decode of a few latent frames, each decoded alone (as a first frame is)
  in the plan's decode tiles, while the generator is on the device. The VAE must stay on the device for it:
  the planner keeps it resident and counts one decode's working set in the denoise (planning/memory.py); a
  given plan that stages it is refused (`check_preview_plan`).

The file is always a whole image: it is written beside the target under a temporary name and renamed over it,
so a reader (a viewer, the server's GET /v1/videos/{id}/preview) sees the previous image or the new one. A
preview never changes the run: it reads the estimate and draws no random numbers, and one that cannot be
written (a full disk) is logged and skipped, never fails the run.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import InputError, first_line
from ..kernels.probe import cache_dir
from ..loading.components import TINY_WEIGHT_SEED, Components
from ..model.geometry import TEMPORAL_COMPRESSION
from ..model.groups import VAE, VAE_ENCODER
from ..planning.plan import Mode, Plan
from ..request.checks import InputFiles
from ..vae.decode import NonFinitePixels
from ..vae.preview_map import (
    CLIP_FRAMES,
    CLIP_SIZE,
    LEVELS,
    RIDGE,
    PreviewMap,
    colour_clips,
    decode_clips,
    encode_clips,
    fit_from_clips,
)
from .config import GenerationConfig
from .doors import PlacedPipeline
from .generate import decode_frames
from .outputs import resolve_target

logger = logging.getLogger(__name__)

KINDS = ("fast", "exact")
DEFAULT_EVERY = {"fast": 1, "exact": 5}  # steps between previews
SUFFIXES = (".png", ".webp", ".gif")  # .webp and .gif are animated
FAST_FRAMES = 8  # at most this many frames in an animated fast preview, spread over the video (WebP: ~3 ms each)
EXACT_FRAMES = 3  # the first, middle and last latent frames in an animated exact preview
FAST_SIDE = 256  # a fast preview's longer side, pixels (scaled up from one pixel per latent pixel)
PREVIEW_FPS = 24.0  # an animated preview plays at this pace (Cosmos3's default fps), 0.1 to 1 s a frame
MAP_FORMAT = 1  # the cached map's format; a change refits every map


@dataclass(frozen=True)
class PreviewOptions:
    """Where and how a run shows its preview: `path` (.png: the middle frame; .webp or .gif: animated), `kind`
    fast or exact, `every` steps (None: 1 for fast, 5 for exact; the last step always gets one). Checked at
    construction: the folder must exist and take a file, and the path must be a file we may replace."""

    path: Path
    kind: str = "fast"
    every: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.kind not in KINDS:
            raise InputError(f"unknown preview kind {self.kind!r}; choose fast or exact")
        every = DEFAULT_EVERY[self.kind] if self.every is None else self.every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"previews come every whole number of steps, 1 or more; got every={self.every!r}")
        object.__setattr__(self, "every", every)
        if self.path.suffix.lower() not in SUFFIXES:
            raise InputError(
                f"preview {str(self.path)!r} must end in .png (the middle frame) or .webp or .gif (animated)"
            )
        _check_writable(self.path)

    @property
    def animated(self) -> bool:
        return self.path.suffix.lower() != ".png"


def _check_writable(path: Path) -> None:
    """Refuse a preview path whose folder is missing or takes no file, that is a folder or not a regular file,
    or an existing read-only file (its mode is the user's word); a symlink is followed, as the output's is."""
    target = resolve_target(path)
    if not target.parent.is_dir():
        raise InputError(f"preview folder {str(target.parent)!r} does not exist; create it first")
    if target.is_dir():
        raise InputError(f"preview {str(path)!r} is a folder; give a file name")
    if target.exists():
        if not target.is_file():
            raise InputError(f"preview {str(path)!r} is not a regular file; choose another path")
        if not (target.stat().st_mode & 0o222 and os.access(target, os.W_OK)):
            raise InputError(f"preview {str(path)!r} exists and is read-only; remove it or choose another path")
    probe = _temporary_path(target)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise InputError(f"preview name {target.name!r} is too long for its temporary file; shorten it") from None
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):  # a full disk is not the request's fault
            raise InputError(f"preview folder {str(target.parent)!r} is not writable; choose another path") from None
    probe.unlink(missing_ok=True)


def check_preview_output(options: PreviewOptions, config: GenerationConfig, checkpoint: Path | None) -> None:
    """Refuse a preview that would overwrite the run's own output (a one-frame run writes a .png) or one of the
    files it reads (its image, clip or actions file, a checkpoint's file): a preview is rewritten every few steps."""
    preview, video = resolve_target(options.path).resolve(), resolve_target(Path(config.output)).resolve()
    if preview == video:
        raise InputError(f"the preview {str(options.path)!r} is the output itself; give the preview another name")
    inputs = InputFiles((("image", config.image), ("video", config.video), ("actions file", config.actions)))
    if checkpoint is not None:
        inputs.add_folder("checkpoint", checkpoint)
    inputs.refuse_output(options.path, "preview")


def check_preview_plan(options: PreviewOptions | None, plan: Plan) -> None:
    """Refuse exact previews under a plan that stages the VAE: they decode while the generator holds the
    arena, so the VAE's weights must stay on the device."""
    if options is not None and options.kind == "exact" and plan.vae.mode is not Mode.RESIDENT:
        raise InputError(
            "exact previews decode while the generator runs, so the VAE must stay on the device: drop vae from "
            "--offload-stages, or use fast previews"
        )


def preview_frames(options: PreviewOptions | None) -> int:
    """Latent frames an exact preview decodes during the denoise, for the planner (0: none, or fast)."""
    if options is None or options.kind != "exact":
        return 0
    return EXACT_FRAMES if options.animated else 1


def make_preview(
    options: PreviewOptions, components: Components, *, checkpoint: Path | None, model: str
) -> FastPreview | ExactPreview:
    """The previewer `options` ask for, on loaded `components` (a fast one's map is read from the cache, or
    fitted now from the VAE: a few seconds, once per checkpoint). `checkpoint` None: `model`'s random weights."""
    if options.kind == "exact":
        check_preview_plan(options, components.plan)
        return ExactPreview(options)
    return FastPreview(options, colour_map(components, checkpoint=checkpoint, model=model))


class _Previewer:
    """What both kinds share: when a preview is due, and which latent frames it shows."""

    kind: str
    most_frames: int

    def __init__(self, options: PreviewOptions) -> None:
        self.options = options
        self._failed = False

    def due(self, index: int, steps: int) -> bool:
        """After every `every`-th step (from 0), and after the last."""
        return (index + 1) % self.options.every == 0 or index == steps - 1

    def _frames(self, latent_frames: int) -> list[int]:
        """Latent frames to show: the middle one in a .png, else up to `most_frames` from the first to the last."""
        if not self.options.animated:
            return [latent_frames // 2]
        count = min(self.most_frames, latent_frames)
        if count == 1:
            return [0]
        return sorted({round(i * (latent_frames - 1) / (count - 1)) for i in range(count)})

    def _write(self, frames: np.ndarray, spacing: int) -> None:
        """`frames` uint8 [F, H, W, 3] into the preview file, whole; a failure is logged (the run goes on)."""
        try:
            write_whole(frames, self.options.path, _frame_seconds(spacing))
        except OSError as error:
            level = logging.DEBUG if self._failed else logging.WARNING
            logger.log(level, "cannot write the preview %s (%s); the run goes on", self.options.path, first_line(error))
            self._failed = True


class FastPreview(_Previewer):
    """Latent pixels through the VAE's fitted colour map, scaled up to `FAST_SIDE`."""

    kind = "fast"
    most_frames = FAST_FRAMES

    def __init__(self, options: PreviewOptions, colours: PreviewMap) -> None:
        super().__init__(options)
        self.colours = colours

    @torch.no_grad()
    def show(self, index: int, steps: int, denoised: torch.Tensor, placed: PlacedPipeline) -> None:
        if self.colours.weight.device != denoised.device:
            self.colours = self.colours.to(denoised.device)
        picks = self._frames(denoised.shape[2])
        rgb = self.colours.apply(denoised[0, :, picks])  # [F, 3, h, w] in [-1, 1], on the device
        height, width = rgb.shape[-2:]
        scale = max(1, FAST_SIDE // max(height, width))
        rgb = torch.nn.functional.interpolate(rgb, size=(height * scale, width * scale), mode="bilinear")
        pixels = ((rgb + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        # Waits for the step's work on the device: the preview shows its result.
        self._write(pixels.cpu().numpy(), _spacing(picks))


class ExactPreview(_Previewer):
    """The VAE's decode of a few latent frames, each alone, in the plan's decode tiles."""

    kind = "exact"
    most_frames = EXACT_FRAMES

    @torch.no_grad()
    def show(self, index: int, steps: int, denoised: torch.Tensor, placed: PlacedPipeline) -> None:
        picks = self._frames(denoised.shape[2])
        grid = placed.plan.decode_grid
        try:  # each latent frame decoded as a first frame: one pixel frame each (waits for the decode)
            frames = [decode_frames(placed.pipe, denoised[:, :, t : t + 1], grid=grid)[0] for t in picks]
        except NonFinitePixels:
            logger.warning("step %d's preview decodes to non-finite pixels; it is skipped", index + 1)
            return
        self._write(np.stack(frames), _spacing(picks))


def _spacing(picks: list[int]) -> int:
    return picks[1] - picks[0] if len(picks) > 1 else 1


def _frame_seconds(spacing: int) -> float:
    """How long an animated preview shows a frame: the video's time between the latent frames it shows."""
    return min(1.0, max(0.1, spacing * TEMPORAL_COMPRESSION / PREVIEW_FPS))


def write_whole(frames: np.ndarray, path: Path, seconds: float = 0.25) -> None:
    """uint8 frames [F, H, W, 3] into `path` (.png: the first; .webp, .gif: all, `seconds` each), written under a
    temporary name beside it and renamed over it, so it is always a whole image; a symlink is followed."""
    target = resolve_target(path)
    data = _encoded([Image.fromarray(frame) for frame in frames], target.suffix.lower(), seconds)
    temporary = _temporary_path(target)
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's mode, as any new file
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            if os.fstat(file.fileno()).st_size != len(data):  # a short write that raised nothing
                raise OSError(errno.ENOSPC, "the preview was written short")
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _encoded(images: list[Image.Image], suffix: str, seconds: float) -> bytes:
    """The image file's bytes (encoded in memory: the file is written in one piece, and a full disk says so)."""
    buffer = io.BytesIO()
    animated = {"save_all": True, "append_images": images[1:], "duration": round(seconds * 1000), "loop": 0}
    if suffix == ".png":
        images[0].save(buffer, format="PNG", compress_level=1)
    elif suffix == ".webp":
        images[0].save(buffer, format="WEBP", quality=80, method=0, **animated)
    else:  # GIF: a fast 256-colour palette per frame (Pillow's default quantizer takes about 100 ms a frame)
        paletted = [image.quantize(256, method=Image.Quantize.FASTOCTREE) for image in images]
        paletted[0].save(buffer, format="GIF", **{**animated, "append_images": paletted[1:]})
    return buffer.getvalue()


def _temporary_path(target: Path) -> Path:
    return target.parent / f".{target.name}.{secrets.token_hex(4)}.preview-partial"


def colour_map(components: Components, *, checkpoint: Path | None, model: str) -> PreviewMap:
    """The fast preview's colour map of this VAE: cached in `cache_dir()`/preview-maps, else fitted now (the
    VAE's encoder, then its decoder, on the device) and saved. An unreadable or foreign cache file is refitted."""
    key = _map_key(components, checkpoint, model)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = cache_dir() / "preview-maps" / f"{digest[:32]}.json"
    channels = components.vae.config.z_dim
    try:
        data = json.loads(path.read_text())
        if data["key"] == key:
            return PreviewMap.from_json(data["map"], channels)
        logger.info("%s holds another VAE's preview map; fitting again", path)
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        logger.warning("cannot use the preview map %s (%s); fitting again", path, first_line(error))
    colours = fit_colour_map(components)
    try:
        _write_text_whole(path, json.dumps({"key": key, "map": colours.as_json()}) + "\n")
    except OSError as error:
        logger.warning("cannot save the preview map to %s (%s); it will be fitted again", path, first_line(error))
    return colours


def fit_colour_map(components: Components) -> PreviewMap:
    """Fit the colour map from the loaded VAE: the synthetic clips through its encoder, then its decoder."""
    logger.info("fitting the fast preview's colour map from the VAE (once per checkpoint)")
    vae, engine = components.vae, components.engine
    with engine.use(VAE_ENCODER):
        raw = encode_clips(vae, colour_clips(), engine.device)
    with engine.use(VAE):
        pixels = decode_clips(vae, raw, engine.device)
    return fit_from_clips(vae, raw, pixels)


def _map_key(components: Components, checkpoint: Path | None, model: str) -> dict:
    """What a map depends on: the fit's recipe, the VAE's config and its weights (a checkpoint's VAE files by
    name, size and time; random weights by model and seed)."""
    recipe = {"format": MAP_FORMAT, "clip": [CLIP_SIZE, CLIP_FRAMES], "levels": list(LEVELS), "ridge": RIDGE}
    config = {k: v for k, v in components.vae.config.items() if not k.startswith("_")}  # not its folder's name
    config = json.loads(json.dumps(config, sort_keys=True, default=str))
    if checkpoint is None:
        return {"recipe": recipe, "config": config, "random": {"model": model, "seed": TINY_WEIGHT_SEED}}
    folder = Path(checkpoint) / "vae"
    files = []
    for file in sorted(folder.iterdir()):
        stat = file.stat()  # a Hub snapshot's links: their blobs
        files.append([file.name, stat.st_size, stat.st_mtime_ns])
    return {"recipe": recipe, "config": config, "files": files}


def _write_text_whole(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
