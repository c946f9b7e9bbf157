"""Each job's run as the server tells it: a feed per job, open from the moment the job is admitted until it
has ended, that numbers the job's events (app/events.py) as the worker makes them and hands each to every
client following the job (`GET /v1/videos/{id}/events`, api.py).

A feed keeps the latest state of its run (phase, step i of n, piece i of n, time left, the preview's URL) and,
for the running job, every event so far (at most its steps, decode pieces, phases and previews), so a client
that reconnects with `Last-Event-ID` is replayed what it missed. A job that ended has no feed: its final
state is the store's. The worker thread records; clients wait on their own asyncio queue, filled with
`loop.call_soon_threadsafe`, so the event loop is never blocked and a client that left costs nothing more.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field
from typing import Any

from ..app.events import PHASE_STARTED, PIECE, PREVIEW, STEP, RunEvent

STATE = "state"  # the job's status changed (it started running); sent with the job's object
MAX_KEPT_EVENTS = 20_000  # a job's events kept for a replay: far more than any run makes (steps + pieces + phases)


@dataclass(frozen=True)
class FeedEvent:
    """One event of a job: `seq` counts the job's events from 1 (the SSE `id:`), `kind` a RunEvent's kind or
    `state`, `data` its JSON object."""

    seq: int
    kind: str
    data: dict[str, Any]


@dataclass
class RunState:
    """Where a job's run stands: the phase it is in, the last step and decode piece (i of n), the time left,
    the whole run's share done (0..1), the seconds since it started, and its latest preview's URL."""

    phase: str | None = None
    step: int | None = None
    steps: int | None = None
    piece: int | None = None
    pieces: int | None = None
    eta: float | None = None
    progress: float = 0.0
    elapsed: float | None = None
    preview: str | None = None

    def follow(self, event: RunEvent, preview_url: str | None) -> None:
        """Take in `event` (`preview_url`: where a preview event's image is served)."""
        if event.kind == PHASE_STARTED:
            self.phase = event.phase
        if event.kind == STEP:
            self.step, self.steps = event.index, event.total
        if event.kind == PIECE:
            self.piece, self.pieces = event.index, event.total
        if event.kind == PREVIEW:
            self.preview = preview_url
        if event.kind != PREVIEW:  # a preview says nothing new of the time left
            self.eta = event.eta
        self.progress, self.elapsed = event.progress, event.elapsed

    def as_json(self) -> dict[str, Any]:
        values = {key: value for key, value in vars(self).items() if value is not None}
        for key in ("eta", "elapsed"):
            if key in values:
                values[key] = round(values[key], 3)
        values["progress"] = round(self.progress, 4)
        return values


class DecodePace:
    """The last decode's seconds per output pixel (frames x height x width), so a job's first time left counts
    its decode at the pace the server measured, scaled to its size (a 189-frame 720p decode is no 5-frame one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds_per_pixel: float | None = None

    def guess(self, frames: int, height: int, width: int) -> float | None:
        """Seconds a decode of this size should take, or None before any decode was measured."""
        with self._lock:
            pace = self._seconds_per_pixel
        return None if pace is None else pace * frames * height * width

    def learn(self, frames: int, height: int, width: int, seconds: float | None) -> None:
        if seconds is not None:
            with self._lock:
                self._seconds_per_pixel = seconds / (frames * height * width)


class Subscription:
    """A client following one job: `state` (the run's state when it subscribed), `replay` (the kept events after
    the id it gave), then `await next()` for each new event, None once the job has ended."""

    def __init__(self, job_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.job_id, self.loop = job_id, loop
        self.state: dict[str, Any] = {}
        self.replay: list[FeedEvent] = []
        self._queue: asyncio.Queue[FeedEvent | None] = asyncio.Queue()

    async def next(self) -> FeedEvent | None:
        return await self._queue.get()

    def hand(self, event: FeedEvent | None) -> bool:
        """From any thread: queue `event` for the client; False when its event loop has closed."""
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody reads this client any more
            return False
        return True


@dataclass
class _Feed:
    preview_url: str | None
    state: RunState = field(default_factory=RunState)
    events: collections.deque[FeedEvent] = field(default_factory=lambda: collections.deque(maxlen=MAX_KEPT_EVENTS))
    seq: int = 0
    clients: set[Subscription] = field(default_factory=set)


class JobFeeds:
    """The feeds of the jobs admitted and not yet ended. Every method may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._feeds: dict[str, _Feed] = {}

    def open(self, job_id: str, *, preview_url: str | None = None) -> None:
        """A feed for a job about to be recorded (before anyone can see it queued); `preview_url`: where its
        preview is served (None: it has none)."""
        with self._lock:
            self._feeds.setdefault(job_id, _Feed(preview_url))

    def close(self, job_id: str) -> None:
        """The job has ended (and the store says how): its clients are told, its feed and history dropped."""
        with self._lock:
            feed = self._feeds.pop(job_id, None)
        for client in () if feed is None else feed.clients:
            client.hand(None)

    def is_open(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._feeds

    def started(self, job_id: str) -> None:
        """The worker took the job: its clients get a `state` event (its object, now in progress)."""
        self._record(job_id, STATE, None)

    def record(self, job_id: str, event: RunEvent) -> None:
        """One of the job's run events, as the worker made it."""
        self._record(job_id, event.kind, event)

    def subscribe(self, job_id: str, *, after: int | None = None) -> Subscription | None:
        """Follow `job_id` from the running event loop: its state now and the kept events after `after`
        (the client's Last-Event-ID; None: none replayed); None when the job has no feed (it has ended)."""
        client = Subscription(job_id, asyncio.get_running_loop())
        with self._lock:
            feed = self._feeds.get(job_id)
            if feed is None:
                return None
            client.state = feed.state.as_json()
            if after is not None:
                client.replay = [event for event in feed.events if event.seq > after]
            feed.clients.add(client)
        return client

    def unsubscribe(self, client: Subscription) -> None:
        with self._lock:
            feed = self._feeds.get(client.job_id)
            if feed is not None:
                feed.clients.discard(client)

    def _record(self, job_id: str, kind: str, event: RunEvent | None) -> None:
        with self._lock:
            feed = self._feeds.get(job_id)
            if feed is None:
                return
            if event is not None:
                feed.state.follow(event, feed.preview_url)
                data = event.as_json()
                if kind == PREVIEW and feed.preview_url is not None:
                    data["url"] = feed.preview_url
            else:
                data = {"run": feed.state.as_json()}
            feed.seq += 1
            recorded = FeedEvent(feed.seq, kind, data)
            feed.events.append(recorded)
            gone = {client for client in feed.clients if not client.hand(recorded)}
            feed.clients -= gone
