"""A run's events: each phase started and ended, each denoising step and each piece of the decode with
its seconds, each preview written, and the time left, measured from the run's own steps.

One stream for every way a run is watched: the CLI draws it as one progress line (app/progress_line.py),
the server sends it as Server-Sent Events (serve/). `RunEvents` makes the events and hands each to its
listener as it happens, on the thread that runs the request; it keeps no history (a listener that needs
one keeps it). Torch-free: the timer (timer.py) and the generation path call it.

The time left (`eta`) counts what can be measured: during the denoise, the steps left at the mean time of
the steps so far (without the first, which pays compilation and first copies, once there are others),
plus the decode at the last run's pace when one was seen; during the decode, its pieces left at their mean.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

# Event kinds.
PHASE_STARTED, PHASE_ENDED, STEP, PIECE, PREVIEW = "phase_started", "phase_ended", "step", "piece", "preview"
EVENT_KINDS = (PHASE_STARTED, PHASE_ENDED, STEP, PIECE, PREVIEW)
# A run's phases, in the order they run (probe: a GPU's first attention measurement; encode: conditioning frames;
# sound: the audio track's decode). Not every run has every phase.
PHASES = ("probe", "load", "encode", "prefill", "denoise", "decode", "sound", "write")
# How much of a run's whole progress (0..1) each phase's end stands for; the denoise and the decode move
# through their share step by step and piece by piece. The denoise dominates every real run.
_PROGRESS_AT_END = {
    "probe": 0.01,
    "load": 0.03,
    "encode": 0.04,
    "prefill": 0.05,
    "denoise": 0.90,
    "decode": 0.98,
    "sound": 0.99,
    "write": 1.0,
}


@dataclass(frozen=True, kw_only=True)
class RunEvent:
    """One thing that happened in a run.

    - `kind`: phase_started, phase_ended, step (a denoising step ended), piece (a piece of the video decode
      is about to run: a latent frame of a tile, see vae/decode.py), preview (a preview image was written);
    - `phase`: the phase it belongs to (PHASES);
    - `elapsed`: seconds since the run's first event;
    - `index`, `total`: step or piece `index` of `total`, counted from 1 (a preview: the step it shows);
    - `seconds`: a step's or an ended phase's seconds;
    - `eta`: seconds left of the denoise and the decode as measured so far (None: nothing to measure yet);
    - `progress`: the whole run's share done, 0..1;
    - `preview`: a preview's kind (fast or exact).
    """

    kind: str
    phase: str
    elapsed: float
    index: int | None = None
    total: int | None = None
    seconds: float | None = None
    eta: float | None = None
    progress: float = 0.0
    preview: str | None = None

    def as_json(self) -> dict:
        """The event as a JSON object, without the fields it does not have; seconds rounded to the millisecond."""
        fields = {key: value for key, value in asdict(self).items() if value is not None}
        for key in ("elapsed", "seconds", "eta"):
            if key in fields:
                fields[key] = round(fields[key], 3)
        fields["progress"] = round(self.progress, 4)
        return fields


Listener = Callable[[RunEvent], None]


class RunEvents:
    """Makes a run's events and hands each to `listener` (what the listener raises propagates: a server stops a
    cancelled job that way). `clock`: seconds, monotonic. `decode_seconds`: the last run's decode time, for the
    first ETA of this one (a server running many requests knows it); `last_decode_seconds` gives this run's."""

    def __init__(
        self, listener: Listener, *, clock: Callable[[], float] = time.perf_counter, decode_seconds: float | None = None
    ) -> None:
        self._listener = listener
        self._clock = clock
        self._lock = threading.Lock()
        self._start: float | None = None
        self._phase_started: dict[str, float] = {}
        self._phase: str = PHASES[0]
        self._progress = 0.0
        self._last_mark: float | None = None  # the end of the last step, or the start of the denoise
        self._step_seconds: list[float] = []
        self._steps: int | None = None
        self._piece_started: float | None = None
        self._pieces: int | None = None
        self._pieces_done = 0
        self.last_decode_seconds = decode_seconds

    def phase_started(self, phase: str) -> None:
        now = self._now()
        self._phase, self._phase_started[phase] = phase, now
        if phase == "denoise":
            self._last_mark, self._step_seconds = now, []
        if phase == "decode":
            self._piece_started, self._pieces, self._pieces_done = now, None, 0
        self._send(RunEvent(kind=PHASE_STARTED, phase=phase, elapsed=self._elapsed(now), eta=self._eta(phase)))

    def phase_ended(self, phase: str) -> None:
        now = self._now()
        seconds = now - self._phase_started.pop(phase, now)
        if phase == "decode":
            self.last_decode_seconds = seconds
        self._progress = max(self._progress, _PROGRESS_AT_END.get(phase, self._progress))
        event = RunEvent(kind=PHASE_ENDED, phase=phase, elapsed=self._elapsed(now), seconds=seconds, eta=None)
        self._send(event)

    def step(self, index: int, total: int) -> None:
        """Denoising step `index` (from 0) of `total` has ended (its work queued: a GPU run's caller waits for it
        first, so the seconds are the step's)."""
        now = self._now()
        mark = self._last_mark if self._last_mark is not None else now
        seconds = now - mark
        self._last_mark, self._steps = now, total
        self._step_seconds.append(seconds)
        low, high = _PROGRESS_AT_END["prefill"], _PROGRESS_AT_END["denoise"]
        self._progress = max(self._progress, low + (high - low) * (index + 1) / total)
        eta = self._eta("denoise", steps_left=total - index - 1)
        event = RunEvent(
            kind=STEP,
            phase="denoise",
            elapsed=self._elapsed(now),
            index=index + 1,
            total=total,
            seconds=seconds,
            eta=eta,
        )
        self._send(event)

    def piece(self, index: int, total: int) -> None:
        """Piece `index` (from 0) of the video decode's `total` is about to run."""
        now = self._now()
        self._pieces, self._pieces_done = total, index
        low, high = _PROGRESS_AT_END["denoise"], _PROGRESS_AT_END["decode"]
        self._progress = max(self._progress, low + (high - low) * index / total)
        eta = self._eta("decode")
        self._send(
            RunEvent(kind=PIECE, phase="decode", elapsed=self._elapsed(now), index=index + 1, total=total, eta=eta)
        )

    def preview(self, step: int, total: int, kind: str) -> None:
        """A preview of step `step` (from 0) of `total` was written whole."""
        now = self._now()
        event = RunEvent(
            kind=PREVIEW, phase=self._phase, elapsed=self._elapsed(now), index=step + 1, total=total, preview=kind
        )
        self._send(event)

    def _eta(self, phase: str, *, steps_left: int | None = None) -> float | None:
        """Seconds left of the denoise and the decode, from what was measured (None: nothing yet)."""
        if phase == "denoise":
            if not self._step_seconds or steps_left is None:
                return None
            measured = self._step_seconds[1:] or self._step_seconds
            left = steps_left * sum(measured) / len(measured)
            return left + (self.last_decode_seconds or 0.0)
        if phase == "decode" and self._pieces and self._pieces_done:
            spent = self._now() - (self._piece_started or self._now())
            return spent / self._pieces_done * (self._pieces - self._pieces_done)
        return None

    def _now(self) -> float:
        now = self._clock()
        if self._start is None:
            self._start = now
        return now

    def _elapsed(self, now: float) -> float:
        return now - (self._start if self._start is not None else now)

    def _send(self, event: RunEvent) -> None:
        event = dataclasses.replace(event, progress=self._progress)
        with self._lock:
            self._listener(event)
