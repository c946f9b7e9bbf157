"""Encode frames into a file: an mp4 (H.264, with an AAC audio track when the request made sound, by
the ffmpeg binary imageio-ffmpeg ships) or one image (PIL), and check that it reads back.

It writes exactly the path it is given; `outputs` decides that path (a temporary file beside the
target) and moves the result into place only if this returns. So every failure raises an OSError:

- ffmpeg's exit status is checked (imageio's writer ignores it, and a full disk left a video without
  its index under the final name). A cause ffmpeg names (a full disk, a quota) becomes the OSError's
  errno (ENOSPC for a full disk), else its last line is the message.
- the file is read back before it is handed over: the mp4's packets are counted without decoding
  them (hundredths of a second), the image is decoded, against the frames and size written. PIL
  can stop short on a full disk without an error (a short write it does not retry): a file that
  does not read back on a disk with no room left is ENOSPC too.

Nothing is written but `path`: the frames go to ffmpeg on its stdin and the sound as a WAV on a
second pipe, so no scratch file can fill another disk (a full /tmp) or be left behind by a kill.

mp4_stream.py feeds the same ffmpeg (`start_ffmpeg`) while the video is still decoding, checks it the same way
(`check_ffmpeg_status`, `check_mp4`) and so writes the same bytes.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import threading
import wave
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import imageio_ffmpeg
import numpy as np
from PIL import Image

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Causes ffmpeg names in its messages (as strerror words), kept as the OSError's errno.
_NAMED_CAUSES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES)
_CRF = 10  # H.264's quality as before, through imageio: its quality 8 of 10 is int((1 - 8 / 10) * 51)


def encode_frames(frames: np.ndarray, path: Path, fps: float, sound: tuple[np.ndarray, int] | None = None) -> None:
    """frames: uint8 [T, H, W, 3]; one frame goes to an image file, more to an mp4 (by `path`'s suffix).

    sound: (float waveform [channels, samples] in [-1, 1], sample rate), muxed into the mp4.
    Raises OSError when the file could not be written whole (see the module's docstring).
    """
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3, frames.shape
    suffixes = IMAGE_SUFFIXES if frames.shape[0] == 1 else VIDEO_SUFFIXES
    if path.suffix.lower() not in suffixes:  # else one frame would be a JPEG named .mp4
        raise ValueError(f"{frames.shape[0]} frame(s) go to a file ending in {', '.join(suffixes)}, not {path.name!r}")
    if frames.shape[0] == 1:
        _write_image(frames[0], path)
        _check_image(path, frames.shape[2], frames.shape[1])
    else:
        _write_mp4(frames, path, fps, sound)
        check_mp4(path, frames.shape[0], sound is not None)


def _write_image(frame: np.ndarray, path: Path) -> None:
    png = path.suffix.lower() == ".png"
    Image.fromarray(frame).save(path, format="PNG" if png else "JPEG", **({} if png else {"quality": 95}))


def _check_image(path: Path, width: int, height: int) -> None:
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file raises here
            size = image.size
    except OSError as error:
        raise _unreadable(path, f"the image written does not read back ({error})") from None
    if size != (width, height):
        raise OSError(None, f"the image written reads back as {size[0]}x{size[1]}, not {width}x{height}")


def _write_mp4(frames: np.ndarray, path: Path, fps: float, sound: tuple[np.ndarray, int] | None) -> None:
    _, height, width, _ = frames.shape
    process, feeder = start_ffmpeg(path, height, width, fps, sound)
    try:
        _, said = process.communicate(memoryview(np.ascontiguousarray(frames)).cast("B"))  # blocks until it exits
    except BaseException:  # Ctrl-C, SIGTERM: the half-written file is removed by `outputs`
        process.kill()
        process.wait()
        raise
    finally:
        if feeder is not None:
            feeder.join()  # ffmpeg has exited: the pipe is broken if it did not read it all
    check_ffmpeg_status(process.returncode, said)


def start_ffmpeg(
    path: Path, height: int, width: int, fps: float, sound: tuple[np.ndarray, int] | None
) -> tuple[subprocess.Popen, threading.Thread | None]:
    """ffmpeg encoding raw rgb24 frames [T, height, width, 3] from its stdin (and `sound`, as a WAV on a second
    pipe fed by the thread returned) into the mp4 `path`: (the process, with its stdin and stderr piped; the
    sound's feeder or None). The caller writes the frames, closes stdin and checks the exit status."""
    audio = None
    if sound is not None:
        audio = io.BytesIO()
        write_wav(*sound, audio)
    video_input = [
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
        "-r", str(Fraction(fps).limit_denominator()), "-i", "pipe:0",
    ]  # fmt: skip
    # yuv420p needs even sizes, which every Cosmos3 tier has; no scaling keeps them exact.
    video_output = ["-map", "0:v:0", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(_CRF)]
    audio_output = ["-map", "1:a:0", "-c:a", "aac", "-b:a", "192k"] if audio is not None else ["-an"]
    # `file:` keeps a name such as "-x.mp4" or "concat:..." from being read as an option or a protocol.
    output = [*video_output, *audio_output, "-f", "mp4", f"file:{path}"]
    command = [_ffmpeg(), "-hide_banner", "-nostats", "-loglevel", "error", "-y", *video_input]
    reader = writer = None
    if audio is not None:
        reader, writer = os.pipe()
        command += ["-f", "wav", "-i", f"pipe:{reader}"]
    try:
        # In a session of its own, as imageio starts it: Ctrl-C reaches only us, and we stop it.
        process = subprocess.Popen(
            [*command, *output],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=() if reader is None else (reader,),
            start_new_session=True,
        )
    except OSError as error:
        if writer is not None:
            os.close(writer)
        raise OSError(error.errno, f"cannot run ffmpeg ({command[0]}): {error.strerror}") from None
    finally:
        if reader is not None:
            os.close(reader)  # ffmpeg holds it now; else a failed ffmpeg would never break our pipe
    feeder = None
    if writer is not None:
        # A writer per pipe: ffmpeg reads its two inputs in its own order, so one writer for both could deadlock.
        feeder = threading.Thread(target=_feed, args=(writer, audio.getbuffer()), daemon=True)
        feeder.start()
    return process, feeder


def check_ffmpeg_status(status: int, said: bytes) -> None:
    """Raise the OSError ffmpeg's exit `status` and what it `said` on stderr stand for, unless it is 0."""
    if status != 0:
        raise _ffmpeg_failure(status, said.decode("utf-8", "replace"))


def _feed(fd: int, data: memoryview) -> None:
    """Write `data` into the pipe `fd` and close it; a reader that stops early explains itself by its exit status."""
    try:
        while data:
            data = data[os.write(fd, data) :]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def _ffmpeg_failure(status: int, said: str) -> OSError:
    for cause in _NAMED_CAUSES:
        if os.strerror(cause) in said:
            return OSError(cause, os.strerror(cause))
    if status < 0:
        return OSError(None, f"ffmpeg was stopped by signal {-status}")
    last = (said.strip().splitlines() or ["(it said nothing)"])[-1]
    return OSError(None, f"ffmpeg failed (exit status {status}): {last}")


def check_mp4(path: Path, frames: int, sound: bool) -> None:
    """Refuse an mp4 that does not read back with `frames` video frames (and an audio track with `sound`):
    ffmpeg reads the index and every packet, copying without decoding."""
    streams = ["-map", "0:v:0", *(["-map", "0:a:0"] if sound else [])]
    command = [_ffmpeg(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error", "-i", f"file:{path}"]
    command += [*streams, "-c", "copy", "-f", "null", "-progress", "pipe:1", "-"]
    try:
        result = subprocess.run(command, capture_output=True, check=False)
    except OSError as error:
        raise OSError(error.errno, f"cannot run ffmpeg ({command[0]}): {error.strerror}") from None
    counts = [line for line in result.stdout.decode("ascii", "replace").splitlines() if line.startswith("frame=")]
    if result.returncode != 0 or not counts:
        said = (result.stderr.decode("utf-8", "replace").strip().splitlines() or [f"status {result.returncode}"])[-1]
        raise _unreadable(path, f"the video written does not read back ({said})")
    found = int(counts[-1].removeprefix("frame=").strip() or -1)
    if found != frames:
        raise OSError(None, f"the video written reads back with {found} frames, not {frames}")


def _unreadable(path: Path, problem: str) -> OSError:
    """A file that does not read back: ENOSPC when its disk is full, which cut it short without an error
    (a short write(), which PIL's encoders do not retry), else `problem`."""
    try:
        full = os.statvfs(path.parent).f_bavail == 0
    except OSError:
        full = False
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if full else OSError(None, problem)


def _ffmpeg() -> str:
    """The ffmpeg imageio-ffmpeg finds (IMAGEIO_FFMPEG_EXE first), looked up at each call."""
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as error:  # none found
        raise OSError(None, str(error)) from None


def write_wav(waveform: np.ndarray, sample_rate: int, path: Path | BinaryIO) -> None:
    """16-bit PCM WAV of a float waveform [channels, samples] in [-1, 1], into a file or a binary stream."""
    assert waveform.ndim == 2, waveform.shape
    pcm = np.round(np.clip(waveform, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(path if not isinstance(path, Path) else str(path), "wb") as out:
        out.setnchannels(waveform.shape[0])
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(np.ascontiguousarray(pcm.T).tobytes())  # interleaved: [samples, channels]
