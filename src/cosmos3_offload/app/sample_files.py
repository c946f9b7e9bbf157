"""Sample files as NVIDIA cosmos-framework's inference script reads them (`-i a.json b.jsonl`).

The field names are cosmos-framework's (docs/inference.md, "Sample Arguments";
cosmos_framework/inference/args.py): a `.json` file holds one sample (or, here, a list of them),
a `.jsonl` file one per line; paths are relative to the file; a sample without a `name` is named
for its file (`t2v`), or its file and index in a list or `.jsonl` file (`batch_0`). The action modes
(`forward_dynamics`, `inverse_dynamics`, `wam` = `policy`) take cosmos-framework's action fields (see
`_action_fields`). A field cosmos-framework documents but this tool does not run (transfer, reasoner,
upsampling, audio conditioning...) refuses its sample with the reason; an unknown field (a typo) is
refused too, never ignored. Nothing here loads a model: a sample is read into the `GenerationConfig`
keywords it sets, and every problem is an InputError naming the field.
"""

from __future__ import annotations

import difflib
import glob
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..model.actions import ACTION_MODES, ACTION_TIERS, ACTION_WIDTHS, MODE_ALIASES, canonical_mode
from ..request.checks import FieldError, shown
from ..request.spec import FIELDS_BY_NAME, door_fields, named_at
from ..units import MIB
from .inputs import read_text_file

# cosmos-framework's IMAGE_EXTENSIONS and VIDEO_EXTENSIONS: the suffix of `vision_path` picks the mode.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4",)
MODEL_MODES = ("text2image", "text2video", "image2video", "video2video")
ACTION_MODEL_MODES = (*ACTION_MODES, *MODE_ALIASES)  # `wam` is cosmos-framework's name of `policy`
# Sample fields read one by one below; every other request field a sample file takes is read as it is,
# under the name the request declares for sample files (request/spec.py).
READ_BELOW = (
    *("prompt", "negative_prompt", "resolution", "vision_path", "condition_frame_indexes_vision"),
    *("model_mode", "action_path"),
)
RENAMED = {alias: name for name, alias in door_fields("sample").items() if alias not in READ_BELOW}
# cosmos-framework's action fields that are no request field: `image_size` is its action tier (its
# inference passes it as the resolution) and `raw_action_dim` the domain's width, a cross-check.
ACTION_CHECKS = ("image_size", "raw_action_dim")
SUPPORTED = {*door_fields("sample").values(), "name", "prompt_path", "condition_video_keep", *ACTION_CHECKS}
ACTION_ONLY = (*(door_fields("sample")[name] for name in ("domain", "chunk_size", "actions", "view")), *ACTION_CHECKS)
# What an action run's rules fix, and why a sample may not set it (the spec allows only the one they fix).
NOT_WITH_ACTION = {
    "num_frames": "action_chunk_size fixes the video at chunk + 1 frames",
    "aspect_ratio": "the vision_path's shape picks the canvas",
    "condition_frame_indexes_vision": "the mode picks the clean frames",
}
_TRANSFER = "transfer (control hints) is not supported"
_REASONER = "reasoner mode is not supported"
_UPSAMPLING = "prompt upsampling is not supported; pass an upsampled prompt as `prompt`"
# Fields cosmos-framework documents that this tool does not run, by reason: refused unless null (or NEUTRAL).
_UNSUPPORTED_BY_REASON = {
    _TRANSFER: (
        *("control_guidance", "control_guidance_interval", "edge", "blur", "depth", "seg", "wsm"),
        *("negative_prompt_file", "num_video_frames_per_chunk", "num_conditional_frames", "max_frames"),
        *("show_control_condition", "show_input", "num_first_chunk_conditional_frames"),
        *("share_vision_temporal_positions", "emphasize_control_in_prompt"),
    ),
    _REASONER: (
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "presence_penalty",
    ),
    _UPSAMPLING: (
        "prompt_upsampling",
        *(f"prompt_upsampler_{k}" for k in ("max_tokens", "temperature", "top_p", "top_k", "seed")),
        *(f"prompt_upsampler_{k}" for k in ("repetition_penalty", "presence_penalty")),
    ),
    "audio conditioning (audio_image2video) is not supported; enable_sound generates sound": ("sound_path",),
    "is not supported by this sampler": ("guidance_interval", "normalize_cfg", "sigma_max"),
    "one output per sample": ("num_outputs",),
    "is not supported": (
        *("duration_template", "resolution_template", "negative_metadata_mode", "inverse_duration_template"),
        *("inverse_resolution_template", "negative_prompt_keep_metadata", "video_save_quality"),
        *("image_save_quality", "model", "defaults_file", "tensors_file", "pickle_file", "output_dir", "extra"),
    ),
}
UNSUPPORTED = {key: reason for reason, keys in _UNSUPPORTED_BY_REASON.items() for key in keys}
NEUTRAL = {"prompt_upsampling": False, "num_outputs": 1, "condition_video_keep": "first"}
UNSUPPORTED_MODES = {
    "image2image": "image editing is not supported",
    "audio_image2video": "audio conditioning is not supported",
    "reasoner": _REASONER,
}
_NAME = re.compile(r"\w[\w.+-]{0,127}")  # one path component: no separator, no leading dot, not too long
MAX_SAMPLE_FILE_BYTES = 16 * MIB  # thousands of samples, each with an upsampled prompt of a few KiB
MAX_PROMPT_FILE_BYTES = MIB  # a prompt is at most 20,000 characters (request/checks.py)
MAX_JSON_DEPTH = 32  # a list of samples, a sample, an upsampled prompt object and its parts: 4 or 5
MAX_NUMBER_DIGITS = 100  # a seed has at most 20; Python refuses to read more than 4300


@dataclass(frozen=True)
class Sample:
    """One sample as read: the request fields it sets (`fields`), or why it is refused (`error`)."""

    source: str  # where it was read, for messages: "a.json", "b.jsonl line 3"
    name: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    reads: tuple[tuple[str, Path], ...] = ()  # (kind, path) of the files read besides the vision_path


def read_samples(paths: list[Path]) -> list[Sample]:
    """Every sample of `paths` in order (quoted glob patterns expanded), named, with duplicate names
    refused; a file that cannot be read is one refused entry, a bad sample refuses only itself."""
    samples: list[Sample] = []
    for path in _expand(paths):
        try:
            samples += _read_file(path)
        except InputError as error:
            samples.append(Sample(str(path), error=str(error), reads=(("sample file", path),)))
    return _refuse_duplicates(samples)


def _expand(paths: list[Path]) -> list[Path]:
    expanded: list[Path] = []
    for path in paths:
        if not path.exists() and glob.has_magic(str(path)):
            expanded += [Path(p) for p in sorted(glob.glob(str(path)))] or [path]
        else:
            expanded.append(path)
    return expanded


def _read_file(path: Path) -> list[Sample]:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise InputError(f"sample file {str(path)!r} is neither .json nor .jsonl")
    text = read_text_file("sample file", path, MAX_SAMPLE_FILE_BYTES)
    if suffix == ".jsonl":
        lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not lines:
            raise InputError(f"sample file {str(path)!r} holds no samples")
        return [_line(f"{path} line {n}", f"{path.stem}_{i}", line, path) for i, (n, line) in enumerate(lines)]
    try:
        data = _parse_json(text)
    except InputError as error:
        raise InputError(f"sample file {str(path)!r} {error}") from None
    if not isinstance(data, list):
        return [_sample(str(path), path.stem, data, path)]
    if not data:
        raise InputError(f"sample file {str(path)!r} holds an empty list")
    return [_sample(f"{path} sample {i}", f"{path.stem}_{i}", item, path) for i, item in enumerate(data)]


def _parse_json(text: str) -> Any:
    """JSON as a sample file holds it, or an InputError whose message completes "sample file 'a.json' ..."."""
    try:
        data = json.loads(text.removeprefix("\ufeff"), parse_int=_bounded_int, object_pairs_hook=_unique_fields)
    except InputError:
        raise
    except json.JSONDecodeError as error:
        raise InputError(f"is not valid JSON: {error}") from None
    except RecursionError:  # the parser's own limit, near 1000 levels
        raise _too_deep() from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise _too_deep()
    return data


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose fields are each given once: a second `prompt` is a mistake, never ignored."""
    fields: dict[str, Any] = {}
    for name, value in pairs:
        if name in fields:
            raise InputError(f"gives the field {shown(name)} twice")
        fields[name] = value
    return fields


def _too_deep() -> InputError:
    return InputError(f"nests lists and objects more than {MAX_JSON_DEPTH} levels deep")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise InputError(f"holds a number of {len(digits.lstrip('-'))} digits; no field takes more than 20")
    return int(digits)


def _depth(data: Any) -> int:
    """How deep lists and objects nest in `data` (a scalar: 0), without recursion."""
    deepest, level = 0, [data]
    while level:
        containers = [item for item in level if isinstance(item, (list, dict))]
        if not containers:
            break
        deepest += 1
        level = [v for c in containers for v in (c.values() if isinstance(c, dict) else c)]
    return deepest


def _line(source: str, default_name: str, line: str, file: Path) -> Sample:
    """One .jsonl line: invalid JSON refuses this sample only."""
    try:
        data = _parse_json(line)
    except InputError as error:
        return Sample(source, error=str(error).removeprefix("is "), reads=(("sample file", file),))
    return _sample(source, default_name, data, file)


def _sample(source: str, default_name: str, data: Any, file: Path) -> Sample:
    reads = (("sample file", file),)
    if not isinstance(data, dict):
        return Sample(source, error=f"a sample is a JSON object, got {type(data).__name__}", reads=reads)
    prompt_file = data.get("prompt_path")
    if isinstance(prompt_file, str):
        reads += (("prompt_path", file.parent / prompt_file),)
    name = data.get("name") if data.get("name") is not None else default_name
    try:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            fix = "set `name`" if "name" not in data else "use letters, digits, '_', '-', '.' and '+'"
            raise InputError(f"name {shown(name)} is not a usable folder name; {fix}")
        fields = sample_fields(data, file.parent)
    except InputError as error:
        return Sample(source, name=name if isinstance(name, str) else None, error=str(error), reads=reads)
    return Sample(source, name=name, fields=fields, reads=reads)


def _refuse_duplicates(samples: list[Sample]) -> list[Sample]:
    """Every sample whose name another sample has too (compared as a case-insensitive disk compares it)."""
    sources: dict[str, list[str]] = {}
    for sample in samples:
        if sample.name is not None:
            sources.setdefault(sample.name.casefold(), []).append(sample.source)
    out = []
    for sample in samples:
        shared = sources.get(sample.name.casefold(), []) if sample.name is not None else []
        if len(shared) > 1 and sample.error is None:
            where = ", ".join(shared)
            sample = replace(
                sample, error=f"name {sample.name!r} is used by {len(shared)} samples ({where}); set `name`"
            )
        out.append(sample)
    return out


def sample_fields(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The GenerationConfig keywords a sample sets (paths relative to `folder`), its model_mode checked against them."""
    for key, value in data.items():
        if key in SUPPORTED:
            continue
        if key in UNSUPPORTED:
            if value is None or (key in NEUTRAL and type(value) is type(NEUTRAL[key]) and value == NEUTRAL[key]):
                continue
            raise InputError(f"field {key!r}: {UNSUPPORTED[key]}")
        close = difflib.get_close_matches(key, sorted(SUPPORTED), n=1)
        raise InputError(f"unknown field {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    values = {k: v for k, v in data.items() if k in SUPPORTED and v is not None}
    fields = {RENAMED[k]: _checked(RENAMED[k], v) for k, v in values.items() if k in RENAMED}
    if "prompt" in values and "prompt_path" in values:
        raise InputError("give either `prompt` or `prompt_path`, not both")
    if "prompt" in values:
        fields["prompt"] = _text("prompt", values["prompt"])
    elif "prompt_path" in values:
        fields["prompt"] = _read_prompt(folder, values["prompt_path"])
    if "negative_prompt" in values:
        fields["negative_prompt"] = _text("negative_prompt", values["negative_prompt"])
    if "resolution" in values:
        fields["resolution"] = _number_as_given(values["resolution"])
    if values.get("condition_video_keep", "first") != "first":
        raise InputError("condition_video_keep: only 'first' is supported (the clip's first frames condition)")
    fields |= _vision(values, folder)
    mode = values.get("model_mode")
    if mode in ACTION_MODEL_MODES:
        return fields | _action_fields(mode, values, fields, folder)
    _check_mode(mode, fields)
    given = [key for key in ACTION_ONLY if key in values]
    if given:
        modes = ", ".join(ACTION_MODEL_MODES)
        raise InputError(f"{given[0]} goes with an action model_mode ({modes}); set model_mode or drop {given[0]}")
    return fields


def _number_as_given(value: Any) -> Any:
    """A number cosmos-framework also takes as text ("480"); anything else as given, for the check to refuse."""
    return int(value) if isinstance(value, str) and value.isdecimal() else value


def _checked(name: str, value: Any) -> Any:
    """A field's value as the request's declaration checks it, refused under its sample-file name."""
    try:
        return FIELDS_BY_NAME[name].check(value)
    except FieldError as error:
        raise named_at(error, "sample") from None


def _text(key: str, value: Any) -> Any:
    """Text as given; a JSON object (an upsampled prompt) as the text diffusers passes: its json.dumps."""
    return json.dumps(value) if isinstance(value, dict) else value


def _read_prompt(folder: Path, value: Any) -> str:
    if not isinstance(value, str):
        raise InputError(f"prompt_path must be a path, got {shown(value)}")
    return read_text_file("prompt_path", folder / value, MAX_PROMPT_FILE_BYTES).strip()  # as cosmos-framework


def _vision(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`vision_path` (relative to the sample file) as --image or --video, by its suffix."""
    indexes = values.get("condition_frame_indexes_vision")
    if indexes is not None and (not isinstance(indexes, list) or not indexes):
        raise InputError(
            f"condition_frame_indexes_vision must be a non-empty list of latent frames, got {shown(indexes)}"
        )
    if values.get("vision_path") is None:
        if indexes is not None:
            raise InputError("condition_frame_indexes_vision needs a vision_path video")
        return {}
    path = _local_file("vision_path", values["vision_path"], folder)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        if indexes is not None and indexes != [0]:
            raise InputError("an image vision_path conditions latent frame 0 only; drop condition_frame_indexes_vision")
        return {"image": path, "video": None}
    if suffix in VIDEO_SUFFIXES:
        return {"video": path, "image": None} | ({} if indexes is None else {"condition_frames": tuple(indexes)})
    accepted = ", ".join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    raise InputError(
        f"vision_path {values['vision_path']!r} is neither an image nor a video by its suffix ({accepted})"
    )


def _local_file(key: str, value: Any, folder: Path) -> Path:
    """A path field (`vision_path`, `action_path`) relative to the sample file's folder; a URL is refused."""
    if not isinstance(value, str) or not value:
        raise InputError(f"{key} must be a file path, got {shown(value)}")
    if "://" in value:
        raise InputError(f"{key} {value!r} is a URL; download it and give the local file")
    return folder / value


def _check_mode(mode: Any, fields: dict[str, Any]) -> None:
    """A model_mode must agree with the sample's own fields; text2image defaults num_frames to 1."""
    if mode is None:
        return
    if isinstance(mode, str) and mode in UNSUPPORTED_MODES:
        raise InputError(f"model_mode {mode!r}: {UNSUPPORTED_MODES[mode]}")
    if mode not in MODEL_MODES:
        raise InputError(f"model_mode must be one of {', '.join(MODEL_MODES + ACTION_MODEL_MODES)}, got {shown(mode)}")
    wants = {"image2video": "image", "video2video": "video"}.get(mode)
    has = "image" if fields.get("image") else "video" if fields.get("video") else None
    if has != wants:
        needed = f"a vision_path {wants}" if wants else "no vision_path"
        raise InputError(f"model_mode {mode!r} takes {needed}")
    if mode == "text2image":
        if fields.setdefault("frames", 1) != 1:
            raise InputError("model_mode 'text2image' makes one frame; drop num_frames or use text2video")
    elif fields.get("frames") == 1:
        raise InputError(f"model_mode {mode!r} makes a video; num_frames 1 is text2image")


def _action_fields(mode: str, values: dict[str, Any], fields: dict[str, Any], folder: Path) -> dict[str, Any]:
    """An action sample's request fields: its mode (`wam` is `policy`), its action rows and action tier, each
    checked against the sample's own fields and refused in the file's words (the request checks them again)."""
    action = canonical_mode(mode)
    for key, why in NOT_WITH_ACTION.items():
        if key in values:
            raise InputError(f"{key} does not go with model_mode {mode!r}: {why}; drop {key}")
    domain, known = fields.get("domain"), ", ".join(ACTION_WIDTHS)
    if domain is None:
        raise InputError(f"model_mode {mode!r} needs domain_name, the embodiment: one of {known}")
    if domain not in ACTION_WIDTHS:
        raise InputError(
            f"domain_name {domain!r} has no fixed action width, so no action mode runs it; use one of {known}"
        )
    width = ACTION_WIDTHS[domain]
    if "raw_action_dim" in values and (type(values["raw_action_dim"]) is not int or values["raw_action_dim"] != width):
        raise InputError(
            f"raw_action_dim {shown(values['raw_action_dim'])} does not match domain_name {domain!r}, whose actions "
            f"have {width} numbers; drop raw_action_dim (the domain fixes it)"
        )
    vision = "image" if fields.get("image") else "video" if fields.get("video") else None
    if action == "inverse_dynamics" and vision != "video":
        raise InputError(f"model_mode {mode!r} infers the actions of a clip: vision_path must be a video (.mp4)")
    if vision is None:
        raise InputError(
            f"model_mode {mode!r} starts from a frame: set vision_path (an image, or a video's first frame)"
        )
    if action == "forward_dynamics" and "action_path" not in values:
        raise InputError(
            f"model_mode {mode!r} rolls the video out of given actions: set action_path (.npy, .json, .csv)"
        )
    if action != "forward_dynamics" and "action_path" in values:
        raise InputError(
            f"action_path drives forward_dynamics; model_mode {mode!r} predicts the actions: drop action_path"
        )
    action_fields: dict[str, Any] = {"action": action} | _action_tier(mode, values)
    if "action_path" in values:
        action_fields["actions"] = _local_file("action_path", values["action_path"], folder)
    return action_fields


def _action_tier(mode: str, values: dict[str, Any]) -> dict[str, Any]:
    """The action tier an action sample sets: `resolution`, or cosmos-framework's `image_size` (its inference
    passes that as the action resolution), one of ACTION_TIERS; both given must agree."""
    tiers = {key: _number_as_given(values[key]) for key in ("resolution", "image_size") if key in values}
    for key, tier in tiers.items():
        if type(tier) is not int or tier not in ACTION_TIERS:
            choices = ", ".join(map(str, ACTION_TIERS))
            raise InputError(f"{key} {shown(tier)} is no action tier; with model_mode {mode!r} use one of {choices}")
    if len(set(tiers.values())) > 1:
        raise InputError(
            f"resolution {tiers['resolution']} and image_size {tiers['image_size']} disagree; give the tier once"
        )
    return {"resolution": next(iter(tiers.values()))} if tiers else {}
