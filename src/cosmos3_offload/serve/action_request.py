"""The `action` object of `POST /v1/videos`: a Cosmos3 action run (see model/actions.py), checked in the API's words.

`{"mode": "forward_dynamics" | "inverse_dynamics" | "policy", "domain": NAME, "chunk_size": N, "view": NAME,
"tier": 256 | 480 | 704 | 720, "actions": [[...], ...]}`: mode and domain are required, the rest take the
declared defaults (chunk 16, ego_view; the tier is the server's action default, 480, or 256 with the embedded
tiny model). In a multipart form `action` is a form field holding that JSON text, and forward dynamics' rows
may come as a file part `actions` (.npy, .json or .csv) instead of `action.actions`. The conditioning frame is
`input_reference`, or `input_video` (an mp4, its first frame; the whole clip for inverse_dynamics, which needs it).

Each key is checked by its field's declaration (request/spec.py) with `param` naming it `action.KEY`; the rows
are written to the job's folder and read by the CLI's reader (app/action_files.py), so they are refused in the
same words. `frames`, `seconds` and `size` do not go with an action: the chunk and the input's shape fix them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..app.action_files import ACTION_SUFFIXES
from ..app.inputs import input_frame_size
from ..app.runner import LoadedModel
from ..app.serve_settings import RequestLimit
from ..loading.components import model_configs
from ..model.actions import (
    ACTION_MODES,
    ACTION_TIERS,
    ACTION_WIDTHS,
    DEFAULT_CHUNK,
    VIEW_POINTS,
    content_size,
    decoded_frames,
)
from ..model.geometry import SPATIAL_COMPRESSION
from ..request.checks import FieldError, shown
from ..request.spec import FIELDS_BY_NAME, RequestSpec
from .api_errors import bad_request
from .uploads import Upload

# The action object's keys -> the request field each sets.
ACTION_KEYS = {
    "mode": "action",
    "domain": "domain",
    "chunk_size": "chunk_size",
    "view": "view",
    "tier": "resolution",
    "actions": "actions",
}
ACTION_KEY_OF = {field: key for key, field in ACTION_KEYS.items()}  # request field -> its key in the object
ROWS_FILE = "input_actions"  # the rows' file in the job's folder ("input*": kept while a failed run is cleared)
NOT_WITH_AN_ACTION = {
    "frames": "the chunk fixes the video at action.chunk_size + 1 frames; set action.chunk_size instead",
    "seconds": "the chunk fixes the video at action.chunk_size + 1 frames; set action.chunk_size instead",
    "size": "the input's shape picks the canvas of action.tier; set action.tier instead",
}


@dataclass(frozen=True)
class ActionRequest:
    """An action run as the API asked for it: the request fields it sets, and forward dynamics' rows as sent
    (`rows`: the JSON value of `action.actions`, or `rows_file`: the `actions` file part)."""

    mode: str
    domain: str
    chunk_size: int | None
    view: str | None
    tier: int
    rows: Any = None
    rows_file: Upload | None = None

    def fields(self) -> dict[str, Any]:
        """GenerationConfig keywords (the rows' path is added once they are saved)."""
        return {
            "action": self.mode,
            "domain": self.domain,
            "chunk_size": self.chunk_size,
            "view": self.view,
            "resolution": self.tier,
        }

    @property
    def rows_name(self) -> str:
        """The rows as the request named them: the file part `actions`, or the key `action.actions`."""
        return "actions" if self.rows_file is not None else "action.actions"

    def save_rows(self, folder: Path) -> Path | None:
        """The rows as a file in the job's `folder`, for the CLI's reader; None without rows. An OSError
        (a full disk) is the caller's."""
        if self.rows_file is not None:
            path = folder / f"{ROWS_FILE}{self.rows_file.suffix}"
            path.write_bytes(self.rows_file.data)
            return path
        if self.rows is None:
            return None
        path = folder / f"{ROWS_FILE}.json"
        path.write_text(json.dumps(self.rows), encoding="utf-8")  # NaN stays NaN: the reader refuses it by place
        return path


def parse_action(value: Any, rows_file: Any, default_tier: int) -> ActionRequest | None:
    """The `action` field (an object, or its JSON text in a form) and the `actions` file part, checked; None
    without an action (then the file part is refused)."""
    if value is None:
        if rows_file is not None:
            message = "the actions file part goes with an action object (action.mode forward_dynamics)"
            raise bad_request(message, "actions")
        return None
    found = _object(value)
    unknown = sorted(set(found) - set(ACTION_KEYS))
    if unknown:
        raise bad_request(
            f"unknown parameter 'action.{unknown[0]}'; the action object takes {', '.join(ACTION_KEYS)}",
            f"action.{unknown[0]}",
        )
    for key in ("mode", "domain"):
        if found.get(key) is None:
            choices = ACTION_MODES if key == "mode" else tuple(ACTION_WIDTHS)
            raise bad_request(f"action.{key} is required: one of {', '.join(choices)}", f"action.{key}")
    checked = {key: _checked(key, found.get(key)) for key in ("mode", "domain", "chunk_size", "view")}
    if checked["domain"] not in ACTION_WIDTHS:
        raise bad_request(
            f"action.domain {checked['domain']} has no fixed action width, so no action mode runs it; use one of "
            f"{', '.join(ACTION_WIDTHS)}",
            "action.domain",
        )
    tier = _tier(found.get("tier"), default_tier)
    rows = found.get("actions")
    file = _rows_file(rows_file)
    if rows is not None and file is not None:
        raise bad_request("send the rows once: action.actions or the actions file part, not both", "action.actions")
    given = rows is not None or file is not None
    if checked["mode"] == "forward_dynamics" and not given:
        raise bad_request(
            "action.mode forward_dynamics rolls the video out of given actions: send action.actions (a list of rows) "
            "or an actions file part",
            "action.actions",
        )
    if checked["mode"] != "forward_dynamics" and given:
        raise bad_request(
            f"action.actions drives forward_dynamics; action.mode {checked['mode']} predicts them: drop the rows",
            "action.actions",
        )
    return ActionRequest(
        checked["mode"], checked["domain"], checked["chunk_size"], checked["view"], tier, rows=rows, rows_file=file
    )


def refuse_video_fields(fields: dict[str, Any]) -> None:
    """`frames`, `seconds` and `size` are fixed by an action's chunk and input: a 400 naming the first given."""
    for name, why in NOT_WITH_AN_ACTION.items():
        if fields.get(name) is not None:
            raise bad_request(f"{name} does not go with an action: {why}", name)


def _object(value: Any) -> dict[str, Any]:
    """The action object, parsed from a form's text."""
    found = value
    if isinstance(value, str):
        try:
            found = json.loads(value)
        except (ValueError, RecursionError):
            found = None
    if not isinstance(found, dict):
        raise bad_request(
            "action must be a JSON object with mode and domain (a form sends its JSON text), got "
            + ("a file" if isinstance(value, Upload) else shown(value)),
            "action",
        )
    return found


def _checked(key: str, value: Any) -> Any:
    """One key's value, checked by its field's declaration (text read as a form's field is)."""
    spec = FIELDS_BY_NAME[ACTION_KEYS[key]]
    try:
        if isinstance(value, str) and spec.kind is not str:
            value = spec.from_text(value)
        return spec.check(value)
    except FieldError as error:
        raise bad_request(str(error.named(f"action.{key}")), f"action.{key}") from None


def _tier(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if type(value) is not int or value not in ACTION_TIERS:
        tiers = ", ".join(map(str, ACTION_TIERS))
        message = f"action.tier must be one of {tiers} (the action canvases), got {shown(value)}"
        raise bad_request(message, "action.tier")
    return value


def _rows_file(value: Any) -> Upload | None:
    if value is None:
        return None
    if not isinstance(value, Upload):
        raise bad_request(
            "actions must be a file part (.npy, .json or .csv); in JSON send the rows as action.actions", "actions"
        )
    if value.suffix not in ACTION_SUFFIXES:
        raise bad_request("the actions file part must be named .npy, .json or .csv, as its rows are", "actions")
    return value


def action_video_size(config: RequestSpec) -> str:
    """The size ("WxH") of an action run's video: its input scaled (down only) into the tier's canvas, in whole
    latents (read from the input file's header)."""
    kind, path = ("image", config.image) if config.image is not None else ("video", config.video)
    height, width = content_size(*input_frame_size(kind, path), config.canvas)
    height, width = (max(side // SPATIAL_COMPRESSION, 1) * SPATIAL_COMPRESSION for side in (height, width))
    return f"{width}x{height}"


def action_seconds(config: RequestSpec) -> str:
    """OpenAI's `seconds` of an action run's video: the frames the VAE decodes, at its fps."""
    return f"{decoded_frames(config.chunk_size) / config.fps:g}"


def served_action_dim(loaded: LoadedModel) -> int | None:
    """Numbers per action row the server's model takes; None when it was opened without action heads."""
    if not loaded.actions:
        return None
    return int(model_configs(loaded.checkpoint, loaded.model)[0]["action_dim"])


def check_served(action: ActionRequest, action_dim: int | None) -> None:
    """An action run this server's model can take: it has action heads wide enough for the domain."""
    if action_dim is None:
        raise bad_request("this server's model has no action heads, so it runs no action mode; drop action", "action")
    width = ACTION_WIDTHS[action.domain]
    if width > action_dim:
        raise bad_request(
            f"action.domain {action.domain} takes {width} numbers per action, more than the {action_dim} this "
            "server's action heads take; choose another domain",
            "action.domain",
        )


def check_action_limit(config: RequestSpec, limit: RequestLimit | None) -> None:
    """An action run within the largest request a `--vram-budget` server planned for (its canvas, chunk + 1 frames)."""
    refusal = None if limit is None else limit.refusal(config.frames, config.width, config.height)
    if refusal is not None:
        param = "action.chunk_size" if config.frames > limit.frames else "action.tier"
        raise bad_request(refusal, param)


def action_parameters(action: ActionRequest, config: RequestSpec) -> dict[str, Any]:
    """The action object as the job reports it: every key resolved, and whether rows were sent."""
    return {
        "mode": config.action,
        "domain": config.domain,
        "chunk_size": config.chunk_size,
        "view": config.view,
        "tier": config.resolution,
        "actions": action.rows is not None or action.rows_file is not None,
    }


def action_choices(action_dim: int | None, tier: int) -> dict[str, Any] | None:
    """What a client (the page) may put in the action object on this server; None without action heads."""
    if action_dim is None:
        return None
    return {
        "modes": list(ACTION_MODES),
        "domains": [domain for domain, width in ACTION_WIDTHS.items() if width <= action_dim],
        "views": list(VIEW_POINTS),
        "tiers": list(ACTION_TIERS),
        "tier": tier,
        "chunk_size": DEFAULT_CHUNK,
    }
