"""A request's fields, as JSON or a form sends them, checked and turned into a request.

`read_fields` reads the body: a JSON object (400 for anything else, nested too deep included), or a
multipart or urlencoded form whose text is UTF-8 as the client sent it.

`POST /v1/videos` takes the request fields the declaration gives the HTTP door (request/spec.py:
`prompt`, `negative_prompt`, `frames`, `steps`, `guidance`, `shift`, `fps`, `seed`, `sound`, `cache`,
`cache_threshold`, ...), under OpenAI's names where OpenAI has one (`size` "WxH" for the tier and
aspect ratio, `input_reference` for the image), OpenAI's `model` and `seconds`, and a Cosmos3 action run's
`action` object with its `input_video` clip and `actions` file (action_request.py).
`POST /v1/images/generations` takes those that make one frame, and `n`, `response_format` (b64_json)
and `output_format` (png or jpeg). A form sends every value as text, so a value is read from text as
the CLI reads its flags. An unknown field is refused (a typo would otherwise be ignored); `model` may
name any model (clients send their default) and the job reports the served model. A list or object
where text or a number belongs is a 400 naming the field, never a 500.

Each field is checked by its declaration, in the words every door uses, with `param` naming it; this
module adds what only the API has: sizes as "WxH", seconds, the server's defaults and its planned limit.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from ..app.serve_settings import RequestLimit
from ..errors import InputError
from ..model.actions import DEFAULT_ACTION_TIER
from ..model.tiers import RESOLUTION_TIERS
from ..request.checks import FieldError, shown
from ..request.spec import FIELDS_BY_NAME, MAX_FRAMES, door_fields, named_at, request_defaults
from .action_request import ActionRequest, parse_action, refuse_video_fields
from .api_errors import ApiError, bad_request
from .uploads import MAX_UPLOAD_BYTES, Upload, read_upload

# Request fields under their HTTP names; "size" and the uploads are read apart (composite, files).
HTTP_NAMES = door_fields("http")
READ_APART = ("size", "input_reference", "input_video")
DECLARED_DEFAULTS = {name: value for name, value in request_defaults().items() if name not in ("image", "video")}
ACTION_FIELDS = {"action", "actions", "input_video"}  # the action object, its rows' file part, its clip
VIDEO_FIELDS = {*HTTP_NAMES.values(), "model", "seconds", *ACTION_FIELDS}
# A one-frame request has no clip, sound, frame rate, step cache or action.
NOT_FOR_IMAGES = {"frames", "seconds", "input_reference", "sound", "fps", "cache", "cache_threshold", *ACTION_FIELDS}
# OpenAI image fields that only tune OpenAI's own models: taken and not used.
IGNORED_IMAGE_FIELDS = {"quality", "style", "user", "background", "moderation", "output_compression"}
IMAGE_FIELDS = (VIDEO_FIELDS - NOT_FOR_IMAGES) | {"n", "response_format", "output_format"} | IGNORED_IMAGE_FIELDS
MAX_IMAGES = 4  # `n` of one images request: each is a job in the queue
MAX_SECONDS = 60.0
MAX_FORM_FIELDS = 64
MAX_FORM_FILES = 3  # input_reference or input_video, and actions
SIZES = {f"{w}x{h}": (tier, aspect) for tier, sizes in RESOLUTION_TIERS.items() for aspect, (w, h) in sizes.items()}


@dataclass(frozen=True)
class ParsedRequest:
    """GenerationConfig keywords (no output, no input paths yet), the input image, and what the API reports
    (`size` and `seconds`: None for an action run, whose input's shape fixes them); an action run's `action`
    and its clip (`video_upload`)."""

    config: dict[str, Any]
    upload: Upload | None
    size: str | None
    seconds: str | None
    video_upload: Upload | None = None
    action: ActionRequest | None = None


async def read_fields(request: Request) -> dict[str, Any]:
    """The body's fields: a JSON object, or a form (multipart or urlencoded, its text UTF-8) whose files are
    read here."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's parser goes
            raise bad_request("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        return body
    if kind == "application/x-www-form-urlencoded":
        return _named_once(await _urlencoded(request))
    if kind != "multipart/form-data":
        raise bad_request("send the body as application/json or multipart/form-data")
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_UPLOAD_BYTES)
    except (MultiPartException, ValueError) as error:
        raise bad_request(f"the form cannot be read: {error}") from None
    items: list[tuple[str, Any]] = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read(MAX_UPLOAD_BYTES + 1)
            value = Upload(data, Path(value.filename or "").suffix.lower())
        items.append((name, value))
    await form.close()
    return _named_once(items)


async def _urlencoded(request: Request) -> list[tuple[str, str]]:
    """A urlencoded body's fields, as UTF-8 whether the client escaped its bytes (%C3%A9) or sent them raw
    (curl -d): Starlette reads raw bytes as Latin-1."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_UPLOAD_BYTES:
            raise ApiError(413, f"the form is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        text = body.decode("utf-8")
        return parse_qsl(
            text, keep_blank_values=True, encoding="utf-8", errors="strict", max_num_fields=MAX_FORM_FIELDS
        )
    except UnicodeDecodeError:
        raise bad_request("the form is not UTF-8 text") from None
    except ValueError as error:
        raise bad_request(f"the form cannot be read: {error}") from None


def _named_once(items: list[tuple[str, Any]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in items:
        if name in fields:
            raise bad_request(f"{name} is given twice", name)
        fields[name] = value
    return fields


def parse_video(
    fields: dict[str, Any],
    defaults: dict[str, Any],
    limit: RequestLimit | None,
    *,
    action_tier: int = DEFAULT_ACTION_TIER,
) -> ParsedRequest:
    """A video request; with an `action` object, an action run (its tier `action_tier` unless it names one)."""
    _known(fields, VIDEO_FIELDS)
    action = parse_action(fields.get("action"), fields.get("actions"), action_tier)
    if action is not None:
        return _action_video(fields, defaults, action)
    if fields.get("input_video") is not None:
        raise bad_request(
            "input_video conditions an action run (send an action object); for image-to-video send input_reference",
            "input_video",
        )
    config = _common(fields, defaults)
    if fields.get("frames") is not None and fields.get("seconds") is not None:
        raise bad_request("pass seconds or frames, not both", "seconds")
    if fields.get("seconds") is not None:
        config["frames"] = _frames_of(fields["seconds"], config["fps"])
    if config["frames"] == 1:
        raise bad_request("a video has at least 5 frames; for one frame use POST /v1/images/generations", "frames")
    if "cache" in fields and "cache_threshold" not in fields:
        config["cache_threshold"] = None  # the server's threshold goes with the server's cache
    size = _check_limit(config, limit)
    upload = read_upload("input_reference", fields.get("input_reference"))
    given = fields.get("seconds")
    seconds = str(given) if given is not None else f"{config['frames'] / config['fps']:g}"
    return ParsedRequest(config, upload, size, seconds)


def _action_video(fields: dict[str, Any], defaults: dict[str, Any], action: ActionRequest) -> ParsedRequest:
    """An action run: its chunk and input fix the frames and the size, its tier is the action's; no step cache
    (the server's is left out; one asked for is refused)."""
    refuse_video_fields(fields)
    for name in ("cache", "cache_threshold"):
        if fields.get(name) is not None and fields[name] != "none":
            message = f"{name} does not go with an action: SeaCache's gate reads the video alone; drop it"
            raise bad_request(message, name)
    shape = {"frames": None, "aspect_ratio": None, "cache": "none", "cache_threshold": None}
    config = _common(fields, defaults | shape) | action.fields()
    image = read_upload("input_reference", fields.get("input_reference"))
    video = read_upload("input_video", fields.get("input_video"))
    if image is not None and video is not None:
        raise bad_request("send input_reference (an image) or input_video (a clip), not both", "input_video")
    if action.mode == "inverse_dynamics" and video is None:
        raise bad_request(
            "action.mode inverse_dynamics infers the actions of a clip: send input_video (an mp4)", "input_video"
        )
    if image is None and video is None:
        raise bad_request(
            f"action.mode {action.mode} starts from a frame: send input_reference (an image), or input_video (a "
            "clip: its first frame)",
            "input_reference",
        )
    return ParsedRequest(config, image, None, None, video_upload=video, action=action)


def parse_image(
    fields: dict[str, Any], defaults: dict[str, Any], limit: RequestLimit | None
) -> tuple[ParsedRequest, int, str]:
    """(the request, how many images, the file suffix)."""
    _known(fields, IMAGE_FIELDS)
    count = _openai_number("n", fields["n"], int) if "n" in fields else 1
    if not 1 <= count <= MAX_IMAGES:
        raise bad_request(f"n must be 1 to {MAX_IMAGES}, got {count}", "n")
    if _text("response_format", fields.get("response_format")) not in ("b64_json", None):
        raise bad_request(
            "response_format must be b64_json (this server returns the image in the response)", "response_format"
        )
    formats = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", None: ".png"}
    output_format = _text("output_format", fields.get("output_format"))
    if output_format not in formats:
        raise bad_request(f"output_format must be png or jpeg, got {shown(output_format)}", "output_format")
    for name in IGNORED_IMAGE_FIELDS & set(fields):
        _scalar(name, fields[name])
    config = _common(fields, defaults) | {"frames": 1, "cache": "none", "cache_threshold": None}
    size = _check_limit(config, limit)
    return ParsedRequest(config, None, size, "0"), count, formats[output_format]


def _known(fields: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise bad_request(f"unknown parameter {unknown[0]!r}; this endpoint takes {', '.join(sorted(allowed))}")


def _text(name: str, value: Any) -> str | None:
    """An OpenAI text field (`size`, `output_format`, `model`...): a string or null, else a 400 naming it."""
    if value is not None and not isinstance(value, str):
        raise bad_request(f"{name} must be a string, got {shown(value)}", name)
    return value


def _scalar(name: str, value: Any) -> None:
    """A field taken and not used: text, a number, true/false or null; a list or object is a 400 naming it."""
    if isinstance(value, (list, dict)):
        raise bad_request(f"{name} must be a string or a number, got {shown(value)}", name)


def _common(fields: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The server's defaults, then each request field the body sets, read and checked by its declaration."""
    if "prompt" not in fields:
        raise bad_request("prompt is required", "prompt")
    _text("model", fields.get("model"))
    config = {name: DECLARED_DEFAULTS[name] for name in HTTP_NAMES if name in DECLARED_DEFAULTS}
    config |= {name: value for name, value in defaults.items() if name in HTTP_NAMES}  # no server-wide action
    for name, http_name in HTTP_NAMES.items():
        if http_name not in READ_APART and fields.get(http_name) is not None:
            config[name] = _read(FIELDS_BY_NAME[name], http_name, fields[http_name])
    if fields.get("size") is not None:  # null: the server's size, as for every other field
        size = _text("size", fields["size"]).lower().replace(" ", "")
        if size not in SIZES:
            raise bad_request(f"size {shown(size)} is not a Cosmos3 frame size; use one of {', '.join(SIZES)}", "size")
        config["resolution"], config["aspect_ratio"] = SIZES[size]
    if fields.get("seed") is None:
        config["seed"] = secrets.randbelow(2**31)  # reported with the job, so it can be asked for again
    return config


def _read(spec, http_name: str, value: Any) -> Any:
    """A field's value as the body sends it (a form: text), checked as every door checks it; a refusal
    is a 400 naming the field as the API does."""
    try:
        if isinstance(value, str) and spec.kind is not str:
            value = spec.from_text(value)
        return spec.check(value)
    except FieldError as error:
        raise bad_request(str(named_at(error, "http").named(http_name)), http_name) from None
    except InputError as error:  # text the field cannot take (empty, too long, not UTF-8)
        raise bad_request(str(error), http_name) from None


def _frames_of(seconds: Any, fps: float) -> int:
    """OpenAI's `seconds`, as the nearest frame count the VAE takes (4k + 1) at `fps`."""
    seconds = _openai_number("seconds", seconds, float)
    if not 0 < seconds <= MAX_SECONDS:
        raise bad_request(f"seconds must be more than 0 and at most {MAX_SECONDS:g}", "seconds")
    frames = 4 * max(1, round((seconds * fps - 1) / 4)) + 1
    if frames > MAX_FRAMES:
        raise bad_request(f"{seconds:g} seconds at {fps:g} fps is more than {MAX_FRAMES} frames", "seconds")
    return frames


MAX_OPENAI_NUMBER = 10**6  # far beyond any n or seconds taken; a larger one need not be converted at all


def _openai_number(name: str, value: Any, kind: type) -> int | float:
    """OpenAI's own numbers (`n`, `seconds`), not request fields: a finite `kind`, from text too."""
    word = "a whole number" if kind is int else "a finite number"
    try:
        number = kind(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise bad_request(f"{name} must be {word}, got {shown(value)}", name) from None
    if isinstance(number, bool) or not isinstance(number, int if kind is int else (int, float)):
        raise bad_request(f"{name} must be {word}, got {shown(value)}", name)
    if isinstance(number, float) and not math.isfinite(number) or abs(number) > MAX_OPENAI_NUMBER:
        raise bad_request(f"{name} must be {word} of reason, got {shown(value)}", name)
    return number


def _check_limit(config: dict[str, Any], limit: RequestLimit | None) -> str:
    width, height = RESOLUTION_TIERS[config["resolution"]][config["aspect_ratio"]]
    refusal = None if limit is None else limit.refusal(config["frames"], width, height)
    if refusal is not None:
        raise bad_request(refusal, "size")
    return f"{width}x{height}"
