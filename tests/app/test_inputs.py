"""Conditioning inputs cannot explode: sizes are checked from headers before decoding, a clip is read
only as far as the frames that condition, and a file that cannot be used is one line, exit 2, no output."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cosmos3_offload.app import inputs, runner
from cosmos3_offload.app.cli import main
from cosmos3_offload.app.inputs import read_frames, read_image, read_video
from cosmos3_offload.errors import InputError
from cosmos3_offload.model.geometry import frames_to_encode
from cosmos3_offload.vae.encode import condition_pixels

CLIP_SIZE = (64, 48)  # width, height
LONG_CLIP = 60


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    data = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def write_clip(path: Path, count: int) -> Path:
    """`count` flat grey frames, frame i at level 4 i, so a frame read back tells its index."""
    width, height = CLIP_SIZE
    levels = (4 * np.arange(count, dtype=np.uint8))[:, None, None, None]
    iio.imwrite(path, np.broadcast_to(levels, (count, height, width, 3)), fps=24, macro_block_size=1)
    return path


def index_of(frame: Image.Image) -> int:
    return round(float(np.asarray(frame).mean()) / 4)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "long.mp4", LONG_CLIP)


@pytest.fixture
def frames_pulled(monkeypatch) -> list[int]:
    """How many frames each ffmpeg reader handed to Python (its metadata not counted)."""
    counts: list[int] = []
    real = imageio_ffmpeg.read_frames

    def counting(*args, **kwargs):
        frames = real(*args, **kwargs)
        counts.append(0)
        try:
            yield next(frames)  # the metadata
            for frame in frames:
                counts[-1] += 1
                yield frame
        finally:
            frames.close()  # stops ffmpeg

    monkeypatch.setattr(imageio_ffmpeg, "read_frames", counting)
    return counts


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model fails the test: a refusal must come before anything runs."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded, so the refusal came too late")

    monkeypatch.setattr(runner, "load_components", loaded)


def generate(capsys, *args: str) -> tuple[int, str]:
    """Run `cosmos3-offload generate` in this process: exit status and stderr."""
    try:
        code = main(["generate", "--prompt", "a fox", "--no-progress", "--device", "cpu", *args])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


# --- images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(20000, 20000), (9000, 9000), (100000, 1000)])
def test_image_with_a_huge_header_is_refused_before_decoding(tmp_path, monkeypatch, width, height):
    """Fails when an image whose header claims more than the bound gets decoded, or is refused with a vague message."""

    def decoded(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(width, height))
    with pytest.raises(InputError, match="scale it down first"):
        read_image(path)


def test_image_at_the_bound_is_accepted_and_one_past_it_refused(tmp_path, monkeypatch):
    """Fails when the pixel bound is off by one, or the check reads the size wrong (width for height)."""
    path = tmp_path / "in.png"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(path)
    monkeypatch.setattr(inputs, "MAX_INPUT_PIXELS", 600)
    assert read_image(path).size == (30, 20)
    monkeypatch.setattr(inputs, "MAX_INPUT_PIXELS", 599)
    with pytest.raises(InputError, match="is 30x20; the largest accepted is 599 pixels"):
        read_image(path)


# --- clips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("indexes", [(0,), (0, 1), (0, 2), (2, 0, 2)])
def test_clip_is_read_only_as_far_as_the_conditioning_frames(long_clip, frames_pulled, indexes):
    """Fails when reading a clip pulls frames past those that condition (a long clip would cost its whole length)."""
    conditioning = read_frames(None, long_clip, indexes)
    needed = frames_to_encode(image=False, video=True, condition_frames=indexes)
    assert needed < LONG_CLIP
    assert frames_pulled == [needed]  # one reader, stopped at the last frame used
    assert [index_of(frame) for frame in conditioning.video] == list(range(needed))
    assert conditioning.indexes == tuple(sorted(set(indexes)))


def test_short_clip_is_read_whole_and_its_last_frame_repeated(tmp_path, pipeline, capsys):
    """Fails when a clip shorter than the conditioning frames is refused, or the encode does not repeat its end."""
    clip = write_clip(tmp_path / "short.mp4", 3)
    conditioning = read_frames(None, clip, (0, 1))
    assert [index_of(frame) for frame in conditioning.video] == [0, 1, 2]
    pixels = condition_pixels(
        pipeline, image=None, video=conditioning.video, condition_frames=(0, 1), height=48, width=64, device="cpu"
    )
    assert pixels.shape[2] == frames_to_encode(image=False, video=True, condition_frames=(0, 1)) == 5
    assert torch.equal(pixels[:, :, 3], pixels[:, :, 2]) and torch.equal(pixels[:, :, 4], pixels[:, :, 2])
    out = tmp_path / "v2v.mp4"
    code, err = generate(capsys, "--video", str(clip), "--frames", "5", "--steps", "1", "--output", str(out))
    assert code == 0, err
    assert iio.imread(out).shape == (5, 192, 320, 3)


@pytest.mark.parametrize(
    "bound, said",
    [
        (CLIP_SIZE[0] * CLIP_SIZE[1] - 1, "is 64x48; the largest accepted is 3071 pixels"),  # the header's size
        (100, "is larger than the largest accepted, 100 pixels"),  # ffmpeg's decoder refuses first
    ],
    ids=["header", "decoder"],
)
def test_clip_with_frames_past_the_bound_is_refused(capsys, tmp_path, monkeypatch, no_load, bound, said):
    """Fails when a clip whose frames exceed the pixel bound is decoded, or refused otherwise than one line, exit 2."""
    clip = write_clip(tmp_path / "in.mp4", 5)
    monkeypatch.setattr(inputs, "MAX_INPUT_PIXELS", bound)
    with pytest.raises(InputError, match=said):
        read_video(clip, 5)
    before = sorted(os.listdir(tmp_path))
    code, err = generate(capsys, "--video", str(clip), "--frames", "5", "--output", str(tmp_path / "o.mp4"))
    assert code == 2 and said in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before


def test_clip_at_the_bound_is_accepted(tmp_path, monkeypatch):
    """Fails when the decoder's limit (which counts padding) refuses a clip the bound accepts."""
    clip = write_clip(tmp_path / "in.mp4", 5)
    monkeypatch.setattr(inputs, "MAX_INPUT_PIXELS", CLIP_SIZE[0] * CLIP_SIZE[1])
    assert [frame.size for frame in read_video(clip, 5)] == [CLIP_SIZE] * 5


# --- files that cannot be used -------------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path) -> Path:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "huge.png").write_bytes(png_header_only(20000, 20000))
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    (tmp_path / "truncated.png").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "fifo.mp4")  # reading it would block forever
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--image", "{tmp}/none.png"], "does not exist", id="missing-image"),
        pytest.param(["--video", "{tmp}/none.mp4"], "does not exist", id="missing-video"),
        pytest.param(["--image", "{tmp}/empty.png"], "cannot be read as an image", id="empty-image"),
        pytest.param(["--image", "{tmp}/garbage.png"], "cannot be read as an image", id="garbage-image"),
        pytest.param(["--image", "{tmp}/truncated.png"], "cannot be read as an image", id="truncated-image"),
        pytest.param(["--image", "{tmp}/huge.png"], "scale it down first", id="huge-image"),
        pytest.param(["--image", "{tmp}/folder.png"], "is not a", id="folder-image"),
        pytest.param(["--video", "{tmp}/empty.mp4"], "cannot be read as a video", id="empty-video"),
        pytest.param(["--video", "{tmp}/garbage.mp4"], "cannot be read as a video", id="garbage-video"),
        pytest.param(["--video", "{tmp}/fifo.mp4"], "is not a", id="fifo-video"),
        pytest.param(["--image", "{tmp}/empty.png", "--video", "{tmp}/garbage.mp4"], "not both", id="both"),
        pytest.param(
            ["--image", "{tmp}/empty.png", "--frames", "1", "--output", "{tmp}/o.jpg"],
            "--frames 5 or more",
            id="image-to-image",
        ),
        pytest.param(
            ["--video", "{tmp}/garbage.mp4", "--condition-frames", "9"],
            "latent frame indexes in 0..4",
            id="condition-frame-past-the-end",
        ),
    ],
)
def test_bad_conditioning_files_are_refused(capsys, bad_files, no_load, args, message):
    """Fails when a missing, empty, undecodable, oversized or special file (or impossible conditioning) is not
    one line, exit 2, nothing written."""
    before = sorted(os.listdir(bad_files))
    args = [a.replace("{tmp}", str(bad_files)) for a in args]
    code, err = generate(capsys, "--output", str(bad_files / "o.mp4"), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(bad_files)) == before


def test_reading_refuses_what_is_not_a_regular_file(bad_files):
    """Fails when the library (without the request's checks) opens a folder or a FIFO (which would block)."""
    with pytest.raises(InputError, match="is not a regular file"):
        read_image(bad_files / "folder.png")
    with pytest.raises(InputError, match="is not a regular file"):
        read_video(bad_files / "fifo.mp4", 5)
    with pytest.raises(InputError, match="does not exist"):
        read_image(bad_files / "none.png")


def test_read_frames_is_none_for_text_only():
    """Fails when a text-only request reads a file, or a missing clip is not an InputError."""
    assert read_frames(None, None, (0, 1)) is None
    with pytest.raises(InputError, match="does not exist"):
        read_frames(None, Path("/nonexistent.mp4"), (0,))
