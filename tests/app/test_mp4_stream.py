"""The mp4 encoded while the video is decoded: the bytes of the whole-video writer, nothing left by a failure
(no file, no ffmpeg), a decode that never waits for the encoder and frames held once."""

from __future__ import annotations

import errno
import time
import tracemalloc
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from small_disk import fill, small_disk

from cosmos3_offload.app.outputs import OutputFailed, StreamedOutput, write_output

SOUND = (np.sin(np.linspace(0, 400, 2 * 8000, dtype=np.float32)).reshape(2, -1) * 0.5, 16000)


def frames(count: int, height: int = 64, width: int = 96) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)


def stream(path: Path, video: np.ndarray, told: tuple[int, ...], sound=None) -> StreamedOutput:
    """`video` streamed into `path` as a decode tells it (`told`: frames final at each word), finished."""
    with StreamedOutput(path, 24.0) as output:
        if sound is not None:
            output.sound(*sound)
        for done in told:
            output.frames_ready(video, done)
        output.finish()
    return output


@pytest.mark.parametrize("sound", [None, SOUND], ids=["silent", "sound"])
def test_streamed_mp4_has_the_bytes_of_the_whole_video_writer(tmp_path, sound):
    """Fails when feeding ffmpeg frame pieces as they are decoded changes a byte of the mp4 that today's writer
    (the whole array at once, after the decode) makes of the same frames, sound included."""
    video = frames(17)
    write_output(video, tmp_path / "whole.mp4", fps=24.0, sound=sound)
    stream(tmp_path / "streamed.mp4", video, (0, 1, 5, 5, 9, 16, 17), sound)
    assert (tmp_path / "streamed.mp4").read_bytes() == (tmp_path / "whole.mp4").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.mp4", "whole.mp4"]


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_failure_mid_decode_leaves_no_file_and_no_ffmpeg(tmp_path, failure):
    """Fails when a decode failing (or Ctrl-C) after some frames went to ffmpeg leaves a file (temporary or
    final) or an ffmpeg process behind, or touches the user's existing video."""
    target = tmp_path / "v.mp4"
    target.write_bytes(b"the user's earlier video")
    video = frames(9)
    with pytest.raises(failure):
        with StreamedOutput(target, 24.0) as output:
            output.frames_ready(video, 0)
            output.frames_ready(video, 5)
            process = output.stream.process
            raise failure
    assert process.poll() is not None  # stopped and reaped
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"] and target.read_bytes() == b"the user's earlier video"


def test_the_decode_never_waits_for_a_slow_encoder_and_holds_the_frames_once(tmp_path, monkeypatch):
    """Fails when telling the writer that frames are final blocks the decode while ffmpeg is busy (a slow
    encoder would slow the decode) or copies the frames (the host would hold the video twice)."""
    slow = tmp_path / "ffmpeg"
    slow.write_text('#!/bin/sh\ncase " $* " in *" rawvideo "*) sleep 1;; esac\nexec "$REAL" "$@"\n')
    slow.chmod(0o755)
    monkeypatch.setenv("REAL", imageio_ffmpeg.get_ffmpeg_exe())
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(slow))
    video = frames(40, 128, 192)  # 2.9 MB: far more than the pipe to ffmpeg holds
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with StreamedOutput(tmp_path / "v.mp4", 24.0) as output:
            for done in range(0, 41, 4):
                output.frames_ready(video, done)
            told = time.perf_counter() - start
            _, peak = tracemalloc.get_traced_memory()
            output.finish()
    finally:
        tracemalloc.stop()
    assert told < 0.5, f"the decode waited {told:.2f} s for the encoder"
    assert peak < video.nbytes / 10, f"{peak} bytes allocated beside a video of {video.nbytes}"
    assert (tmp_path / "v.mp4").stat().st_size > 0


def test_a_full_disk_while_streaming_writes_nothing_and_says_enospc(tmp_path):
    """Fails when ffmpeg running out of room mid-stream is not an OutputFailed with ENOSPC, or leaves a file."""
    with small_disk(tmp_path / "disk", size="2M") as disk:
        fill(disk, leave=16 << 10)
        before = sorted(p.name for p in disk.iterdir())
        with pytest.raises(OutputFailed) as failed:
            stream(disk / "v.mp4", frames(9, 128, 192), (0, 4, 9))
        assert failed.value.errno == errno.ENOSPC
        assert sorted(p.name for p in disk.iterdir()) == before


def test_an_encoder_that_cannot_start_is_an_output_failure(tmp_path, monkeypatch):
    """Fails when a missing ffmpeg escapes as a bare OSError from inside the decode, or leaves a file."""
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-ffmpeg"))
    with pytest.raises(OutputFailed, match="cannot run ffmpeg"):
        stream(tmp_path / "v.mp4", frames(5), (0, 5))
    assert list(tmp_path.iterdir()) == []
