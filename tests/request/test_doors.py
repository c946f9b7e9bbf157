"""Every door takes the request as declared once (request/spec.py): the same fields under their declared
names, the same defaults, and the same refusal, in the same words, of a value out of bounds.

The doors: the CLI's flags, cosmos-framework sample files, the HTTP API's fields and diffusers' call
keywords (`enable(pipe)`). A field a door does not take says why in its declaration.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
from diffusers import Cosmos3OmniPipeline
from PIL import Image
from published_layout import write_published_checkpoint

from cosmos3_offload.app.cli import main
from cosmos3_offload.app.cli.commands import SERVED_DEFAULTS
from cosmos3_offload.app.cli.flags import build_parser
from cosmos3_offload.app.cli.translate import request_from_args, shape_from_args, typed_fields
from cosmos3_offload.app.sample_files import read_samples, sample_fields
from cosmos3_offload.app.samples import run_samples
from cosmos3_offload.errors import InputError
from cosmos3_offload.integration.call import read_call
from cosmos3_offload.model.tiers import RESOLUTION_TIERS
from cosmos3_offload.request.checks import FieldError
from cosmos3_offload.request.field import DOORS, Absent
from cosmos3_offload.request.spec import FIELDS_BY_NAME, REQUEST_FIELDS, request_defaults
from cosmos3_offload.serve.action_request import ACTION_KEY_OF
from cosmos3_offload.serve.api_errors import ApiError
from cosmos3_offload.serve.requests import parse_video

# A value each field takes that is not its default (text as the CLI and forms spell it comes from str()).
GOOD = {
    "prompt": "a fox in the snow",
    "negative_prompt": "blurry",
    "frames": 9,
    "resolution": 480,
    "aspect_ratio": "1,1",
    "steps": 4,
    "guidance": 3.5,
    "shift": 7.0,
    "fps": 12.0,
    "seed": 5,
    "output": Path("o.mp4"),
    "image": Path("a.png"),
    "video": Path("c.mp4"),
    "condition_frames": (0,),
    "sound": True,
    "system_prompt": False,
    "cache": "seacache",
    "cache_threshold": 0.5,
    "action": "policy",
    "domain": "pusht",
    "chunk_size": 8,
    "actions": Path("rows.npy"),
    "view": "wrist_view",
}
# A value of the right type each bounded field refuses: every door must refuse it in the same words.
BAD = {
    "frames": 1026,
    "resolution": 1080,
    "aspect_ratio": "2,1",
    "steps": 0,
    "guidance": 101.0,
    "shift": 0.0,
    "fps": 0.05,
    "seed": -1,
    "cache": "teacache",
    "cache_threshold": 101.0,
    "action": "dance",
    "domain": "unicycle",
    "chunk_size": 1025,
    "view": "top_view",
}
# What a door needs beside the field itself for the value to mean something.
WITH = {
    "cache_threshold": {"cache": "seacache"},
    "condition_frames": {"video": Path("c.mp4")},
    "action": {"domain": "pusht", "image": Path("a.png")},
    "domain": {"action": "policy", "image": Path("a.png")},
    "chunk_size": {"action": "policy", "domain": "pusht", "image": Path("a.png")},
    "actions": {"action": "forward_dynamics", "domain": "pusht", "image": Path("a.png")},
    "view": {"action": "policy", "domain": "pusht", "image": Path("a.png")},
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Cosmos3OmniPipeline:
    folder = write_published_checkpoint(tmp_path_factory.mktemp("hub") / "Cosmos3-Nano")
    return Cosmos3OmniPipeline.from_pretrained(folder, enable_safety_checker=False)


def cli_args(command: str, values: dict) -> list[str]:
    args = [command] + (["--model", "nano"] if command != "generate" else ["--model", "nano", "--prompt", "a"])
    for name, value in values.items():
        flag = FIELDS_BY_NAME[name].flag
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(value, tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def call_arguments(pipe: Cosmos3OmniPipeline, **given) -> dict:
    """Every argument of diffusers' `__call__` by name: its default, or as given."""
    parameters = inspect.signature(Cosmos3OmniPipeline.__call__).parameters
    return {name: p.default for name, p in parameters.items() if name != "self"} | {"prompt": "a"} | given


def test_every_field_is_declared_at_every_door_or_says_why():
    """Fails when a field is added without a name (or a reason) for each door, or without test values."""
    for spec in REQUEST_FIELDS:
        for door in DOORS:
            name = getattr(spec, door)
            assert isinstance(name, str) and name or isinstance(name, Absent) and name.why, (spec.name, door)
        assert spec.name in GOOD, f"add a good value of {spec.name} to GOOD"
        if spec.low is not None or spec.choices:
            assert spec.name in BAD, f"add an out-of-bounds value of {spec.name} to BAD"


@pytest.mark.parametrize("name", list(GOOD))
def test_the_cli_takes_each_field_under_its_flag(name):
    """Fails when a request flag is missing from generate, or reads its text otherwise than declared."""
    values = {name: GOOD[name]} | WITH.get(name, {})
    args = build_parser().parse_args(cli_args("generate", values))
    typed = typed_fields(args)
    assert typed[name] == (list(GOOD[name]) if isinstance(GOOD[name], tuple) else GOOD[name])


@pytest.mark.parametrize("name", [s.name for s in REQUEST_FIELDS if isinstance(s.sample, str)])
def test_sample_files_take_each_field_under_their_name(tmp_path, name):
    """Fails when a field declared for sample files is unknown to them or read into another field."""
    spec = FIELDS_BY_NAME[name]
    value = GOOD[name]
    if name in ("image", "video"):
        fields = sample_fields({"prompt": "a", "vision_path": str(value)}, tmp_path)
        assert fields[name] == tmp_path / value
        return
    sample = {"prompt": "a", spec.sample: as_json(value)} | sample_with(name)
    assert sample_fields(sample, tmp_path)[name] == (tmp_path / value if name == "actions" else value)


@pytest.mark.parametrize("name", [s.name for s in REQUEST_FIELDS if isinstance(s.http, str)])
def test_the_api_takes_each_field_under_its_name(name):
    """Fails when a field declared for the HTTP API is refused as unknown or read into another field."""
    defaults = request_defaults()
    if name == "image":
        parsed = parse_video({"prompt": "a", "input_reference": "data:image/png;base64,iVBORw0KGgo="}, defaults, None)
        assert parsed.upload is not None
        return
    if name in ("resolution", "aspect_ratio"):
        tier, aspect = GOOD["resolution"], GOOD["aspect_ratio"]
        width, height = RESOLUTION_TIERS[tier][aspect]
        config = parse_video({"prompt": "a", "size": f"{width}x{height}"}, defaults, None).config
        assert (config["resolution"], config["aspect_ratio"]) == (tier, aspect)
        return
    fields = {"prompt": "a", FIELDS_BY_NAME[name].http: GOOD[name]}
    fields |= {FIELDS_BY_NAME[k].http: v for k, v in WITH.get(name, {}).items()}
    assert parse_video(fields, defaults, None).config[name] == GOOD[name]
    form = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in fields.items()}
    assert parse_video(form, defaults, None).config[name] == GOOD[name], "a form sends the value as text"


def http_action_request(values: dict) -> dict:
    """The HTTP request of `values`, the action fields in its `action` object (the image: a data: URL)."""
    action = {ACTION_KEY_OF[k]: v for k, v in values.items() if k in ACTION_KEY_OF and k != "resolution"}
    return {"prompt": "a", "action": action, "input_reference": "data:image/png;base64,iVBORw0KGgo="}


@pytest.mark.parametrize(
    "name", [s.name for s in REQUEST_FIELDS if not isinstance(s.http, str) and s.name in ACTION_KEY_OF]
)
def test_the_api_takes_each_action_field_in_its_action_object(name):
    """Fails when a key of the HTTP `action` object is refused or read into another field, sent as JSON or as
    a form's JSON text."""
    request = http_action_request({name: GOOD[name]} | WITH.get(name, {}))
    if name == "actions":  # the rows themselves, inline (written to the job's folder when it is admitted)
        request["action"]["actions"] = [[0.5, -0.5]]
        assert parse_video(request, request_defaults(), None).action.rows == [[0.5, -0.5]]
        return
    assert parse_video(request, request_defaults(), None).config[name] == GOOD[name]
    form = request | {"action": json.dumps(request["action"])}
    assert parse_video(form, request_defaults(), None).config[name] == GOOD[name], "a form sends the object as text"


@pytest.mark.parametrize("name", [s.name for s in REQUEST_FIELDS if isinstance(s.diffusers, str)])
def test_diffusers_calls_take_each_field_under_its_keyword(pipe, name):
    """Fails when a field declared for diffusers' call is not read from its keyword."""
    keyword = FIELDS_BY_NAME[name].diffusers
    if name in ("image", "video", "condition_frames"):
        frame = Image.new("RGB", (64, 64))
        given = {"image": frame} if name == "image" else {"video": [frame] * 9}
        if name == "condition_frames":
            given[keyword] = GOOD[name]
        _, inputs = read_call(pipe, call_arguments(pipe, num_frames=9, height=64, width=64, **given))
        read = {"image": inputs.conditioning.image, "video": inputs.conditioning.video}
        assert inputs.conditioning.indexes == GOOD[name] if name == "condition_frames" else read[name] is given[name]
        return
    call, _ = read_call(pipe, call_arguments(pipe, height=64, width=64, **{keyword: GOOD[name]}))
    assert getattr(call, name) == GOOD[name]


def test_defaults_are_the_same_at_every_door(tmp_path, pipe):
    """Fails when a door fills a field left out with anything but the declared default."""
    declared = request_defaults()
    cli = request_from_args(build_parser().parse_args(["generate", "--model", "nano", "--prompt", "a"]))
    assert {k: getattr(cli, k) for k in declared} == declared | {"output": Path("output.mp4")}
    served = shape_from_args(build_parser().parse_args(["serve", "--model", "nano"]))
    http = parse_video({"prompt": "a"}, {k: getattr(served, k) for k in SERVED_DEFAULTS}, None).config
    seed_is_random = {"seed"}  # declared: a server request without a seed gets a random one, reported with it
    taken = {s.name for s in REQUEST_FIELDS if isinstance(s.http, str)} - seed_is_random - {"image", "prompt"}
    assert {k: http[k] for k in taken} == {k: declared[k] for k in taken}
    (sample,) = read_samples([_write(tmp_path / "s.json", '{"prompt": "a"}')])
    assert sample.fields == {"prompt": "a"}, "a sample's missing field is left to the defaults the CLI passes"
    call, inputs = read_call(pipe, call_arguments(pipe))
    for spec in REQUEST_FIELDS:
        if isinstance(spec.diffusers, str) and spec.name not in ("prompt", "image", "video", "condition_frames"):
            assert getattr(call, spec.name) == declared[spec.name], spec.name
    width, height = RESOLUTION_TIERS[declared["resolution"]][declared["aspect_ratio"]]
    assert (call.width, call.height) == (width, height) and inputs.conditioning is None
    diffusers_indexes = inspect.signature(Cosmos3OmniPipeline.__call__).parameters["condition_frame_indexes_vision"]
    assert tuple(diffusers_indexes.default) == declared["condition_frames"]


def problem(name: str) -> str:
    with pytest.raises(FieldError) as refused:
        FIELDS_BY_NAME[name].check(BAD[name])
    return refused.value.problem


@pytest.mark.parametrize("name", list(BAD))
def test_a_value_out_of_bounds_is_refused_in_the_same_words_at_every_door(tmp_path, capsys, pipe, name):
    """Fails when one door lets a value through that another refuses, or words the refusal differently."""
    spec, bad, words = FIELDS_BY_NAME[name], BAD[name], problem(name)
    with pytest.raises(SystemExit) as exited:
        main(cli_args("generate", {name: bad} | WITH.get(name, {})) + ["--output", str(tmp_path / "o.mp4")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"cosmos3-offload: error: {spec.flag} {words}\n"
    assert list(tmp_path.iterdir()) == []

    sample = {"prompt": "a", spec.sample: bad} | sample_with(name)
    report = run_samples([_write(tmp_path / "s.json", sample)], tmp_path / "out", defaults=request_defaults(),
                         overrides={}, say=lambda line: None, warn=lambda line: None)  # fmt: skip
    modes = "text2image, text2video, image2video, video2video, forward_dynamics, inverse_dynamics, policy, wam"
    expected = f"{spec.sample} {words}" if name != "action" else f"model_mode must be one of {modes}, got {bad!r}"
    assert report.outcomes[0].status == "refused" and report.outcomes[0].message == expected

    if not isinstance(spec.http, str) and name in ACTION_KEY_OF:  # the HTTP door takes it in the `action` object
        key = f"action.{ACTION_KEY_OF[name]}"
        with pytest.raises(ApiError) as refused:
            parse_video(http_action_request({name: bad} | WITH.get(name, {})), request_defaults(), None)
        assert (refused.value.message, refused.value.param) == (f"{key} {words}", key)
    elif spec.http == "size":  # a size names a tier and an aspect ratio at once: only real ones are sizes
        with pytest.raises(ApiError) as refused:
            parse_video({"prompt": "a", "size": "1920x1080"}, request_defaults(), None)
        assert refused.value.param == "size" and "is not a Cosmos3 frame size" in refused.value.message
    else:
        fields = {"prompt": "a", spec.http: bad} | {FIELDS_BY_NAME[k].http: v for k, v in WITH.get(name, {}).items()}
        with pytest.raises(ApiError) as refused:
            parse_video(fields, request_defaults(), None)
        assert (refused.value.message, refused.value.param) == (f"{spec.http} {words}", spec.http)

    if isinstance(spec.diffusers, str):
        with pytest.raises(InputError) as refused:
            read_call(pipe, call_arguments(pipe, height=64, width=64, **{spec.diffusers: bad}))
        assert str(refused.value) == f"{spec.diffusers} {words}"


def as_json(value):
    """A test value as a sample file writes it."""
    return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value


def sample_with(name: str) -> dict:
    """The sample fields `name` needs beside it (WITH), as a sample file writes them."""
    return {FIELDS_BY_NAME[k].sample: as_json(v) for k, v in WITH.get(name, {}).items()}


def _write(path: Path, content) -> Path:
    import json

    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_the_declaration_is_the_request_classes_fields():
    """Fails when GenerationConfig grows a field that no door knows of (it must be declared in RequestSpec)."""
    from cosmos3_offload.app.config import GenerationConfig

    assert [f.name for f in dataclasses.fields(GenerationConfig)] == [s.name for s in REQUEST_FIELDS]
