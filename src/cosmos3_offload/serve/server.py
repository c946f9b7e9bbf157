"""`cosmos3-offload serve`: claim the port and the storage, load the model once, serve until stopped.

The port is bound and the storage locked before the model loads, so a port in use or a storage
folder another server holds is refused at once (one line, exit status 2). Ctrl-C or SIGTERM stops
cleanly: no new connections, the running job ends at its next step and is marked failed with the
waiting ones (a restart reports them as such), the database is closed, exit status 0.

No connection is held for ever: an idle one is closed after KEEP_ALIVE_SECONDS, one whose request line and
headers are not in after REQUEST_HEAD_SECONDS (an idle new connection, headers sent a byte at a time) is cut
off, and a body that stops arriving is answered by the guard (guard.py). Past MAX_CONNECTIONS open
connections, requests are answered 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..app.model_checks import has_action_heads
from ..app.previews import PreviewOptions, preview_frames
from ..app.runner import LoadedModel
from ..app.serve_settings import ServeSettings
from ..app.timer import PhaseTimer
from ..errors import InputError
from .api import create_app
from .job_events import JobFeeds
from .job_previews import PREVIEW_FILE, JobPreviews
from .metrics import Metrics
from .queue import JobQueue
from .service import Service
from .store import JobStore

GRACEFUL_SECONDS = 3  # open connections (an images request waiting for its job) get this long at a stop
# An idle connection is kept longer than clients keep theirs (httpx, and so openai's client: 5 s), so a
# client never sends a request on a connection the server is closing at that moment (a reset).
KEEP_ALIVE_SECONDS = 30
REQUEST_HEAD_SECONDS = 15  # a request's line and headers must be in this soon after the connection or their first byte
MAX_HEAD_BYTES = 16 * 2**10  # a request's line and headers; a longer head is answered 400
MAX_CONNECTIONS = 100  # open connections (a waiting images request holds one); past it requests are answered 503


def serve(loaded: LoadedModel, settings: ServeSettings) -> int:
    listener = bind(settings.host, settings.port)
    try:
        with in_process(loaded, settings) as running:
            server = uvicorn_server(running.app)
            _stop_jobs_at_the_signal(server, running.queue)
            host, port = listener.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            where = f"{settings.replicas} replica(s) on Ray" if settings.on_ray else f"device {loaded.device}"
            print(
                f"serving {settings.model_name} on http://{shown}:{port} ({where}, storage "
                f"{settings.storage}, loaded in {running.load_seconds:.1f}s); Ctrl-C stops",
                flush=True,
            )
            with _signals_recorded():
                server.run(sockets=[listener])
    finally:
        listener.close()
    print(f"stopped; {len(running.unfinished)} unfinished job(s) marked failed", flush=True)
    return 0


def _stop_jobs_at_the_signal(server: uvicorn.Server, queue: JobQueue) -> None:
    """At Ctrl-C or SIGTERM, fail the waiting jobs and end the running one at once, not after uvicorn's
    graceful wait: an images request waiting for its job then answers 503 `server_stopped` in OpenAI's
    body within that wait, instead of being cancelled into a plain-text 500."""
    handle_exit = server.handle_exit

    def stop_then_exit(sig: int, frame: object) -> None:
        if not server.should_exit:  # a thread: the store's lock may be held where the signal landed
            threading.Thread(target=queue.stop, args=(0,), name="cosmos3-stop", daemon=True).start()
        handle_exit(sig, frame)

    server.handle_exit = stop_then_exit  # read when uvicorn installs its signal handlers, in run()


def uvicorn_server(app: FastAPI) -> uvicorn.Server:
    """uvicorn as `serve` runs `app` (its `run(sockets=[...])` serves): HTTP/1.1 only, through h11 with the
    head deadline (whatever else is installed), no websockets, no Server header, the limits above."""
    config = uvicorn.Config(
        app,
        http=HeadDeadlineProtocol,
        ws="none",
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        limit_concurrency=MAX_CONNECTIONS,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        lifespan="off",
        access_log=False,
        server_header=False,
    )
    return uvicorn.Server(config)


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head, which uvicorn lacks: between
    requests (no request in progress) a connection that is new, or has begun a request, is closed unless the
    request's line and headers are in within REQUEST_HEAD_SECONDS. Without it a client that connects and
    sends nothing, or sends a header a byte at a time, holds its connection for ever. (An idle connection
    after a response is closed by uvicorn's keep-alive timeout; a body's reads are timed by the guard.)"""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._between_requests():  # the first bytes of a request, or more of its head
            self._start_head_timer()
        super().data_received(data)
        if not self._between_requests():  # its head is in: the route (and the guard) have it now
            self._stop_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(REQUEST_HEAD_SECONDS, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._between_requests():
            self.transport.close()


@dataclass
class Running:
    """The app of a running server, how long its model took to load, its job queue, and (once stopped) the
    job ids that were left unfinished."""

    app: FastAPI
    load_seconds: float
    queue: JobQueue
    unfinished: list = field(default_factory=list)


@contextlib.contextmanager
def in_process(loaded: LoadedModel, settings: ServeSettings) -> Iterator[Running]:
    """The app `serve` runs, with its storage locked, model loaded and job worker started; `serve` puts it
    behind a socket, the tests drive it through an ASGI transport. Leaving it stops the worker: waiting jobs
    are marked failed, the running one ends at its next step, the storage is released. With replicas
    (`settings.on_ray`) the model loads on each replica instead, and leaving removes them."""
    loaded = with_action_heads(loaded)
    store = JobStore.open(settings.storage)
    queue = None
    running = None
    replicas = None
    try:
        metrics = Metrics()
        started = time.perf_counter()
        if settings.on_ray:
            from .replicas.cluster import start_replicas  # Ray is imported only for replicas
            from .replicas.dispatch import ReplicaRunner

            replicas = start_replicas(loaded, settings)
            runner = ReplicaRunner(replicas, metrics)
            previews = _replica_previews(loaded, settings, store.folder)
            load_seconds = time.perf_counter() - started
        else:
            timer = PhaseTimer(loaded.device)
            loaded.load(timer, progress=settings.progress)
            load_seconds = timer.phases[-1].seconds
            runner = None
            previews = None
            if settings.preview_kind != "none":
                previews = JobPreviews(loaded, kind=settings.preview_kind, every=settings.preview_every)
                previews.check(store.folder)  # refused before any request; the fast map fitted before the first
        retention = {"video": settings.keep_videos, "image": settings.keep_images}
        queue = JobQueue(
            loaded, store, settings.queue_size, metrics, retention, feeds=JobFeeds(), previews=previews, runner=runner
        )
        app = create_app(Service(loaded, store, queue, metrics, settings, replicas=replicas))
        running = Running(app, load_seconds, queue)
        queue.start()
        yield running
    finally:
        try:
            left = [] if queue is None else queue.stop()
            if running is not None:
                running.unfinished = left
        finally:
            try:
                if replicas is not None:
                    replicas.stop()
            finally:
                store.close()


def _replica_previews(loaded: LoadedModel, settings: ServeSettings, folder: Path) -> JobPreviews | None:
    """The server's previews when replicas make them: none made here (no model is loaded here), only the latent
    frames an exact one decodes, which each request's fit counts."""
    if settings.preview_kind == "none":
        return None
    previews = JobPreviews(loaded, kind=settings.preview_kind, every=settings.preview_every)
    options = PreviewOptions(path=folder / PREVIEW_FILE, kind=settings.preview_kind, every=settings.preview_every)
    previews.frames = preview_frames(options)
    return previews


def with_action_heads(loaded: LoadedModel) -> LoadedModel:
    """The model a server loads: with its action heads when it has them (a few MiB), since any request may be an
    action run; one without them (or distilled for video) serves the other requests, and refuses action runs."""
    if loaded.actions or loaded.components is not None or not has_action_heads(loaded.checkpoint, loaded.model):
        return loaded
    return dataclasses.replace(loaded, actions=True)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or an InputError saying why not (in use, no such address)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise InputError(f"--host {host!r} cannot be resolved: {error.strerror}") from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(128)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is in use; pass another --port (0: any free one)") from None
        raise InputError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    listener.set_inheritable(False)
    return listener


class _signals_recorded:
    """While the server runs, SIGINT and SIGTERM only stop it (uvicorn's own handlers); uvicorn raises the
    signal again when it has stopped, which then lands here instead of ending the cleanup half-done."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> None:
        self._previous = {sig: signal.signal(sig, self._record) for sig in self.SIGNALS}

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @staticmethod
    def _record(signum: int, frame: object) -> None:
        print(f"received {signal.Signals(signum).name}; stopping", file=sys.stderr, flush=True)
