"""A silent video is encoded while it decodes: the file of the write-after-decode path, the decode taking
frames first where the plan's peak has room, and a cancelled decode leaving no file and no ffmpeg."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cosmos3_offload.app import decode_order
from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.decode_order import frames_first_decode_bytes, frames_first_fits
from cosmos3_offload.app.mp4_stream import Mp4Stream
from cosmos3_offload.app.outputs import StreamedOutput
from cosmos3_offload.app.runner import LoadedModel
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.planning.memory import decode_bytes_and_share, peaks
from cosmos3_offload.planning.plan import GroupPlan, Mode, Plan
from cosmos3_offload.planning.request import Request
from cosmos3_offload.planning.tiles import TileGrid
from cosmos3_offload.vae import decode

CPU = torch.device("cpu")
GRID = TileGrid(rows=2, cols=2, frames=1)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    """The tiny random model on the CPU in float32, decoding in GRID's tiles."""
    model = LoadedModel.open(device="cpu", dtype="float32", plan=Plan(decode_grid=GRID))
    model.load(PhaseTimer(CPU))
    return model


def request(folder) -> GenerationConfig:
    """A cheap 9-frame video into an empty folder of its own."""
    folder.mkdir(exist_ok=True)
    fields = {"prompt": "a fox", "frames": 9, "resolution": 256, "steps": 1, "guidance": 1.0, "seed": 3}
    return GenerationConfig(output=folder / "fox.mp4", **fields)


@pytest.fixture
def streams(monkeypatch) -> list[Mp4Stream]:
    """Every Mp4Stream the run starts ffmpeg in."""
    started: list[Mp4Stream] = []
    start = Mp4Stream._start

    def recorded(self, video):
        started.append(self)
        start(self, video)

    monkeypatch.setattr(Mp4Stream, "_start", recorded)
    return started


@pytest.mark.parametrize("frames_first", [True, False], ids=["frames-first", "tiles-first"])
def test_the_streamed_video_is_the_file_written_after_the_decode(loaded, tmp_path, streams, monkeypatch, frames_first):
    """Fails when a silent video is not encoded while it decodes, in the order decode_order picks, or when that
    changes a byte of the mp4 the write-after-decode path makes of the same request."""
    monkeypatch.setattr(decode_order, "frames_first_fits", lambda *request: frames_first)
    orders = []
    decode_tiles = decode.decode_tiles

    def recorded(*args, frames_first: bool = False, **kw):
        orders.append(frames_first)
        return decode_tiles(*args, frames_first=frames_first, **kw)

    monkeypatch.setattr(decode, "decode_tiles", recorded)
    timer = PhaseTimer(CPU)
    streamed = request(tmp_path / "streamed")
    loaded.write(streamed, timer, progress=False)
    assert len(streams) == 1 and orders == [frames_first]
    assert [p.name for p in timer.phases][-2:] == ["decode", "write"]
    monkeypatch.setattr(LoadedModel, "_streamed_output", lambda self, config: None)
    after = request(tmp_path / "after")
    loaded.write(after, PhaseTimer(CPU), progress=False)
    assert len(streams) == 1 and orders == [frames_first, False]
    assert streamed.output.read_bytes() == after.output.read_bytes()


class Stopped(Exception):
    """What a server's cancellation raises from the decode hook."""


def test_a_decode_cancelled_midway_leaves_no_file_and_stops_ffmpeg(loaded, tmp_path, streams, monkeypatch):
    """Fails when a request cancelled during the decode (frames already with ffmpeg) leaves a file, temporary or
    final, or an ffmpeg process running."""
    monkeypatch.setattr(decode_order, "frames_first_fits", lambda *request: True)
    calls = []

    def stop() -> None:
        calls.append(1)
        if len(calls) == 8:  # past the low-resolution pass and the first latent frame of every tile
            raise Stopped

    config = request(tmp_path / "out")
    with pytest.raises(Stopped):
        loaded.write(config, PhaseTimer(CPU), progress=False, on_decode_tile=stop)
    assert len(streams) == 1 and streams[0].done > 0, "frames reached ffmpeg before the cancel"
    assert streams[0].process.poll() is not None
    assert list(config.output.parent.iterdir()) == []


def test_images_and_sound_are_written_after_the_decode(loaded, tmp_path, streams):
    """Fails when an image goes through the mp4 encoder, or a request with sound is streamed (its track is decoded
    after the video)."""
    image = GenerationConfig(prompt="a fox", frames=1, resolution=256, output=tmp_path / "fox.png")
    assert loaded._streamed_output(image) is None
    assert loaded._streamed_output(dataclasses.replace(request(tmp_path / "s"), sound=True)) is None
    assert isinstance(loaded._streamed_output(request(tmp_path / "v")), StreamedOutput)


NANO = model_spec("nano")
SIZES = model_sizes(NANO.transformer, NANO.vae)
SHAPE = Request.for_video(189, 720, 1280, guidance=True, steps=35)


@pytest.mark.parametrize("grid", [TileGrid(frames=1), TileGrid(frames=4)], ids=str)
def test_untiled_frames_first_costs_what_the_planner_counts(grid):
    """Fails when the frames-first bytes drift from the planner's decode model where the two orders are one."""
    assert frames_first_decode_bytes(SIZES, grid, 720, 1280) == decode_bytes_and_share(SIZES, grid, 720, 1280)[0]


def test_tiled_frames_first_only_within_the_plans_peak():
    """Fails when a tiled decode takes frames first although every tile's caches at once would raise the
    request above the plan's peak (a budget exceeded for the encoder's sake), or refuses it where the denoise
    peak leaves room."""
    tiled = TileGrid(rows=2, cols=2, frames=1)
    more = frames_first_decode_bytes(SIZES, tiled, 720, 1280) - decode_bytes_and_share(SIZES, tiled, 720, 1280)[0]
    assert more > 0
    resident = Plan(decode_grid=tiled)
    assert frames_first_fits(resident, SIZES, SHAPE)
    staged = GroupPlan(mode=Mode.STAGED)
    lean = Plan(reasoner=staged, generator=staged, vae=staged, decode_grid=tiled)
    parts = peaks(lean, SIZES, SHAPE)
    assert frames_first_fits(lean, SIZES, SHAPE) == (parts.decode + more <= parts.peak)
    short = Request.for_video(189, 720, 1280, guidance=False, steps=35, prompt_tokens=1)
    parts = peaks(lean, SIZES, short)
    assert (parts.decode + more > parts.peak) == (not frames_first_fits(lean, SIZES, short))
