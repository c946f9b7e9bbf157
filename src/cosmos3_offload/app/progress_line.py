"""The command line's progress display: a run's events (app/events.py) as one line on stderr.

On a terminal the line is redrawn in place: the phase, its step or piece of the total with a bar, the step's
seconds, the time left (ETA) and the whole run's share done; it is cleared when the run writes its file (the
report follows). Elsewhere (a log, a pipe) it prints whole lines instead, few enough to read: each phase as it
starts, the first and the last step and one at most every `log_every` seconds between, the decode at each
quarter. Torch-free.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TextIO

from .console import printable
from .events import PHASE_ENDED, PHASE_STARTED, PIECE, PREVIEW, STEP, RunEvent

BAR_WIDTH = 20
LOG_EVERY_SECONDS = 10.0


class ProgressLine:
    """A listener of `RunEvents` that draws the run on `stream`."""

    def __init__(
        self,
        stream: TextIO,
        *,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_every: float = LOG_EVERY_SECONDS,
    ) -> None:
        self._stream = stream
        self._live = stream.isatty() if live is None else live
        self._clock = clock
        self._log_every = log_every
        self._last_logged: float | None = None
        self._quarter = -1
        self._drawn = 0  # characters of the live line on the screen
        self._step_seconds: float | None = None
        self._preview: str | None = None

    def __call__(self, event: RunEvent) -> None:
        if event.kind == STEP:
            self._step_seconds = event.seconds
        if event.kind == PREVIEW:
            self._preview = f"preview of step {event.index}"
        if self._live:
            self._draw(event)
        else:
            self._log(event)

    def _draw(self, event: RunEvent) -> None:
        if event.kind == PHASE_ENDED and event.phase == "write":
            return self._clear()
        if event.kind == PHASE_ENDED:
            return  # the next phase's start redraws
        width = shutil.get_terminal_size((100, 20)).columns - 1
        text = _fit(describe(event, self._step_seconds, self._preview), width)
        text = printable(text, self._stream, one_line=True)
        self._stream.write("\r" + text + " " * max(0, self._drawn - len(text)))
        self._stream.flush()
        self._drawn = len(text)

    def _clear(self) -> None:
        if self._drawn:
            self._stream.write("\r" + " " * self._drawn + "\r")
            self._stream.flush()
            self._drawn = 0

    def _log(self, event: RunEvent) -> None:
        now = self._clock()
        if event.kind == PHASE_STARTED:
            self._quarter = -1
            line = f"{event.phase}..."
        elif event.kind == STEP:
            due = self._last_logged is None or now - self._last_logged >= self._log_every
            if not (event.index == 1 or event.index == event.total or due):
                return
            line = describe(event, self._step_seconds, None)
        elif event.kind == PIECE:
            quarter = 4 * (event.index - 1) // event.total
            if quarter == self._quarter:
                return
            self._quarter = quarter
            line = describe(event, None, None)
        else:
            return
        self._last_logged = now
        self._stream.write(printable(line, self._stream, one_line=True) + "\n")
        self._stream.flush()


def describe(event: RunEvent, step_seconds: float | None, preview: str | None) -> str:
    """One line for the run's state at `event`: the phase, its count with a bar, the step's seconds, the ETA,
    the whole run's share, and the last preview written."""
    parts = [f"{event.phase:<8}"]
    if event.kind in (STEP, PIECE) and event.total:
        done = event.index if event.kind == STEP else event.index - 1
        parts.append(f"{event.index:>{len(str(event.total))}}/{event.total} {_bar(done / event.total)}")
    if event.phase == "denoise" and step_seconds is not None:
        parts.append(f"{step_seconds:.2f} s/step")
    if event.eta is not None:
        parts.append(f"ETA {format_duration(event.eta)}")
    parts.append(f"{100 * event.progress:.0f}% overall")
    if preview is not None:
        parts.append(preview)
    return "  ".join(parts)


def format_duration(seconds: float) -> str:
    """4.2 -> '4s', 136 -> '2:16', 4000 -> '1:06:40'."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    if minutes:
        return f"{minutes}:{secs:02d}"
    return f"{secs}s"


def _bar(share: float) -> str:
    filled = round(BAR_WIDTH * min(max(share, 0.0), 1.0))
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 3)] + "..."
