"""A field added to the request's declaration, and nowhere else, reaches every door: the proof that a new
request field touches only request/spec.py (plus the code that uses it and its test).

A copy of the package gets one more field in request/spec.py; a fresh interpreter then finds it as a flag
of `generate` and `serve`, a sample-file field, an HTTP field and a `GenerationConfig` keyword, with its
default and its bounds, refused in the same words at each door.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "cosmos3_offload"
ANCHOR = "    def __post_init__(self) -> None:\n        if self.action is None:"
HIDDEN = """    hidden_knob: int = declare(
        7,
        help="a field only this test declares",
        low=0, high=9,
        cli="--hidden-knob", sample="hidden_knob_in_samples", http="hidden_knob",
        diffusers=Absent("diffusers' call has no such keyword"),
    )

"""
CHECKS = """
import sys
from pathlib import Path
import pytest
from cosmos3_offload.app.cli import main
from cosmos3_offload.app.cli.commands import SERVED_DEFAULTS
from cosmos3_offload.app.cli.flags import build_parser
from cosmos3_offload.app.cli.translate import request_from_args
from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.sample_files import sample_fields
from cosmos3_offload.errors import InputError
from cosmos3_offload.request.spec import request_defaults
from cosmos3_offload.serve.api_errors import ApiError
from cosmos3_offload.serve.requests import parse_video

words = "must be a whole number from 0 to 9, got 10"
parse = build_parser().parse_args
assert request_from_args(parse(["generate", "--prompt", "a", "--hidden-knob", "3"])).hidden_knob == 3
assert request_from_args(parse(["generate", "--prompt", "a"])).hidden_knob == 7
assert parse(["serve", "--hidden-knob", "2"]).hidden_knob == 2 and "hidden_knob" in SERVED_DEFAULTS
assert sample_fields({"prompt": "a", "hidden_knob_in_samples": 4}, Path("."))["hidden_knob"] == 4
with pytest.raises(InputError, match="hidden_knob_in_samples " + words):
    sample_fields({"prompt": "a", "hidden_knob_in_samples": 10}, Path("."))
assert parse_video({"prompt": "a", "hidden_knob": "5"}, request_defaults(), None).config["hidden_knob"] == 5
assert parse_video({"prompt": "a"}, request_defaults(), None).config["hidden_knob"] == 7
with pytest.raises(ApiError) as refused:
    parse_video({"prompt": "a", "hidden_knob": 10}, request_defaults(), None)
assert (refused.value.message, refused.value.param) == ("hidden_knob " + words, "hidden_knob")
assert GenerationConfig(prompt="a").hidden_knob == 7
with pytest.raises(InputError, match="hidden knob " + words):
    GenerationConfig(prompt="a", hidden_knob=10)
with pytest.raises(SystemExit) as exited:
    main(["generate", "--prompt", "a", "--hidden-knob", "10"])
assert exited.value.code == 2
print("every door")
"""


def test_a_field_declared_only_in_the_specification_reaches_every_door(tmp_path):
    """Fails when a door keeps its own list of request fields (it would not know the new one)."""
    copy = tmp_path / "cosmos3_offload"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    spec = copy / "request" / "spec.py"
    text = spec.read_text()
    assert text.count(ANCHOR) == 1, "the test's anchor moved: update ANCHOR"
    spec.write_text(text.replace(ANCHOR, HIDDEN + ANCHOR))
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + textwrap.dedent(CHECKS)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and result.stdout.strip() == "every door", result.stderr[-3000:]
