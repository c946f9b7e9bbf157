"""Seeded fuzzing of `generate` and `plan`: whatever the flags hold, main() exits 0 or 2, never a traceback.

Each case is the command's cheap base (the tiny model, 256p, a few frames, one or two steps) with a
few flags overridden by random values, hostile and valid mixed: random text and unicode, lone
surrogates (undecodable argv bytes), NUL, newlines, huge integers, denormals, '-0', 'nan', empty
strings, repeated flags, flags of the other command, stray arguments, a random WORLD_SIZE. Values
that would be valid are kept cheap (small shapes, tiny models, float32). A request that passes
validation runs for real (load, encode, prefill, denoise, write with its fps), except that after
the first REAL_DECODES runs the VAE decode, the one costly phase on a CPU (seconds per clip) and
one no flag reaches but the shape, returns black frames of the right shape.

The run stops issuing cases after FUZZ_SECONDS; at least MIN_CASES must have run.
COSMOS3_FUZZ_SEED picks another seed to explore; a failure names the seed, the case number, the
argv and WORLD_SIZE, which is all it takes to replay it.
"""

from __future__ import annotations

import os
import random
import signal
import time
import traceback
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from cosmos3_offload.app import generation_path
from cosmos3_offload.app.cli import main
from cosmos3_offload.model.geometry import SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION
from cosmos3_offload.request.checks import MAX_PROMPT_CHARS

SEED = int(os.environ.get("COSMOS3_FUZZ_SEED", "20261128"))
FUZZ_SECONDS = 80.0  # no new case after this
MAX_CASES = 2000
MIN_CASES = 100
CASE_SECONDS = 60  # a case that takes longer let something costly through validation: fail, naming it
REAL_DECODES = 2

# Hostile values for any flag: split on spaces, then the ones that hold spaces or are empty.
GENERIC = (
    "-0 0 -1 1 5 nan NaN -nan inf -inf Infinity 1e-320 -1e-320 1e308 1e400 -1e308 0x10 0b1 1_0 1e3 1.5 5.0 "
    '٣ ５ ½ abc \udcff \udc80x \x00 a\x00b \u2028 \x85 -- - -v --prompt --frames 🦊 ÿ ../ / . %s%n ${HOME} \\ " '
    "\u202e \ufeff"
).split(" ") + ["", " ", " 5", "5 ", "\n", "a\nb", "\t", "'; rm -rf /", "é" * 300, "x" * 5000, "9" * 5000, "1" * 4300]
GENERIC += [str(n) for n in (2**63, 2**64 - 1, 2**64, 10**30, -(10**30))]
ALPHABET = (
    "abcxyz ABC019-_.,:;/\\\"'!?#%&*()[]{}<>~`|^@=+"
    + "\x00\x01\x07\t\n\r\x0b\x0c\x1b\x7f\x85\xa0\xad"
    + "éßñøЖ漢字🦊🎬\u0301\u200b\u200d\u2028\u2029\u202e\ufeff\ufffd\U0010ffff"
    + "\udc80\udcff\ud800"
)


def random_text(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.05:
        return "x" * (MAX_PROMPT_CHARS + rng.choice([1, 100, 5000]))
    if roll < 0.1:
        return rng.choice(["", " ", "\t\n", "\u3000"])
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40)))


def random_number(rng: random.Random) -> str:
    return rng.choice(
        [
            repr(rng.uniform(-1e3, 1e3)),
            repr(rng.uniform(0, 1)),
            f"{rng.uniform(1, 10):.4f}e{rng.randint(-330, 330)}",  # denormals to overflow
            str(rng.randint(-(2**70), 2**70)),
            str(rng.randint(-10, 2000)),
            f"{rng.uniform(-10, 300):.3e}",
        ]
    )


def make_inputs(folder: Path) -> Path:
    """Input files in their own folder: a picture, a short clip, garbage, an empty folder, a folder named .mp4."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(folder / "in.png")
    iio.imwrite(folder / "in.mp4", rng.integers(0, 256, (9, 64, 96, 3), dtype=np.uint8), fps=24, macro_block_size=1)
    (folder / "garbage.mp4").write_bytes(b"neither a video nor an image")
    (folder / "empty").mkdir()
    (folder / "taken.mp4").mkdir()
    return folder


def flag_values(rng: random.Random, folder: Path, command: str, frames: int) -> dict:
    """flag -> a function giving a value (or a list of values, for the nargs flags); valid values are kept
    cheap (`generate` gets no shape past 9 frames, 256p and 2 steps, and only float32)."""
    generate = command == "generate"
    paths = [str(folder / n) for n in ("in.png", "in.mp4", "garbage.mp4", "empty", "taken.mp4")]
    paths += ["missing.png", "missing/x.mp4", "x" * 300 + ".png", "\udcff.png", ""]

    def pick(valid: str, cheap_for_plan: str = "", invalid: str = "", *more: str):
        """A choice among space-separated values; `cheap_for_plan` only for `plan`; `more` hold spaces."""
        return lambda: rng.choice(
            valid.split() + ([] if generate else cheap_for_plan.split()) + invalid.split() + [*more]
        )

    return {
        "--frames": pick("1 5 9", "17 189 1025", f"0 2 4 8 10 1026 1029 -5 {10**30}"),
        "--steps": pick("1 2", "35 1000", "0 -1 1001 2.0"),
        "--resolution": pick("256", "480 720 768", "0 255 1080 -256 2560"),
        "--aspect-ratio": pick("1,1 4,3 3,4 16,9 9,16", "", "16:9 2,1 \udcff", "16,9 ", ""),
        "--guidance": lambda: rng.choice(
            ["0", "1", "6", "100", "-0", "1e-320", repr(rng.uniform(0, 100)), "100.01", "-0.01", random_number(rng)]
        ),
        "--shift": lambda: rng.choice(
            ["0.01", "3", "1000", repr(rng.uniform(0.01, 1000)), "0", "0.009", "1e-320", "1000.5", random_number(rng)]
        ),
        "--fps": lambda: rng.choice(
            ["0.1", "24", "240", repr(rng.uniform(0.1, 240)), "0", "0.09", "240.1", random_number(rng)]
        ),
        "--seed": lambda: rng.choice(
            [str(rng.randint(0, 2**64 - 1)), str(2**64 - 1), "0", "-1", str(2**64), random_number(rng)]
        ),
        "--prompt": lambda: random_text(rng),
        "--negative-prompt": lambda: random_text(rng),
        # Valid outputs stay in the working folder; the rest point at a folder, a missing one, /proc.
        "--output": pick(
            "o.mp4 O.MP4 é.mp4 \udcff.mp4 o.jpg o.png o.jpeg",
            "",
            f"o.avi o .mp4 missing/o.mp4 {'x' * 300}.mp4 /proc/o.mp4 o.mp4\x00",
            str(folder / "taken.mp4"),
            "x y.mp4",
            "",
        ),
        "--image": lambda: rng.choice(paths),
        "--video": lambda: rng.choice(paths),
        "--condition-frames": lambda: [
            rng.choice(["0", "1", "2", "-1", str((frames - 1) // 4), str(10**30), "x"])
            for _ in range(rng.randint(1, 3))
        ],
        "--checkpoint": lambda: rng.choice([str(folder / "empty"), str(folder / "in.png"), "missing", "x" * 300, ""]),
        "--model": pick("tiny tiny-deep", "", "giant TINY \udcff edge-", "tiny ", ""),
        "--device": pick(
            "cpu cpu:0 cuda cuda:0", "", "cuda:abc cuda:99999999999999999999 tpu meta cpu:1 cuda:-1 CPU", ""
        ),
        "--dtype": pick("float32 fp32", "bf16 fp16 bfloat16", "int8 FP32 float64 \udcff", ""),
        "--vram-budget": pick(
            "1GiB 8GiB 2048MiB 0.5 4G", "", "1MiB nan inf -1 0 1e400 1e-320 8TiB \udcff 1PiB", "8 gib", ""
        ),
        "--h2d-gbps": lambda: rng.choice(
            ["0.1", "25", "10000", repr(rng.uniform(0.1, 1e4)), "0", "0.09", "1e-320", "10000.5", random_number(rng)]
        ),
        "--offload-stages": lambda: (
            rng.sample(["reasoner", "generator", "vae"], rng.randint(0, 3))
            + ([rng.choice(["bogus", "VAE", "", "\udcff", "vae\n"])] if rng.random() < 0.3 else [])
        ),
        "-v": None,
    }


GENERATE_ONLY = ("--prompt", "--negative-prompt", "--shift", "--fps", "--seed", "--output", "--offload-stages", "-v")


def build_case(rng: random.Random, inputs: Path) -> tuple[list[str], str | None]:
    """(argv, WORLD_SIZE or None) of one random case."""
    command = rng.choice(["generate", "plan"])
    frames = rng.choice([1, 5, 9])
    base = ["--model", "tiny", "--resolution", "256", "--frames", str(frames), "--steps", rng.choice(["1", "2"])]
    if command == "generate":
        argv = ["generate", "--prompt", "a fox", "--no-progress", *base]
    else:
        argv = ["plan", "--vram-budget", "8GiB", *base]
    values = flag_values(rng, inputs, command, frames)
    flags = [f for f in values if command == "generate" or f not in GENERATE_ONLY or rng.random() < 0.05]
    for flag in rng.sample(flags, rng.choice([0, 1, 1, 1, 2, 2, 3])):
        for _ in range(2 if rng.random() < 0.1 else 1):  # a repeated flag: the last one wins
            if values[flag] is None:
                argv.append(flag)
                continue
            roll = rng.random()
            if roll < 0.65:
                value = values[flag]()
            elif roll < 0.9:
                value = rng.choice(GENERIC)
            else:
                value = random_text(rng)
            argv += [flag, *value] if isinstance(value, list) else [flag, value]
    if rng.random() < 0.04:
        argv.append(rng.choice(["--bogus", "stray", "\udcff", "-x", "--frames"]))
    if rng.random() < 0.01:
        argv.append(rng.choice(["-h", "--help"]))
    world = (
        rng.choice(["1", "2", "", "abc", "-1", "0", "\udcff", "99999999999999999999"]) if rng.random() < 0.1 else None
    )
    return argv, world


def entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


class TooSlow(Exception):
    pass


def clear(folder: Path) -> None:
    for name in os.listdir(folder):
        (folder / name).unlink()


def test_fuzzed_flags_exit_0_or_2_and_leave_nothing_on_refusal(tmp_path, monkeypatch, capsys):
    """Fails when some flag combination raises out of main(), exits other than 0 or 2, or leaves a file on refusal."""
    inputs = make_inputs(tmp_path / "inputs")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    rng = random.Random(SEED)

    def too_slow(signum, frame):
        raise TooSlow

    decodes = []

    def decode(pipe, latents, **kwargs):  # the real decode a few times, then black frames of its shape
        decodes.append(latents.shape)
        if len(decodes) <= REAL_DECODES:
            return real_decode(pipe, latents, **kwargs)
        _, _, t, h, w = latents.shape
        shape = ((t - 1) * TEMPORAL_COMPRESSION + 1, h * SPATIAL_COMPRESSION, w * SPATIAL_COMPRESSION, 3)
        return np.zeros(shape, dtype=np.uint8)

    real_decode = generation_path.decode_frames
    monkeypatch.setattr(generation_path, "decode_frames", decode)
    previous = signal.signal(signal.SIGALRM, too_slow)
    start, ran, outcomes = time.monotonic(), 0, {0: 0, 2: 0}
    try:
        while ran < MAX_CASES and time.monotonic() - start < FUZZ_SECONDS:
            argv, world = build_case(rng, inputs)
            if world is None:
                monkeypatch.delenv("WORLD_SIZE", raising=False)
            else:
                monkeypatch.setenv("WORLD_SIZE", world)
            where = f"seed {SEED}, case {ran}: WORLD_SIZE={world!r} argv={argv!r}"[:3000]
            signal.alarm(CASE_SECONDS)
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
            except TooSlow:
                pytest.fail(f"took over {CASE_SECONDS} s: validation let a costly request through; {where}")
            except BaseException:  # noqa: B036 - anything but SystemExit is the failure we look for
                pytest.fail(f"{where}\n{traceback.format_exc()[-4000:]}")
            finally:
                signal.alarm(0)
            printed = capsys.readouterr()
            assert code in (0, 2), f"exit status {code!r}; {where}; stderr {printed.err[-1000:]!r}"
            if code == 2:
                assert entries(out) == [], f"files left after a refusal: {entries(out)!r}; {where}"
                assert len(printed.err.splitlines()) == 1, f"stderr is not one line: {printed.err[-2000:]!r}; {where}"
            clear(out)
            outcomes[code] += 1
            ran += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    with capsys.disabled():
        seconds = time.monotonic() - start
        print(f"\nfuzz seed {SEED}: {ran} cases in {seconds:.0f} s, {outcomes[0]} ran, {outcomes[2]} refused")
    assert ran >= MIN_CASES, f"only {ran} cases ran in {FUZZ_SECONDS} s"
    assert outcomes[0] >= 3 and outcomes[2] >= MIN_CASES // 2, outcomes  # both paths were exercised
    assert len(decodes) > REAL_DECODES, "no generation ran past the real decodes"
