"""Every input of `generate` and `plan` is checked before anything loads: one line on stderr, exit 2, no file.

Each flag is tried with many values of each bad class (non-finite, huge, negative, zero, not a
number, unknown names, missing files), through both commands where the flag exists. Loading the
model and measuring the bus are replaced by tripwires, so a refusal that comes only after either
fails the test instead of passing slowly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cosmos3_offload.app import device_profile, runner
from cosmos3_offload.app.cli import main
from cosmos3_offload.request.checks import MAX_PROMPT_CHARS

SRC = Path(__file__).resolve().parents[2] / "src"

# Cheap shapes first, so that a value wrongly let through costs a second, not minutes; the flag under
# test comes after them and wins (argparse keeps the last occurrence).
GENERATE = ["generate", "--prompt", "a fox", "--no-progress", "--model", "tiny", "--frames", "5", "--steps", "1"]
PLAN = ["plan", "--vram-budget", "8GiB", "--model", "tiny", "--frames", "5", "--steps", "1"]
BASES = {"generate": GENERATE, "plan": PLAN}

NON_FINITE = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "+inf"]
HUGE = ["1e308", "1e400", "9" * 400, str(10**30), str(2**64), str(2**64 + 1)]
NEGATIVE = ["-1", "-0.5", "-1e-320", str(-(10**30)), "-1e308"]
ZERO = ["0", "-0", "0.0", "+0", "0e0"]
NOT_NUMBERS = ["", " ", "abc", "5x", "0x10", "1,5", "\udcff", "five", "--", "1/2"]
FRACTIONS = ["1.5", "5.0", "1e1"]  # not whole numbers, for the integer flags


def cases(flag: str, values: list, phrase: str, commands: tuple[str, ...] = ("generate", "plan"), *extra: str) -> list:
    """One case per command and value (a value may be a list: several arguments); `extra` goes before the flag."""
    return [
        pytest.param(c, [*extra, flag, *(v if isinstance(v, list) else [v])], phrase, id=f"{c}{flag}={str(v)[:24]!r}")
        for v in values
        for c in commands
    ]


GEN = ("generate",)
BAD = [
    *cases("--frames", NON_FINITE + HUGE + NEGATIVE + ZERO + NOT_NUMBERS + FRACTIONS, "frames"),
    *cases("--frames", ["2", "4", "6", "20", "188", "1026", "1029", "4097"], "frame"),
    *cases("--steps", NON_FINITE + HUGE + NEGATIVE + ZERO + NOT_NUMBERS + FRACTIONS + ["1001"], "steps"),
    *cases("--guidance", NON_FINITE + HUGE + NEGATIVE + NOT_NUMBERS + ["100.5", "101"], "guidance"),
    *cases(
        "--shift",
        NON_FINITE + HUGE + NEGATIVE + ZERO + NOT_NUMBERS + ["1e-320", "1e-16", "0.001", "1000.5"],
        "shift",
        GEN,
    ),
    *cases("--fps", NON_FINITE + HUGE + NEGATIVE + ZERO + NOT_NUMBERS + ["1e-320", "0.05", "240.5"], "fps", GEN),
    *cases("--seed", NON_FINITE + HUGE + NEGATIVE + NOT_NUMBERS + FRACTIONS, "seed", GEN),
    *cases(
        "--vram-budget",
        NON_FINITE
        + ["1e400", "1e308", "-1", "-8GiB", "0", "0GiB", "-0", "1e-320", "0.5MiB", "2PiB", "1048577GiB"]
        + ["8XiB", "8KiB", "8 bytes", "GiB", "8GiBs", "8iB", "8 GiB 8", "", " ", "\udcff", "8GiB\x00", "eight"],
        "budget",
    ),
    *cases("--h2d-gbps", NON_FINITE + HUGE + NEGATIVE + ZERO + NOT_NUMBERS + ["1e-320", "0.01", "10001"], "h2d-gbps"),
    *cases("--resolution", NON_FINITE + HUGE + NEGATIVE + ZERO + NOT_NUMBERS + ["255", "1080", "256.0"], "resolution"),
    *cases("--aspect-ratio", ["", " ", "16:9", "2,1", "16,9 ", "9,16,1", "-16,9", "\udcff", "16,9\n"], "aspect"),
    *cases("--dtype", ["", "int8", "FP32", "float64", "bfloat16 ", "\udcff", "torch.float32"], "dtype"),
    *cases(
        "--device",
        ["cuda:abc", "cuda:99999999999999999999", "", " ", "tpu", "meta", "cpu:1", "cpu:99999999999999999999"]
        + ["cuda:-1", "cuda:0:0", "\udcff", " cpu", "CPU", "mps:0"],
        "device",
    ),
    *cases("--model", ["", "giant", "TINY", "tiny ", "\udcff", "tiny\x00", "nano-"], "model"),
    *cases("--offload-stages", ["bogus", "VAE", "", "\udcff", "vae\n", "reasoner,vae"], "offload stage", GEN),
    # Conditioning indexes: past the last latent frame (5 frames have latent frames 0 and 1), negative, huge.
    *cases(
        "--condition-frames",
        ["-1", "2", "5", str(10**30), str(-(10**30)), "9" * 400],
        "condition frames",
        GEN + ("plan",),
        "--video",
        "{tmp}/clip.mp4",
    ),
    *cases(
        "--condition-frames",
        NON_FINITE + FRACTIONS + ["", "abc"],
        "condition-frames",
        GEN + ("plan",),
        "--video",
        "{tmp}/clip.mp4",
    ),
    *cases(
        "--condition-frames", ["0", "1", ["0", "1"]], "--video", GEN + ("plan",)
    ),  # without --video it means nothing
    *cases(
        "--checkpoint",
        ["{tmp}/weights.txt", "{tmp}/missing", "{tmp}/empty", "x" * 300, "\udcff", "{tmp}/clip.mp4"],
        "checkpoint",
    ),
    *cases("--image", ["{tmp}/missing.png", "{tmp}/empty", "x" * 300 + ".png", "", "{tmp}/clip.mp4/in.png"], "image"),
    *cases(
        "--video", ["{tmp}/missing.mp4", "{tmp}/empty", "x" * 300 + ".mp4", "", "{tmp}/weights.txt/in.mp4"], "video"
    ),
    *cases(
        "--output",
        ["{tmp}/missing/o.mp4", "{tmp}/o.avi", "{tmp}/empty", "x" * 300 + ".mp4", "", "{tmp}/o.jpg"],
        "output",
        GEN,
    ),
    # Undecodable bytes arrive as surrogates; empty or blank prompts and prompts past the bound are refused.
    *cases("--prompt", ["a \udcff fox", "\udcff", "", " ", "\n\t", "x" * (MAX_PROMPT_CHARS + 1)], "prompt", GEN),
    *cases("--negative-prompt", ["blurry \udcfe", "x" * (MAX_PROMPT_CHARS + 1)], "negative prompt", GEN),
    # Flags of the wrong command and values that look like flags are argparse's own usage errors.
    *cases("--shift", ["3"], "unrecognized arguments", ("plan",)),
    *cases("--frames", ["--steps"], "--frames", ("generate", "plan")),
]


def listing(folder: Path) -> list[str]:
    """Every entry under `folder`, hidden ones included."""
    return sorted(
        str(Path(root, name).relative_to(folder)) for root, dirs, files in os.walk(folder) for name in dirs + files
    )


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A working folder holding a few input files; loading and measuring are tripwires."""
    (tmp_path / "weights.txt").write_text("not a checkpoint")
    (tmp_path / "clip.mp4").write_bytes(b"never decoded: every case is refused before reading it")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def tripwire(*args, **kwargs):
        raise AssertionError("a refused request reached the load, the kernel probe or the bandwidth measurement")

    monkeypatch.setattr(runner, "load_components", tripwire)
    monkeypatch.setattr(runner, "kernel_rates", tripwire)
    monkeypatch.setattr(device_profile, "kernel_rates", tripwire)
    monkeypatch.setattr(device_profile, "measure_h2d_GBps", tripwire)
    return tmp_path


def refused(capsys, folder: Path, argv: list[str]) -> str:
    """Run main(argv) and assert the refusal contract; returns the one stderr line."""
    before = listing(folder)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, (argv, out, err)
    assert out == ""
    assert err.endswith("\n") and len(err.splitlines()) == 1, err
    assert listing(folder) == before
    return err


@pytest.mark.parametrize("command, args, phrase", BAD)
def test_bad_flag_values_are_refused(capsys, folder, command, args, phrase):
    """Fails when a bad flag value is let through, loads or writes first, or is refused without one line naming it."""
    args = [a.replace("{tmp}", str(folder)) for a in args]
    err = refused(capsys, folder, [*BASES[command], *args])
    assert phrase in err


@pytest.mark.parametrize("value", ["abc", "-1", "0", "1.5", " x ", "\udcff", "2", "99999999999999999999"])
def test_world_size_without_a_launcher_is_refused(capsys, folder, monkeypatch, value):
    """Fails when staging starts under a malformed WORLD_SIZE, or one > 1 that no launcher set up (no
    MASTER_ADDR), instead of a one-line refusal."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", value)
    err = refused(capsys, folder, [*GENERATE, "--offload-stages", "vae"])
    assert "WORLD_SIZE" in err


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
def test_world_size_that_is_not_a_count_is_refused_without_staging(capsys, folder, monkeypatch, value):
    """Fails when a malformed WORLD_SIZE (a launcher set it wrong) is ignored because nothing is staged."""
    monkeypatch.setenv("WORLD_SIZE", value)
    assert "WORLD_SIZE" in refused(capsys, folder, GENERATE)


def test_empty_world_size_counts_as_unset(capsys, tmp_path, monkeypatch):
    """Fails when an empty WORLD_SIZE (`WORLD_SIZE= cmd`) stops counting as unset and blocks a plain staged run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "")
    assert main([*GENERATE, "--offload-stages", "vae"]) == 0
    assert listing(tmp_path) == ["output.mp4"] and "wrote output.mp4" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--offload-stages", "a\nb"], "a\\nb"),
        (["--offload-stages", "a\u2028b\x85c\rd"], "offload stage"),
        (["--aspect-ratio", "16\n9"], "aspect"),
        (["--bogus\nflag"], "unrecognized arguments"),
        (["--prompt", "line one\nline two \udcff"], "UTF-8"),
        (["--output", "a\nb.avi"], "suffixes"),
    ],
)
def test_an_error_is_one_line_whatever_the_value_holds(capsys, folder, args, phrase):
    """Fails when a newline, line separator or undecodable byte in a value splits the error or breaks its print."""
    assert phrase in refused(capsys, folder, [*GENERATE, *args])


def test_a_condition_frame_list_is_quoted_short(capsys, folder):
    """Fails when a huge list of bad --condition-frames is echoed whole instead of in one short line."""
    err = refused(capsys, folder, [*GENERATE, "--video", str(folder / "clip.mp4"), "--condition-frames", *["7"] * 5000])
    assert "condition frames [7, 7" in err and len(err) < 400


def test_an_output_name_that_is_not_utf8_is_written_and_reported_escaped(capsys, tmp_path, monkeypatch):
    """Fails when a legal non-UTF-8 output name crashes the report (after the video is written) or is refused."""
    monkeypatch.chdir(tmp_path)
    assert main([*GENERATE, "--output", "\udcff.mp4"]) == 0
    assert listing(tmp_path) == ["\udcff.mp4"]
    assert "wrote '\\udcff.mp4'" in capsys.readouterr().out  # escaped, and quoted as it is


def run_module(args: list[bytes], cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONIOENCODING=utf-8 makes stdout strict, as under an en_US.UTF-8 locale (C.UTF-8 would escape).
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(SRC)}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "cosmos3_offload.app.cli", *args], cwd=cwd, capture_output=True, env=env, timeout=300
    )


def test_undecodable_argv_bytes_through_a_real_process(tmp_path):
    """Fails when raw non-UTF-8 argv bytes in a real process give a traceback, several lines or a file, not exit 2."""
    args = [
        b"generate",
        b"--prompt",
        b"a \xff\xfe fox",
        b"--negative-prompt",
        b"\xff\n",
        b"--offload-stages",
        b"vae\xff",
    ]
    result = run_module(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == b""
    assert result.stderr.count(b"\n") == 1 and b"not valid UTF-8" in result.stderr, result.stderr
    assert listing(tmp_path) == []
