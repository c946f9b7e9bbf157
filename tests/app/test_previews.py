"""Previews: a run keeps an image of its video up to date as it renders, always whole, never changing the output."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from small_disk import fill, small_disk

from cosmos3_offload.app import previews
from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.doors import PlacedPipeline
from cosmos3_offload.app.events import PREVIEW, RunEvents
from cosmos3_offload.app.generate import decode_frames
from cosmos3_offload.app.previews import (
    ExactPreview,
    FastPreview,
    PreviewOptions,
    check_preview_output,
    colour_map,
    write_whole,
)
from cosmos3_offload.app.runner import run
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.vae.preview_map import PreviewMap


@pytest.fixture(scope="module")
def map_cache(tmp_path_factory):
    """One preview-map cache for the module's runs: the tiny VAE's map is fitted once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COSMOS3_OFFLOAD_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def tiny_request(output: Path, frames: int = 9) -> GenerationConfig:
    return GenerationConfig(prompt="a fox", frames=frames, resolution=256, steps=3, output=output)


@pytest.fixture(scope="module")
def plain_video(tmp_path_factory) -> bytes:
    """The tiny request's video without previews."""
    output = tmp_path_factory.mktemp("plain") / "out.mp4"
    run(tiny_request(output), device="cpu", progress=False)
    return output.read_bytes()


def frames_of(path: Path) -> list[np.ndarray]:
    """Every frame of an image file, decoded (raises if the file is not a whole image)."""
    with Image.open(path) as image:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]


class Reader(threading.Thread):
    """Reads and decodes `path` over and over (`pause` seconds apart) until stopped; counts whole reads and keeps
    what failed."""

    def __init__(self, path: Path, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.path, self.pause, self.stop, self.reads, self.failures = path, pause, threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                frames_of(self.path)
                self.reads += 1
            except FileNotFoundError:
                pass  # not written yet
            except Exception as error:
                self.failures.append(repr(error))
            time.sleep(self.pause)


@pytest.mark.parametrize(
    "kind, name, every, shown, frames",
    [("fast", "preview.webp", None, [1, 2, 3], 3), ("exact", "preview.gif", 2, [2, 3], 3)],
)
def test_previews_never_change_the_output_and_are_read_whole_while_the_run_writes_them(
    map_cache, plain_video, tmp_path, kind, name, every, shown, frames
):
    """Fails when a run with previews writes other bytes than one without, when a preview read while the run
    writes it is not a whole image, when a due step (every `every`-th, and the last) gets no preview event, or
    when an animated preview lacks the latent frames (3 of a 9-frame video) or an exact one the video's size."""
    path = tmp_path / name
    seen = []
    reader = Reader(path, pause=0.005)  # a viewer's pace: the run keeps the CPU
    reader.start()
    try:
        options = PreviewOptions(path, kind, every)
        run(tiny_request(tmp_path / "out.mp4"), device="cpu", progress=False, events=RunEvents(seen.append),
            preview=options)  # fmt: skip
    finally:
        reader.stop.set()
        reader.join()
    assert (tmp_path / "out.mp4").read_bytes() == plain_video
    assert reader.failures == [] and reader.reads > 0
    assert [e.index for e in seen if e.kind == PREVIEW] == shown
    drawn = frames_of(path)
    assert len(drawn) == frames
    if kind == "exact":
        assert drawn[0].shape == (192, 320, 3)  # the video's frames
    else:
        assert max(drawn[0].shape[:2]) == previews.FAST_SIDE - previews.FAST_SIDE % 20  # 12 x 20 latent pixels
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "out.mp4"])  # no temporary file left


def test_a_preview_file_is_always_a_whole_image(tmp_path):
    """Fails when a reader can catch the preview half written (a viewer or the server would show a broken
    image): many animated previews written while another thread reads and decodes the file."""
    rng = np.random.default_rng(0)
    contents = [rng.integers(0, 256, (16, 144, 256, 3), dtype=np.uint8) for _ in range(2)]
    path = tmp_path / "preview.webp"
    write_whole(contents[0], path)
    reader = Reader(path)
    reader.start()
    try:
        for index in range(30):
            write_whole(contents[index % 2], path)
    finally:
        reader.stop.set()
        reader.join()
    assert reader.failures == [] and reader.reads > 0


def test_the_exact_preview_is_the_vaes_decode_of_the_middle_frame(pipeline, tmp_path):
    """Fails when an exact preview is not the VAE's own decode of a latent frame decoded alone (in the plan's
    tiles), or a .png preview does not show the middle of the video."""
    latents = torch.randn(1, 48, 5, 6, 8, generator=torch.Generator().manual_seed(0))
    placed = PlacedPipeline(pipe=pipeline, engine=None, plan=Plan())
    preview = ExactPreview(PreviewOptions(tmp_path / "preview.png", "exact"))
    preview.show(0, 1, latents, placed)
    (drawn,) = frames_of(tmp_path / "preview.png")
    np.testing.assert_array_equal(drawn, decode_frames(pipeline, latents[:, :, 2:3])[0])


def test_an_animated_fast_preview_shows_frames_from_the_first_to_the_last_in_order(tmp_path):
    """Fails when an animated fast preview skips the video's first or last latent frame, shows them out of
    order, or shows more frames than it may."""
    red = torch.zeros(3, 48)
    red[0, 0] = 1.0  # red is latent channel 0
    preview = FastPreview(PreviewOptions(tmp_path / "preview.gif"), PreviewMap(red, torch.zeros(3)))
    latents = torch.linspace(-1.0, 1.0, 40).view(1, 1, 40, 1, 1).expand(1, 48, 40, 4, 6)
    preview.show(0, 1, latents, placed=None)
    reds = [frame[..., 0].mean() for frame in frames_of(tmp_path / "preview.gif")]
    assert len(reds) == previews.FAST_FRAMES
    assert reds[0] < 2 and reds[-1] > 253 and reds == sorted(reds)


def test_the_last_step_always_gets_a_preview(tmp_path):
    """Fails when previews are not every `every`-th step, or the last step's (the video's end) is skipped."""
    fast = FastPreview(PreviewOptions(tmp_path / "p.png"), PreviewMap(torch.zeros(3, 48), torch.zeros(3)))
    exact = ExactPreview(PreviewOptions(tmp_path / "p.png", "exact"))
    assert [i for i in range(7) if exact.due(i, 7)] == [4, 6]  # exact: every 5 by default, and the last
    assert [i for i in range(3) if fast.due(i, 3)] == [0, 1, 2]  # fast: every step by default


def test_the_colour_map_is_cached_per_vae_and_a_bad_cache_file_is_refitted(tmp_path, monkeypatch):
    """Fails when a second run fits the map again instead of reading the cache, when a corrupt cache file fails
    the run instead of being refitted and rewritten, or when changed VAE weight files reuse the old map."""
    monkeypatch.setenv("COSMOS3_OFFLOAD_CACHE", str(tmp_path / "cache"))
    fits = []

    def fit(components):
        fits.append(1)
        return PreviewMap(torch.full((3, 48), float(len(fits))), torch.zeros(3))

    monkeypatch.setattr(previews, "fit_colour_map", fit)
    components = load_components(None, torch.device("cpu"), torch.float32)
    first = colour_map(components, checkpoint=None, model="tiny")
    again = colour_map(components, checkpoint=None, model="tiny")
    assert len(fits) == 1 and torch.equal(again.weight, first.weight)
    (cached,) = (tmp_path / "cache" / "preview-maps").iterdir()
    cached.write_text('{"key": ')
    colour_map(components, checkpoint=None, model="tiny")
    assert len(fits) == 2
    colour_map(components, checkpoint=None, model="tiny")
    assert len(fits) == 2  # the refitted map was saved whole
    weights = tmp_path / "checkpoint" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    colour_map(components, checkpoint=weights.parents[1], model="tiny")
    colour_map(components, checkpoint=weights.parents[1], model="tiny")
    assert len(fits) == 3
    os.utime(weights, ns=(0, 0))  # new weights under the same name
    colour_map(components, checkpoint=weights.parents[1], model="tiny")
    assert len(fits) == 4


@pytest.mark.parametrize(
    "options, says",
    [
        (lambda d: PreviewOptions(d / "p.png", "slow"), "unknown preview kind 'slow'"),
        (lambda d: PreviewOptions(d / "p.png", "fast", 0), "1 or more"),
        (lambda d: PreviewOptions(d / "p.png", "fast", True), "1 or more"),
        (lambda d: PreviewOptions(d / "p.png", "exact", 2.5), "1 or more"),
        (lambda d: PreviewOptions(d / "p.jpg"), "must end in .png"),
        (lambda d: PreviewOptions(d / "missing" / "p.png"), "does not exist"),
        (lambda d: PreviewOptions(d), "must end in .png"),
        (lambda d: PreviewOptions(d / "folder.png"), "is a folder"),
        (lambda d: PreviewOptions(d / "read-only.png"), "read-only"),
    ],
)
def test_bad_preview_options_are_refused_in_one_line(tmp_path, options, says):
    """Fails when a preview that cannot be written as asked is accepted (the run would fail or write nothing
    after loading), or the refusal is not one line that says what to change."""
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "read-only.png").write_bytes(b"")
    (tmp_path / "read-only.png").chmod(0o444)
    with pytest.raises(InputError, match=says) as refused:
        options(tmp_path)
    assert "\n" not in str(refused.value)


def test_a_preview_is_refused_where_it_would_overwrite_the_output_or_need_a_staged_vae(tmp_path, monkeypatch):
    """Fails when a preview named as the run's own output (a one-frame run writes a .png), also through a
    symlink, is accepted, or exact previews are accepted under a given plan that stages the VAE (they decode
    while the generator holds the device): both refused before anything loads."""
    monkeypatch.setattr("cosmos3_offload.app.runner.LoadedModel.load", lambda *a, **k: pytest.fail("loaded"))
    output = tmp_path / "still.png"
    (tmp_path / "link.png").symlink_to(output)
    for name in ("still.png", "link.png"):
        with pytest.raises(InputError, match="is the output itself"):
            check_preview_output(PreviewOptions(tmp_path / name), tiny_request(output, frames=1), None)
    with pytest.raises(InputError, match="is the output itself"):
        run(tiny_request(output, frames=1), device="cpu", preview=PreviewOptions(output))
    staged = Plan.from_offload(["vae"])
    with pytest.raises(InputError, match="drop vae from --offload-stages, or use fast previews"):
        run(tiny_request(tmp_path / "out.mp4"), device="cpu", plan=staged, preview=PreviewOptions(
            tmp_path / "p.png", "exact"))  # fmt: skip


def test_a_preview_that_cannot_be_written_does_not_stop_the_run(tmp_path, caplog):
    """Fails when a full disk under the preview fails the run (the preview is a view of the run, not its
    output), leaves a temporary file, breaks the last whole preview, or is not said once in the log."""
    with small_disk(tmp_path / "disk", size="1M") as folder:
        path = folder / "preview.png"
        preview = FastPreview(PreviewOptions(path), PreviewMap(torch.zeros(3, 48), torch.zeros(3)))
        noise = torch.randn(1, 48, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        preview.show(0, 3, noise, placed=None)
        before = path.read_bytes()
        preview.colours = PreviewMap(torch.randn(3, 48, generator=torch.Generator().manual_seed(1)), torch.zeros(3))
        fill(folder)
        with caplog.at_level(logging.WARNING, logger="cosmos3_offload.app.previews"):
            preview.show(1, 3, noise, placed=None)
            preview.show(2, 3, noise, placed=None)
        assert path.read_bytes() == before
        assert sorted(p.name for p in folder.iterdir()) == ["filler.bin", "preview.png"]
        assert len([r for r in caplog.records if "cannot write the preview" in r.message]) == 1
