"""A request's fields, as JSON or a multipart form sends them, checked and turned into a request.

`POST /v1/videos` takes OpenAI's fields (`prompt`, `model`, `size` "WxH", `seconds`, `input_reference`)
and ours (`frames` instead of `seconds`, `negative_prompt`, `steps`, `guidance`, `shift`, `fps`, `seed`,
`sound`, `cache`). `POST /v1/images/generations` takes `prompt`, `model`, `size`, `n`,
`response_format` (b64_json), `output_format` (png or jpeg) and ours. A form sends every value as text,
so numbers and switches are read from text too. An unknown field is refused (a typo would otherwise be
ignored); `model` may name anything (clients send their default) and the job reports the served model.

What the GenerationConfig checks (frame counts, steps, guidance, text) it words itself; this module
adds what only the API has: sizes as "WxH", seconds, the server's defaults and its planned limit.
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
from dataclasses import dataclass
from typing import Any

from ..app.config import MAX_FRAMES, MAX_SEED
from ..app.serve_settings import RequestLimit
from ..model.tiers import RESOLUTION_TIERS
from .api_errors import bad_request

VIDEO_FIELDS = {
    "prompt", "model", "size", "seconds", "frames", "input_reference", "negative_prompt", "steps",
    "guidance", "shift", "fps", "seed", "sound", "cache",
}  # fmt: skip
# OpenAI image fields that only tune OpenAI's own models: taken and not used.
IGNORED_IMAGE_FIELDS = {"quality", "style", "user", "background", "moderation", "output_compression"}
IMAGE_FIELDS = {
    "prompt", "model", "size", "n", "response_format", "output_format", "negative_prompt", "steps", "guidance",
    "shift", "seed",
} | IGNORED_IMAGE_FIELDS  # fmt: skip
MAX_IMAGES = 4  # `n` of one images request: each is a job in the queue
MAX_SECONDS = 60.0
MAX_UPLOAD_BYTES = 32 * 2**20
SIZES = {f"{w}x{h}": (tier, aspect) for tier, sizes in RESOLUTION_TIERS.items() for aspect, (w, h) in sizes.items()}
TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


@dataclass(frozen=True)
class Upload:
    """An input image as it arrived: its bytes and the suffix its file gets (from its name or type)."""

    data: bytes
    suffix: str


@dataclass(frozen=True)
class ParsedRequest:
    """GenerationConfig keywords (no output, no image path yet), the input image, and what the API reports."""

    config: dict[str, Any]
    upload: Upload | None
    size: str
    seconds: str


def parse_video(fields: dict[str, Any], defaults: dict[str, Any], limit: RequestLimit | None) -> ParsedRequest:
    _known(fields, VIDEO_FIELDS)
    config = _common(fields, defaults)
    frames = _frames(fields, defaults, config["fps"])
    if frames == 1:
        raise bad_request("a video has at least 5 frames; for one frame use POST /v1/images/generations", "frames")
    config["frames"] = frames
    config["sound"] = _switch(fields, "sound", False)
    if "cache" in fields:
        config["cache"], config["cache_threshold"] = _text(fields, "cache"), None
    size = _check_limit(config, limit)
    upload = _upload(fields.get("input_reference"))
    seconds = str(fields["seconds"]) if "seconds" in fields else f"{frames / config['fps']:g}"
    return ParsedRequest(config, upload, size, seconds)


def parse_image(
    fields: dict[str, Any], defaults: dict[str, Any], limit: RequestLimit | None
) -> tuple[ParsedRequest, int, str]:
    """(the request, how many images, the file suffix)."""
    _known(fields, IMAGE_FIELDS)
    count = _integer(fields, "n", 1)
    if not 1 <= count <= MAX_IMAGES:
        raise bad_request(f"n must be 1 to {MAX_IMAGES}, got {count}", "n")
    if fields.get("response_format", "b64_json") not in ("b64_json", None):
        raise bad_request("response_format must be b64_json (this server returns the image in the response)")
    formats = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", None: ".png"}
    if fields.get("output_format") not in formats:
        raise bad_request("output_format must be png or jpeg", "output_format")
    config = _common(fields, defaults)
    config["frames"] = 1
    config["cache"], config["cache_threshold"] = "none", None
    size = _check_limit(config, limit)
    return ParsedRequest(config, None, size, "0"), count, formats[fields.get("output_format")]


def _known(fields: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise bad_request(f"unknown parameter {unknown[0]!r}; this endpoint takes {', '.join(sorted(allowed))}")


def _common(fields: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    if "prompt" not in fields:
        raise bad_request("prompt is required", "prompt")
    resolution, aspect = defaults["resolution"], defaults["aspect_ratio"]
    if "size" in fields:
        size = _text(fields, "size").lower().replace(" ", "")
        if size not in SIZES:
            raise bad_request(f"size {size!r} is not a Cosmos3 frame size; use one of {', '.join(SIZES)}", "size")
        resolution, aspect = SIZES[size]
    config = {
        "prompt": _text(fields, "prompt"),
        "negative_prompt": _text(fields, "negative_prompt") if "negative_prompt" in fields else None,
        "resolution": resolution,
        "aspect_ratio": aspect,
        "steps": _integer(fields, "steps", defaults["steps"]),
        "guidance": _number(fields, "guidance", defaults["guidance"]),
        "shift": _number(fields, "shift", None),
        "fps": _number(fields, "fps", defaults["fps"]),
        "seed": _integer(fields, "seed", None),
        "cache": defaults["cache"],
        "cache_threshold": defaults["cache_threshold"],
    }
    if config["seed"] is None:
        config["seed"] = secrets.randbelow(2**31)  # reported with the job, so it can be asked for again
    elif not 0 <= config["seed"] <= MAX_SEED:
        raise bad_request(f"seed must be 0 to {MAX_SEED}", "seed")
    if not 0.1 <= config["fps"] <= 240:
        raise bad_request("fps must be in [0.1, 240]", "fps")
    return config


def _frames(fields: dict[str, Any], defaults: dict[str, Any], fps: float) -> int:
    if "seconds" in fields and "frames" in fields:
        raise bad_request("pass seconds or frames, not both", "seconds")
    if "seconds" not in fields:
        return _integer(fields, "frames", defaults["frames"])
    seconds = _number(fields, "seconds", None)
    if not 0 < seconds <= MAX_SECONDS:
        raise bad_request(f"seconds must be more than 0 and at most {MAX_SECONDS:g}", "seconds")
    frames = 4 * max(1, round((seconds * fps - 1) / 4)) + 1  # the nearest count the VAE takes (4k + 1)
    if frames > MAX_FRAMES:
        raise bad_request(f"{seconds:g} seconds at {fps:g} fps is more than {MAX_FRAMES} frames", "seconds")
    return frames


def _check_limit(config: dict[str, Any], limit: RequestLimit | None) -> str:
    width, height = RESOLUTION_TIERS[config["resolution"]][config["aspect_ratio"]]
    refusal = None if limit is None else limit.refusal(config["frames"], width, height)
    if refusal is not None:
        raise bad_request(refusal, "size")
    return f"{width}x{height}"


def _text(fields: dict[str, Any], name: str) -> str:
    value = fields[name]
    if not isinstance(value, str):
        raise bad_request(f"{name} must be text", name)
    return value


def _integer(fields: dict[str, Any], name: str, default: int | None) -> int | None:
    if name not in fields or fields[name] is None:
        return default
    value = fields[name]
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise bad_request(f"{name} must be a whole number, got {value[:40]!r}", name) from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request(f"{name} must be a whole number", name)
    return value


def _number(fields: dict[str, Any], name: str, default: float | None) -> float | None:
    if name not in fields or fields[name] is None:
        return default
    value = fields[name]
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise bad_request(f"{name} must be a number, got {value[:40]!r}", name) from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise bad_request(f"{name} must be a finite number", name)
    return float(value)


def _switch(fields: dict[str, Any], name: str, default: bool) -> bool:
    value = fields.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
        return value.strip().lower() in TRUE
    raise bad_request(f"{name} must be true or false", name)


def _upload(value: Any) -> Upload | None:
    """A file part (anything with `filename` and bytes read already: see api.py), a data: URL, or
    `{"image_url": "data:..."}`; a web address is refused (the server fetches nothing)."""
    if value is None:
        return None
    if isinstance(value, Upload):
        data = value.data
        suffix = value.suffix
    else:
        url = value.get("image_url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url.startswith("data:"):
            raise bad_request(
                "input_reference must be an uploaded image file or a data: URL (the server fetches nothing)",
                "input_reference",
            )
        header, _, payload = url.partition(",")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("input_reference: the data URL is not valid base64", "input_reference") from None
        suffix = ".jpg" if "jpeg" in header or "jpg" in header else ".webp" if "webp" in header else ".png"
    if not data:
        raise bad_request("input_reference is empty", "input_reference")
    if len(data) > MAX_UPLOAD_BYTES:
        raise bad_request(f"input_reference is larger than {MAX_UPLOAD_BYTES // 2**20} MiB", "input_reference")
    return Upload(data, suffix)
