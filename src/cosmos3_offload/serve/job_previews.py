"""Each video job's live preview: the previewer (app/previews.py) the server's `--preview-kind` and
`--preview-every` ask for, writing `preview.webp` in the job's folder, whole each time (a temporary file
renamed over it), which `GET /v1/videos/{id}/preview` serves. It goes with the job's folder.

A preview only shows the run: one that fails is logged and the job goes on without previews (its video is
what was asked for).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..app.doors import PlacedPipeline, Preview
from ..app.previews import PreviewOptions, make_preview, preview_frames
from ..app.runner import LoadedModel

logger = logging.getLogger(__name__)

PREVIEW_FILE = "preview.webp"  # in the job's folder
MEDIA_TYPE = "image/webp"


class JobPreviews:
    """Makes the previewer of a video job, as the server's settings say: `kind` fast or exact, every `every`
    steps (None: the kind's default). `frames`: the latent frames a preview decodes during the denoise, which a
    request's fit must count (0 for fast previews)."""

    def __init__(self, loaded: LoadedModel, *, kind: str, every: int | None) -> None:
        self.loaded, self.kind, self.every = loaded, kind, every
        self.frames = 0

    def check(self, folder: Path) -> None:
        """Make one previewer for a file in `folder` (nothing is written): at the server's start, so settings
        the model cannot follow (exact previews with a staged VAE) are refused before any request, and the fast
        map is fitted before the first job."""
        options = PreviewOptions(path=folder / PREVIEW_FILE, kind=self.kind, every=self.every)
        self._make(options)
        self.frames = preview_frames(options)

    def for_job(self, folder: Path) -> Preview | None:
        """The previewer of the job whose folder is `folder`; None when none can be made now (logged: a full
        disk, the fast map's cache unreadable and its refit failing), and the job runs without."""
        try:
            options = PreviewOptions(path=folder / PREVIEW_FILE, kind=self.kind, every=self.every)
            return Guarded(self._make(options))
        except Exception:
            logger.exception("no preview for the job in %s; it runs without", folder.name)
            return None

    def _make(self, options: PreviewOptions) -> Preview:
        components = self.loaded.components
        assert components is not None, "the server loads its model before it makes previews"
        return make_preview(options, components, checkpoint=self.loaded.checkpoint, model=self.loaded.model)


class Guarded:
    """A previewer whose failure ends the job's previews, not the job: it is logged, the run goes on."""

    def __init__(self, preview: Preview) -> None:
        self.preview, self.kind, self.failed = preview, preview.kind, False

    def due(self, index: int, steps: int) -> bool:
        return not self.failed and self.preview.due(index, steps)

    def show(self, index: int, steps: int, denoised: torch.Tensor, placed: PlacedPipeline) -> None:
        try:
            self.preview.show(index, steps, denoised, placed)
        except Exception:
            logger.exception("the preview of step %d failed; this job goes on without previews", index + 1)
            self.failed = True
