"""A run's events: every phase, every step and every decode piece in order, with measured seconds and ETA."""

from __future__ import annotations

import io

import pytest

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.events import PHASE_ENDED, PHASE_STARTED, PIECE, STEP, RunEvent, RunEvents
from cosmos3_offload.app.progress_line import ProgressLine, describe, format_duration
from cosmos3_offload.app.runner import run


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_steps_measure_their_seconds_and_the_eta_follows_the_steps_after_the_first():
    """Fails when a step's seconds are not the time since the last step (or the denoise's start), when the ETA
    counts the first step (which pays compilation) once others are measured, or ignores the last decode's time,
    or when progress goes backwards."""
    clock, seen = Clock(), []
    events = RunEvents(seen.append, clock=clock, decode_seconds=7.0)
    events.phase_started("prefill")
    clock.now += 2
    events.phase_ended("prefill")
    events.phase_started("denoise")
    for seconds in (10.0, 3.0, 5.0):
        clock.now += seconds
        events.step(len([e for e in seen if e.kind == STEP]), 5)
    steps = [e for e in seen if e.kind == STEP]
    assert [(e.index, e.total, e.seconds) for e in steps] == [(1, 5, 10.0), (2, 5, 3.0), (3, 5, 5.0)]
    assert steps[0].eta == pytest.approx(4 * 10.0 + 7.0)  # only the first step measured
    assert steps[2].eta == pytest.approx(2 * 4.0 + 7.0)  # the mean of steps 2 and 3, two left, then the decode
    assert seen[1].kind == PHASE_ENDED and seen[1].seconds == 2.0 and seen[1].elapsed == 2.0
    progress = [e.progress for e in seen]
    assert progress == sorted(progress) and 0.05 < steps[-1].progress < 0.9


def test_decode_pieces_count_down_and_set_the_next_runs_decode_time():
    """Fails when the decode's ETA is not its pieces left at their measured pace, or when a finished decode's time
    is not kept for the next run's first ETA."""
    clock, seen = Clock(), []
    events = RunEvents(seen.append, clock=clock)
    events.phase_started("decode")
    for index in range(4):
        events.piece(index, 4)
        clock.now += 1.5
    events.phase_ended("decode")
    pieces = [e for e in seen if e.kind == PIECE]
    assert [(e.index, e.total) for e in pieces] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert pieces[0].eta is None and pieces[2].eta == pytest.approx(3.0)  # 2 pieces in 3 s, 2 left
    assert events.last_decode_seconds == pytest.approx(6.0)


def test_a_tiny_run_tells_every_phase_step_and_piece_in_order(tmp_path):
    """Fails when a phase of a real run is not announced and ended in order, when a step or a decode piece is
    missed or out of order, or when the run's last event is not the write's end at 100%."""
    seen: list[RunEvent] = []
    config = GenerationConfig(prompt="a fox", frames=9, resolution=256, steps=3, output=tmp_path / "out.mp4")
    run(config, device="cpu", progress=False, events=RunEvents(seen.append))
    phases = [(e.kind, e.phase) for e in seen if e.kind in (PHASE_STARTED, PHASE_ENDED)]
    order = ["load", "prefill", "denoise", "decode", "write"]
    assert phases == [(kind, phase) for phase in order for kind in (PHASE_STARTED, PHASE_ENDED)]
    assert [e.index for e in seen if e.kind == STEP] == [1, 2, 3]
    pieces = [e for e in seen if e.kind == PIECE]
    assert [e.index for e in pieces] == list(range(1, pieces[0].total + 1))
    assert pieces[0].total == 2 * 3  # three latent frames: the low-resolution pass and one tile
    kinds = [e.kind for e in seen]
    assert kinds.index(PIECE) > max(i for i, k in enumerate(kinds) if k == STEP)
    assert seen[-1].phase == "write" and seen[-1].progress == 1.0
    assert all(b.elapsed >= a.elapsed for a, b in zip(seen, seen[1:]))


def test_a_run_with_sound_has_its_sound_phase(tmp_path, published_checkpoint):
    """Fails when the audio decode is not its own phase after the video's decode."""
    seen: list[RunEvent] = []
    config = GenerationConfig(
        prompt="a fox", frames=9, resolution=256, steps=1, sound=True, output=tmp_path / "out.mp4"
    )
    run(config, checkpoint=published_checkpoint, device="cpu", progress=False, events=RunEvents(seen.append))
    started = [e.phase for e in seen if e.kind == PHASE_STARTED]
    assert started[-3:] == ["decode", "sound", "write"]


def test_the_live_line_redraws_in_place_and_clears_at_the_write():
    """Fails when the terminal line is not redrawn in place (a new line per step floods the terminal), does not
    show the step, the ETA and the overall share, or is left on the screen when the report follows."""
    stream = io.StringIO()
    line = ProgressLine(stream, live=True)
    line(RunEvent(kind=PHASE_STARTED, phase="denoise", elapsed=0.0, progress=0.05))
    line(RunEvent(kind=STEP, phase="denoise", elapsed=5.9, index=12, total=35, seconds=5.9, eta=136.0, progress=0.4))
    text = stream.getvalue()
    assert "\n" not in text and text.count("\r") == 2
    last = text.split("\r")[-1]
    assert "12/35" in last and "5.90 s/step" in last and "ETA 2:16" in last and "40% overall" in last
    line(RunEvent(kind=PHASE_STARTED, phase="write", elapsed=9.0, progress=0.98))
    line(RunEvent(kind=PHASE_ENDED, phase="write", elapsed=9.5, seconds=0.5, progress=1.0))
    assert stream.getvalue().endswith("\r") and stream.getvalue().split("\r")[-2].strip() == ""


def test_the_logged_lines_are_few():
    """Fails when a log (not a terminal) gets a line per step or per decode piece instead of the phases, the first
    and last steps, one every few seconds between, and the decode's quarters."""
    stream, clock = io.StringIO(), Clock()
    line = ProgressLine(stream, live=False, clock=clock, log_every=10.0)
    line(RunEvent(kind=PHASE_STARTED, phase="denoise", elapsed=0.0))
    for index in range(1, 36):
        clock.now += 1.0
        line(RunEvent(kind=STEP, phase="denoise", elapsed=index, index=index, total=35, seconds=1.0))
    for index in range(1, 101):
        line(RunEvent(kind=PIECE, phase="decode", elapsed=40, index=index, total=100))
    lines = stream.getvalue().splitlines()
    steps = [x for x in lines if x.startswith("denoise ") and "/35" in x]
    assert lines[0] == "denoise..." and 4 <= len(steps) <= 6
    assert " 1/35" in steps[0] and "35/35" in steps[-1]
    assert len([x for x in lines if x.startswith("decode")]) == 4


def test_describe_and_durations():
    assert [format_duration(s) for s in (4.2, 136, 4000)] == ["4s", "2:16", "1:06:40"]
    piece = RunEvent(kind=PIECE, phase="decode", elapsed=1.0, index=1, total=4, progress=0.9)
    assert "[--------------------]" in describe(piece, None, None)  # piece 1 is about to run: none done yet
