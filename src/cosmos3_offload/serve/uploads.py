"""The files a request sends: a multipart file part, or in JSON a data: URL (the server fetches nothing).

`input_reference` is an image (frame 0), `input_video` a clip (an action run's frames), `actions` forward
dynamics' rows; each is at most MAX_UPLOAD_BYTES, kept in memory until the request is admitted, then saved in
the job's folder under a name starting with `input` (what a failed run's clean-up keeps).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from .api_errors import bad_request

MAX_UPLOAD_BYTES = 32 * 2**20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv")
# What each upload field holds, in the words of its refusals, and the suffix its file gets by default.
UPLOAD_KINDS = {"input_reference": ("image", ".png"), "input_video": ("video", ".mp4")}


@dataclass(frozen=True)
class Upload:
    """A file as it arrived: its bytes and the suffix of its name ("" when it had none)."""

    data: bytes
    suffix: str


def read_upload(name: str, value: Any) -> Upload | None:
    """The upload field `name` (input_reference or input_video): a file part (read already: see requests.py), a
    data: URL, or `{"image_url": "data:..."}` (`video_url` for a clip); a web address is refused."""
    if value is None:
        return None
    kind, default_suffix = UPLOAD_KINDS[name]
    if isinstance(value, Upload):
        data = value.data
        suffix = value.suffix or default_suffix
    else:
        url = value.get(f"{kind}_url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url.startswith("data:"):
            raise bad_request(
                f"{name} must be an uploaded {kind} file or a data: URL (the server fetches nothing)", name
            )
        header, _, payload = url.partition(",")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{name}: the data URL is not valid base64", name) from None
        suffix = _data_url_suffix(header, kind)
    if not data:
        raise bad_request(f"{name} is empty", name)
    if len(data) > MAX_UPLOAD_BYTES:
        raise bad_request(f"{name} is larger than {MAX_UPLOAD_BYTES // 2**20} MiB", name)
    return Upload(data, suffix)


def saved_name(name: str, upload: Upload) -> str:
    """The file name an upload gets in the job's folder: its own suffix where the reader knows it."""
    kind, default_suffix = UPLOAD_KINDS[name]
    known = IMAGE_SUFFIXES if kind == "image" else VIDEO_SUFFIXES
    suffix = upload.suffix if upload.suffix in known else default_suffix
    return f"input{suffix}" if kind == "image" else f"input_video{suffix}"


def _data_url_suffix(header: str, kind: str) -> str:
    """The suffix of a data: URL's media type (`data:image/jpeg;base64`)."""
    if kind == "image":
        return ".jpg" if "jpeg" in header or "jpg" in header else ".webp" if "webp" in header else ".png"
    return ".webm" if "webm" in header else ".mov" if "quicktime" in header else ".mp4"
