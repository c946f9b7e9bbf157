"""An mp4 encoded while its frames are still being decoded: ffmpeg takes each frame as it becomes final.

The decode fills one host array of the whole video (vae/decode.py `decode_to_host`) and says how many of its
first frames are final (`frames_ready`). ffmpeg starts on the first word (the frame size is known then, before
anything is decoded); a thread of ours writes the final frames to its stdin as they come, straight from that
array: the frames are held once, as when the whole video is written after the decode, and no queue of copies
can grow. The decode never waits for the encoder; the writer waits for frames (a condition), and ffmpeg's pipe
makes the writer wait for the encoder. The request's end is then the decode's end plus what the encoder has
left to do (`finish`).

ffmpeg runs with the arguments of `video_io.encode_frames` (the same bytes for the same frames: x264's
output does not depend on how its input arrives) and the file is read back the same way. `abort` stops it
(a failed or cancelled decode): the caller (`outputs.StreamedOutput`) removes the half-written file.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import numpy as np

from .video_io import check_ffmpeg_status, check_mp4, start_ffmpeg


class Mp4Stream:
    """`frames_ready(video, done)` as the decode goes, then `finish()` (or `abort()` on any failure)."""

    def __init__(self, path: Path, fps: float, sound: tuple[np.ndarray, int] | None = None):
        self.path, self.fps, self.sound = path, fps, sound
        self.video: np.ndarray | None = None  # uint8 [T, H, W, 3], the decode's array
        self.done = 0  # its first frames that are final
        self.closing = False  # no more frames will come (every frame is final, or we stop)
        self.ready = threading.Condition()
        self.process: subprocess.Popen | None = None
        self.threads: list[threading.Thread] = []
        self.said = b""  # ffmpeg's stderr

    def frames_ready(self, video: np.ndarray, done: int) -> None:
        """The frames [0, done) of `video` (uint8 [T, H, W, 3], the same array at every call) are final."""
        assert video.dtype == np.uint8 and video.ndim == 4 and video.shape[-1] == 3 and video.flags.c_contiguous
        if self.process is None:
            self._start(video)
        assert video is self.video and done >= self.done, (done, self.done)
        with self.ready:
            self.done = done
            self.ready.notify()

    def _start(self, video: np.ndarray) -> None:
        self.video = video
        self.process, feeder = start_ffmpeg(self.path, video.shape[1], video.shape[2], self.fps, self.sound)
        self.threads = [
            threading.Thread(target=self._write_frames, name="mp4-frames", daemon=True),
            threading.Thread(target=self._read_stderr, name="mp4-stderr", daemon=True),
            *([] if feeder is None else [feeder]),
        ]
        for thread in self.threads[:2]:
            thread.start()

    def _write_frames(self) -> None:
        """The writer thread: each final frame to ffmpeg's stdin, in order, then stdin closed (ffmpeg then ends)."""
        stdin, written = self.process.stdin, 0
        try:
            while True:
                with self.ready:
                    while self.done == written and not self.closing:
                        self.ready.wait()
                    end = self.done
                if end == written:  # closing, nothing left
                    break
                stdin.write(memoryview(self.video[written:end]).cast("B"))  # a view: no copy of the frames
                written = end
        except (BrokenPipeError, ValueError):
            pass  # ffmpeg stopped reading (failed, or was stopped): its exit status says why
        finally:
            try:
                stdin.close()
            except BrokenPipeError:
                pass

    def _read_stderr(self) -> None:
        self.said = self.process.stderr.read()  # else a talkative ffmpeg would block on a full pipe

    def finish(self) -> None:
        """Wait for ffmpeg to encode every frame (all must be final) and exit; raise an OSError unless it
        succeeded and the file reads back with every frame (and the sound)."""
        assert self.video is not None and self.done == self.video.shape[0], "finish before every frame is final"
        self._close()
        try:
            self.process.wait()
        except BaseException:  # Ctrl-C while the encoder finishes
            self.abort()
            raise
        self._join()
        check_ffmpeg_status(self.process.returncode, self.said)
        check_mp4(self.path, self.video.shape[0], self.sound is not None)

    def abort(self) -> None:
        """Stop ffmpeg (if it runs) and our threads; the file it was writing is the caller's to remove."""
        if self.process is not None:
            self.process.kill()
        self._close()
        if self.process is not None:
            self.process.wait()
        self._join()

    def _close(self) -> None:
        with self.ready:
            self.closing = True
            self.ready.notify()

    def _join(self) -> None:
        for thread in self.threads:
            if thread.is_alive():
                thread.join()
