"""Hostile input to `generate` and sample files ends in one line, exit 2, before anything loads: an output that
is an input, a FIFO or a device to read, a strip of an image, JSON nested or numbered past reason, a prompt of
invisible characters. A refused sample leaves no folder and does not stop the others."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from in_process_cli import cli
from PIL import Image, ImageFile

from cosmos3_offload.app import runner, sample_files, samples
from cosmos3_offload.app.config import check_output_spares_checkpoint
from cosmos3_offload.app.inputs import read_image, read_text_file, read_video
from cosmos3_offload.app.sample_files import read_samples
from cosmos3_offload.app.samples import run_samples
from cosmos3_offload.errors import InputError
from cosmos3_offload.request.spec import request_defaults

TINY = ["--steps", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model fails the test: a refusal must come before anything runs."""
    monkeypatch.setattr(runner, "load_components", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.fixture
def bounded_memory():
    """A read that never ends (/dev/zero) fails the test with a MemoryError instead of filling the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + 2 * 1024**3, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def write_clip(path: Path, width: int = 64, height: int = 48) -> Path:
    iio.imwrite(path, np.zeros((5, height, width, 3), np.uint8), fps=24, macro_block_size=1)
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes (links followed), to show nothing was written or replaced."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- inputs are never outputs ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["video", "image named .mp4"])
def test_generate_refuses_an_output_that_is_its_input(capsys, tmp_path, no_load, how):
    """Fails when `--video clip.mp4 --output clip.mp4` (or `--image`) runs and replaces it; every spelling and
    link of an input is tested on InputFiles itself (tests/request/test_hostile_values.py)."""
    clip = write_clip(tmp_path / "clip.mp4")
    flag, source, output = "--video", clip, clip
    if how == "image named .mp4":
        flag, source = "--image", tmp_path / "pic.mp4"
        Image.new("RGB", (64, 48), (9, 9, 9)).save(source, format="PNG")
        output = source
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "generate", "--prompt", "a fox", flag, str(source), "--frames", "5",
                       "--output", str(output), *TINY)  # fmt: skip
    assert code == 2 and "writing it would destroy that input" in one_line(err)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("which", ["vision_path", "prompt_path", "the sample file", "another sample's vision_path"])
def test_a_sample_that_would_write_over_a_file_it_reads_is_refused(capsys, tmp_path, no_load, which):
    """Fails when a sample whose vision_path, prompt_path or own sample file is one of the files the batch
    writes (OUTDIR/<name>/vision.mp4, sample_args.json, sample_outputs.json) runs and replaces it."""
    folder = tmp_path / "out" / "x"
    folder.mkdir(parents=True)
    sample = {"name": "x", "prompt": "a fox", "num_frames": 5}
    files = [tmp_path / "a.json"]
    if which == "vision_path":
        sample["vision_path"] = str(write_clip(folder / "vision.mp4"))
    elif which == "prompt_path":
        (folder / "sample_args.json").write_text("a fox in the snow")
        sample = {"name": "x", "prompt_path": "out/x/sample_args.json", "num_frames": 5}
    elif which == "the sample file":
        files = [folder / "sample_outputs.json"]
    else:
        write_clip(folder / "vision.mp4")
        # y is refused too (a video for one frame), after reading its vision_path: nothing loads.
        other = {"name": "y", "prompt": "a", "vision_path": "out/x/vision.mp4", "num_frames": 1}
        files.append(write_json(tmp_path / "b.json", other))
    for file in files[:1]:
        write_json(file, sample)
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "generate", "-i", *map(str, files), "-o", str(tmp_path / "out"), *TINY)
    assert code == 2 and "(x): refused: output" in err and "writing it would destroy that input" in err
    assert snapshot(tmp_path) == before


def test_an_output_that_is_a_checkpoint_file_is_refused(tmp_path, no_load):
    """Fails when an output linked to a checkpoint's weights (symlink or hard link) passes; a new one passes."""
    checkpoint = tmp_path / "ckpt"
    (checkpoint / "vae").mkdir(parents=True)
    (checkpoint / "vae" / "weights.bin").write_bytes(b"weights")
    (tmp_path / "link.mp4").symlink_to(checkpoint / "vae" / "weights.bin")
    with pytest.raises(InputError, match="is the checkpoint file"):
        check_output_spares_checkpoint(tmp_path / "link.mp4", checkpoint)
    check_output_spares_checkpoint(tmp_path / "new.mp4", checkpoint)
    check_output_spares_checkpoint(tmp_path / "link.mp4", None)
    # Sample files: every sample's outputs are checked against the checkpoint's files.
    (tmp_path / "out" / "x").mkdir(parents=True)
    os.link(checkpoint / "vae" / "weights.bin", tmp_path / "out" / "x" / "vision.jpg")
    refused = []
    report = run_samples(
        [write_json(tmp_path / "a.json", {"name": "x", "prompt": "a", "num_frames": 1})],
        tmp_path / "out",
        defaults=request_defaults(tiny=True),
        overrides={},
        checkpoint=checkpoint,
        warn=refused.append,
    )
    assert report.exit_status == 2 and "is the checkpoint file" in refused[0]
    assert (checkpoint / "vae" / "weights.bin").read_bytes() == b"weights"


# --- every file read is a regular file of bounded size --------------------------------------------


def test_generate_refuses_an_output_linked_to_the_checkpoint(capsys, tmp_path, no_load, published_checkpoint):
    """Fails when `generate` writes through a link into the checkpoint it runs: the CLI path applies the check."""
    config = next(published_checkpoint.rglob("config.json"))
    before = config.read_bytes()
    (tmp_path / "out.mp4").symlink_to(config)
    code, _, err = cli(capsys, "generate", "--checkpoint", str(published_checkpoint), "--prompt", "a fox",
                       "--device", "cpu", "--output", str(tmp_path / "out.mp4"))  # fmt: skip
    assert code == 2 and "is the checkpoint file" in one_line(err)
    assert config.read_bytes() == before


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_sample_file_that_is_no_regular_file_is_refused_unopened(
    capsys, tmp_path, no_load, no_hang, bounded_memory, kind
):
    """Fails when a sample file that is a FIFO (the read blocks forever), a device or a folder is opened."""
    path = tmp_path / "s.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    code, _, err = cli(capsys, "generate", "-i", str(path), "-o", str(tmp_path / "out"), *TINY)
    line = one_line(err)
    assert code == 2 and f"sample file {str(path)!r} is" in line
    said = {"fifo": "a FIFO (named pipe), not a regular file", "device": "a character device, not a regular file"}
    assert said.get(kind, "is a folder") in line  # named for what it is
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "folder"])
def test_a_prompt_path_that_is_no_regular_file_is_refused_unopened(
    capsys, tmp_path, no_load, no_hang, bounded_memory, target
):
    """Fails when prompt_path /dev/zero (reads forever, fills memory) or a FIFO (blocks) is opened."""
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
    elif target == "folder":
        (tmp_path / "folder").mkdir()
    write_json(tmp_path / "a.json", {"prompt_path": target, "num_frames": 1})
    code, _, err = cli(capsys, "generate", "-i", str(tmp_path / "a.json"), "-o", str(tmp_path / "out"), *TINY)
    line = one_line(err)
    assert code == 2 and "prompt_path" in line and ("not a regular file" in line or "is a folder" in line)


def test_text_files_are_bounded_before_they_are_read(tmp_path, monkeypatch):
    """Fails when a prompt file or sample file past its bound is read whole, or one at the bound is refused."""
    bound = sample_files.MAX_PROMPT_FILE_BYTES
    (tmp_path / "p.txt").write_text("a" * bound)
    (tmp_path / "big.txt").write_text("a" * (bound + 1))
    write_json(tmp_path / "ok.json", {"prompt_path": "p.txt"})
    write_json(tmp_path / "big.json", {"prompt_path": "big.txt"})
    ok, big = read_samples([tmp_path / "ok.json", tmp_path / "big.json"])
    assert ok.error is None and len(ok.fields["prompt"]) == bound
    assert "is larger than 1.0 MiB, the most a prompt_path may hold" in big.error
    monkeypatch.setattr(sample_files, "MAX_SAMPLE_FILE_BYTES", 40)
    write_json(tmp_path / "s.json", {"prompt": "a fox", "seed": 1234567890123})
    (result,) = read_samples([tmp_path / "s.json"])
    assert "is larger than" in result.error and "the most a sample file may hold" in result.error
    with pytest.raises(InputError, match="is not UTF-8 text"):
        (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
        read_text_file("prompt_path", tmp_path / "latin1.txt", 100)


# --- no tracebacks --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(100000, 1), (1, 100000), (81, 10)])
def test_a_strip_of_an_image_is_refused_before_decoding(capsys, tmp_path, monkeypatch, no_load, size):
    """Fails when an image too narrow to cover the frame sensibly (a 100000x1 strip asks the resize for tens
    of GB) is decoded or gets past the request, rather than one line, exit 2."""
    path = tmp_path / "strip.png"
    Image.new("RGB", size).save(path)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(InputError, match="crop it to at most 8:1 first"):
        read_image(path)
    code, _, err = cli(capsys, "generate", "--prompt", "a fox", "--image", str(path), "--frames", "5",
                       "--output", str(tmp_path / "o.mp4"), *TINY)  # fmt: skip
    assert code == 2 and f"{size[0]}x{size[1]}, longer than 8:1" in one_line(err)


def test_the_aspect_bound_keeps_panoramas_and_bounds_clips(tmp_path):
    """Fails when an 8:1 image is refused, or a clip whose frames are a strip is read."""
    Image.new("RGB", (80, 10)).save(tmp_path / "pano.png")
    assert read_image(tmp_path / "pano.png").size == (80, 10)
    with pytest.raises(InputError, match="longer than 8:1"):
        read_video(write_clip(tmp_path / "strip.mp4", width=160, height=16), 5)
    assert len(read_video(write_clip(tmp_path / "wide.mp4", width=128, height=16), 5)) == 5


@pytest.mark.parametrize(
    "text, said",
    [
        ("[" * 100_000 + "]" * 100_000, "nests lists and objects more than 32 levels deep"),
        ('{"prompt": "a", "seed": ' + "9" * 5000 + "}", "holds a number of 5000 digits"),
        ('{"prompt": "a", "seed": -' + "9" * 5000 + "}", "holds a number of 5000 digits"),
        ('{"prompt": ' + "[" * 40 + "]" * 40 + "}", "nests lists and objects more than 32 levels deep"),
        ('{"prompt": "a", "num_frames": 5, "prompt": "b"}', "gives the field 'prompt' twice"),
    ],
    ids=["brackets", "digits", "negative-digits", "deep-prompt", "a-field-twice"],
)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_past_reason_is_one_line(capsys, tmp_path, no_load, text, said, suffix):
    """Fails when 100,000 nested brackets (RecursionError) or a 5000-digit seed (ValueError) is a traceback."""
    path = tmp_path / f"s{suffix}"
    path.write_text(text + "\n")
    code, _, err = cli(capsys, "generate", "-i", str(path), "-o", str(tmp_path / "out"), *TINY)
    assert code == 2 and said in one_line(err)


def test_json_within_reason_is_read(tmp_path):
    """Fails when the bounds refuse a nested upsampled prompt, a 20-digit seed, a file that is JSON null, or a
    file an editor saved with a UTF-8 byte-order mark."""
    prompt = {"caption": {"shots": [{"camera": {"motion": ["pan", "tilt"]}}]}}
    write_json(tmp_path / "a.json", {"prompt": prompt, "seed": 2**64 - 1})
    (tmp_path / "null.json").write_text("null")
    (tmp_path / "bom.json").write_text('\ufeff{"prompt": "a fox"}', encoding="utf-8")
    sample, null, bom = read_samples([tmp_path / "a.json", tmp_path / "null.json", tmp_path / "bom.json"])
    assert sample.error is None and sample.fields["seed"] == 2**64 - 1
    assert "a sample is a JSON object, got NoneType" in null.error
    assert bom.error is None and bom.fields["prompt"] == "a fox"


# --- silent wrong results -------------------------------------------------------------------------


def test_a_prompt_of_zero_width_spaces_is_refused_at_every_file_door(capsys, tmp_path, no_load):
    """Fails when a prompt of zero-width spaces (as typed, in a sample, in a prompt file) runs as text."""
    code, _, err = cli(capsys, "generate", "--prompt", "\u200b\u200b", "--output", str(tmp_path / "o.mp4"), *TINY)
    assert code == 2 and "the prompt is empty" in one_line(err)
    (tmp_path / "p.txt").write_text("\u200b\u2060\ufeff\n")
    write_lines = [{"prompt": "\u200d"}, {"prompt_path": "p.txt"}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(s) + "\n" for s in write_lines))
    code, _, err = cli(capsys, "generate", "-i", str(tmp_path / "s.jsonl"), "-o", str(tmp_path / "out"), *TINY)
    assert code == 2 and err.count("the prompt is empty") == 2


def test_a_refused_sound_sample_does_not_stop_the_batch(capsys, tmp_path):
    """Fails when one sample asking for sound the model cannot make aborts every other sample of the batch."""
    batch = [
        {"name": "still", "prompt": "a fox", "num_frames": 1},
        {"name": "loud", "prompt": "a", "enable_sound": True},
    ]
    write_json(tmp_path / "a.json", batch)
    code, out, err = cli(capsys, "generate", "-i", str(tmp_path / "a.json"), "-o", str(tmp_path / "out"), *TINY)
    assert code == 2 and "(loud): refused: --sound needs a checkpoint" in one_line(err)
    assert (tmp_path / "out" / "still" / "vision.jpg").is_file() and not (tmp_path / "out" / "loud").exists()
    assert "samples: 1 written, 0 failed, 1 refused" in out


@pytest.mark.parametrize("where", ["request", "conditioning"])
def test_an_interrupt_while_samples_are_checked_leaves_no_folders(capsys, tmp_path, monkeypatch, no_load, where):
    """Fails when Ctrl-C during the checks of many samples leaves their empty output folders behind."""
    Image.new("RGB", (64, 48)).save(tmp_path / "in.png")
    batch = [{"prompt": f"a fox {i}", "num_frames": 5, "vision_path": "in.png"} for i in range(6)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(s) + "\n" for s in batch))
    calls = []
    target, name = (samples, "GenerationConfig") if where == "request" else (samples, "read_conditioning")
    original = getattr(target, name)

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, interrupted)
    code, _, _ = cli(capsys, "generate", "-i", str(tmp_path / "s.jsonl"), "-o", str(tmp_path / "out"), *TINY)
    assert code == 130 and not (tmp_path / "out").exists()


def test_a_sample_folder_is_made_when_the_sample_is_written(capsys, tmp_path, monkeypatch):
    """Fails when sample folders exist before their samples are written (while the model loads)."""
    seen_at_load = []
    original = runner.load_components

    def loading(*args, **kwargs):
        seen_at_load.append(sorted(p.name for p in (tmp_path / "out").iterdir()))
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "load_components", loading)
    write_json(tmp_path / "a.json", [{"name": "one", "prompt": "a fox", "num_frames": 1}])
    code, _, err = cli(capsys, "generate", "-i", str(tmp_path / "a.json"), "-o", str(tmp_path / "out"), *TINY)
    assert code == 0, err
    assert seen_at_load == [[]] and (tmp_path / "out" / "one" / "vision.jpg").is_file()
