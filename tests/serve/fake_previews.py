"""A stand-in for the server's previewer (serve/job_previews.JobPreviews): each step's preview a solid colour,
written as the real one writes its file (whole, through a temporary file renamed over it), with the hooks the
serve tests need to hold a job before it runs or at a chosen step. The serve tests are about the server, not
the preview's pictures (tests/app/test_previews.py tests those)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from PIL import Image

from cosmos3_offload.serve.job_previews import PREVIEW_FILE, Guarded

JOB_SECONDS = 120


def colour_of(step: int) -> tuple[int, int, int]:
    """The stand-in preview's colour after step `step` (from 1)."""
    return ((step * 50) % 256, 255 - (step * 30) % 256, 128)


class ColourPreview:
    """A previewer (app/doors.Preview) that writes a solid colour per step as the real one writes its file: whole,
    through a temporary file renamed over it. `hold_at`: the step (from 1) whose preview waits for `release`."""

    kind = "fast"

    def __init__(self, path: Path, previews: ColourPreviews) -> None:
        self.path, self.previews = path, previews

    def due(self, index: int, steps: int) -> bool:
        return True

    def show(self, index: int, steps: int, denoised, placed) -> None:
        if self.previews.fail:
            raise RuntimeError("a preview that fails")
        time.sleep(self.previews.seconds)
        if index + 1 == self.previews.hold_at:
            self.previews.held.set()
            assert self.previews.release.wait(JOB_SECONDS)
        partial = self.path.with_name(f".{self.path.name}.partial")
        Image.new("RGB", (64, 36), colour_of(index + 1)).save(partial, format="WEBP", lossless=True)
        os.replace(partial, self.path)


class ColourPreviews:
    """Stands for serve.job_previews.JobPreviews: `for_job` waits for `start` (set by default), so a job can be
    kept from running while a client connects; `fail` makes every preview raise; each preview takes `seconds`
    (a run slow enough to watch)."""

    frames = 0  # latent frames a preview decodes during the denoise: none (it decodes nothing)

    def __init__(self, *, hold_at: int | None = None, fail: bool = False, seconds: float = 0.0) -> None:
        self.hold_at, self.fail, self.seconds = hold_at, fail, seconds
        self.start, self.held, self.release = threading.Event(), threading.Event(), threading.Event()
        self.start.set()

    def for_job(self, folder: Path) -> Guarded:
        assert self.start.wait(JOB_SECONDS)
        return Guarded(ColourPreview(folder / PREVIEW_FILE, self))
