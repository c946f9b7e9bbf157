"""Encode frames into a file: an mp4 (H.264 through imageio-ffmpeg, with an AAC audio track when the
request made sound) or one image (PIL).

It writes exactly the path it is given; `outputs` decides that path (a temporary file beside the
target) and moves the result into place.
"""

from __future__ import annotations

import subprocess
import tempfile
import wave
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def encode_frames(frames: np.ndarray, path: Path, fps: float, sound: tuple[np.ndarray, int] | None = None) -> None:
    """frames: uint8 [T, H, W, 3]; one frame goes to an image file, more to an mp4 (by `path`'s suffix).

    sound: (float waveform [channels, samples] in [-1, 1], sample rate), muxed into the mp4.
    """
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3, frames.shape
    suffixes = IMAGE_SUFFIXES if frames.shape[0] == 1 else VIDEO_SUFFIXES
    if path.suffix.lower() not in suffixes:  # else one frame would be a JPEG named .mp4
        raise ValueError(f"{frames.shape[0]} frame(s) go to a file ending in {', '.join(suffixes)}, not {path.name!r}")
    if frames.shape[0] == 1:
        options = {} if path.suffix.lower() == ".png" else {"quality": 95}
        Image.fromarray(frames[0]).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG", **options)
    elif sound is None:
        _write_mp4(frames, path, fps)
    else:
        with tempfile.TemporaryDirectory(prefix="cosmos3-offload-") as scratch:
            video, audio = Path(scratch) / "video.mp4", Path(scratch) / "sound.wav"
            _write_mp4(frames, video, fps)
            write_wav(*sound, audio)
            mux(video, audio, path)


def _write_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    # yuv420p needs even sizes, which every Cosmos3 tier has; macro_block_size=1 keeps them exact.
    imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", quality=8, macro_block_size=1, format="FFMPEG")


def write_wav(waveform: np.ndarray, sample_rate: int, path: Path) -> None:
    """16-bit PCM WAV of a float waveform [channels, samples] in [-1, 1]."""
    assert waveform.ndim == 2, waveform.shape
    pcm = np.round(np.clip(waveform, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(waveform.shape[0])
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(np.ascontiguousarray(pcm.T).tobytes())  # interleaved: [samples, channels]


def mux(video: Path, audio: Path, path: Path) -> None:
    """Copy the H.264 stream of `video` and encode `audio` as AAC into the mp4 `path`."""
    import imageio_ffmpeg  # the ffmpeg binary imageio writes mp4 with; imported where it is needed

    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-nostdin", "-loglevel", "error",
        "-i", str(video), "-i", str(audio),
        "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-b:a", "192k", "-f", "mp4", str(path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise OSError(f"ffmpeg could not mux the audio track: {said}")
