"""Frames are written whole or not at all."""

from __future__ import annotations

import os

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from cosmos3_offload.app import video_io
from cosmos3_offload.app.outputs import write_output as write_frames


def frames(count):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(count, 64, 96, 3), dtype=np.uint8)


def test_mp4_has_every_frame_at_its_size(tmp_path):
    """An mp4 reads back with the frame count and size written."""
    write_frames(frames(9), tmp_path / "v.mp4", fps=24)
    assert iio.imread(tmp_path / "v.mp4").shape == (9, 64, 96, 3)


def test_file_mode_follows_the_umask(tmp_path):
    """The finished file gets the permissions a plain open() would give, not the temporary file's 0600."""
    old = os.umask(0o022)
    try:
        write_frames(frames(1), tmp_path / "i.jpg", fps=24)
    finally:
        os.umask(old)
    assert (tmp_path / "i.jpg").stat().st_mode & 0o777 == 0o644


def test_png_is_lossless(tmp_path):
    """One frame to .png reads back bit-identical."""
    image = frames(1)
    write_frames(image, tmp_path / "i.png", fps=24)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "i.png")), image[0])


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """When the encoder fails, neither the output nor a temporary file remains."""

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(video_io.imageio, "mimwrite", broken)
    with pytest.raises(OSError, match="disk full"):
        write_frames(frames(5), tmp_path / "v.mp4", fps=24)
    assert list(tmp_path.iterdir()) == []
