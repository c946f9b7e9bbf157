"""The bounded FIFO of jobs and the worker threads that run them: one on the loaded model, or one per replica.

One GPU runs one job at a time: the worker takes the oldest waiting job, runs it as `generate`
would (`LoadedModel.write` into the job's folder, under the output's lock, written whole or not at
all) and records the outcome. Its run's events (app/events.py) go to its feed (job_events.py), which
the job's Server-Sent Events clients follow, and move its stored progress (1% when it starts, the run's
share done up to 99%, 100% once its file is written); a video job's previewer (job_previews.py) writes its
preview as it renders. With replicas (serve/replicas/) each of N workers takes the next job and hands it to
a free replica (`Runner`), which streams the same events and preview back. A job that is deleted while it
runs, or a server that stops, ends it at the next step or decode piece. Whatever a job raises (bad input
found late, NaN latents, out of memory, a full disk, a store that refuses its record, its replica dying)
fails that job alone, with its files removed: the worker goes on with the next, and the server's health
says when it could not.

Finished jobs past the server's retention (`--keep-videos`, `--keep-images`) are deleted with their
files at the start, after each job and every minute while idle; the jobs an images request still
waits for are held until it has read them.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..app.config import GenerationConfig
from ..app.events import STEP, Listener, RunEvent, RunEvents
from ..app.inputs import read_conditioning
from ..app.outputs import OutputLock
from ..app.runner import LoadedModel
from ..app.serve_settings import KEEP_IMAGES, KEEP_VIDEOS, Retention
from ..app.timer import PhaseTimer
from ..errors import InputError
from .api_errors import queue_full
from .job_events import DecodePace, JobFeeds
from .job_previews import JobPreviews
from .metrics import Metrics
from .storage_errors import StorageError, is_disk_full
from .store import COMPLETED, IN_PROGRESS, JobStore

logger = logging.getLogger(__name__)

STARTED_PROGRESS, LAST_RUN_PROGRESS = 1, 99  # a running job's stored progress: 100 only once its file is whole
EXPIRE_EVERY_SECONDS = 60  # while idle, how often jobs that aged past the retention are deleted
STORAGE_FULL_MESSAGE = "the server's storage is full; delete finished jobs or free space on it, then submit again"


class JobStopped(Exception):
    """Raised at a step or decode tile boundary: the job was deleted, or the server is stopping."""


class JobFailed(Exception):
    """A job that failed where its error was already named (a replica's): its `code` and `message`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Work:
    """A job waiting for the worker: its request, its kind (video or image), and an event set once it has ended
    (or left the queue)."""

    job_id: str
    config: GenerationConfig
    kind: str = "video"
    done: threading.Event = field(default_factory=threading.Event)


def failure(error: BaseException) -> tuple[str, str]:
    """(code, message) a job that raised `error` fails with."""
    if isinstance(error, JobStopped):
        return "server_stopped", "the server stopped while this job ran"
    if isinstance(error, JobFailed):
        return error.code, error.message
    if is_disk_full(error):
        return "storage_full", STORAGE_FULL_MESSAGE
    if isinstance(error, StorageError):
        return "storage_error", str(error)
    if isinstance(error, InputError):
        return "generation_failed", str(error)
    if isinstance(error, OSError):
        return "generation_failed", f"{error.strerror or error}"
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out_of_memory", "the GPU ran out of memory for this request; ask for fewer frames"
    return "server_error", "the server failed while running this job"


class Runner(Protocol):
    """Runs one job into its folder and returns its `stats`: here on the loaded model (`LocalRunner`) or on a
    replica (replicas/dispatch.py). `heard` takes its run's events; `check_stopped()` raises JobStopped once the
    job is deleted or the server stops; `cancel(job_id)` tells a job running elsewhere to stop."""

    workers: int  # jobs it runs at once

    def run(self, work: Work, folder: Path, heard: Listener, check_stopped: Callable[[], None]) -> dict[str, Any]: ...

    def cancel(self, job_id: str) -> None: ...


class LocalRunner:
    """Jobs run one at a time on this process's loaded model, as `generate` runs them; `previews()` gives the
    queue's previews as they are when a job starts."""

    workers = 1

    def __init__(self, loaded: LoadedModel, metrics: Metrics, previews: Callable[[], JobPreviews | None]) -> None:
        self.loaded, self.metrics, self.previews = loaded, metrics, previews
        self._decode_pace = DecodePace()

    def run(self, work: Work, folder: Path, heard: Listener, check_stopped: Callable[[], None]) -> dict[str, Any]:
        config = work.config
        shape = (config.frames, config.height, config.width)
        events = RunEvents(heard, decode_seconds=self._decode_pace.guess(*shape))
        timer = PhaseTimer(self.loaded.device, events=events)
        started = time.perf_counter()
        conditioning = read_conditioning(config)
        previews = self.previews()
        preview = previews.for_job(folder) if previews is not None and work.kind == "video" else None
        with OutputLock(config.output):
            self.loaded.write(
                config,
                timer,
                conditioning=conditioning,
                progress=False,
                on_step=lambda index: check_stopped(),
                on_decode_tile=check_stopped,
                preview=preview,
            )
        self._decode_pace.learn(*shape, events.last_decode_seconds)
        return self.metrics.finished(timer, time.perf_counter() - started, self.loaded.device)

    def cancel(self, job_id: str) -> None:
        """Nothing to tell: the worker's own checks stop it."""


class JobQueue:
    """Jobs waiting for the workers (one, or the `runner`'s); `retention` (kind -> Retention) says how long
    finished ones are kept, `feeds` hears their runs' events, `previews` (None: none) makes a video job's previewer."""

    def __init__(
        self,
        loaded: LoadedModel,
        store: JobStore,
        size: int,
        metrics: Metrics,
        retention: dict[str, Retention] | None = None,
        *,
        feeds: JobFeeds | None = None,
        previews: JobPreviews | None = None,
        runner: Runner | None = None,
    ) -> None:
        self.loaded, self.store, self.size, self.metrics = loaded, store, size, metrics
        self.retention = retention or {"video": KEEP_VIDEOS, "image": KEEP_IMAGES}
        self.feeds = feeds or JobFeeds()
        self.previews = previews
        self.runner = runner or LocalRunner(loaded, metrics, lambda: self.previews)
        self._waiting: collections.deque[Work] = collections.deque()
        self._condition = threading.Condition()
        self._expiring = threading.Lock()  # one worker at a time deletes expired jobs
        self._running: dict[str, Work] = {}
        self._cancelled: set[str] = set()
        self._held: set[str] = set()  # finished jobs a request still reads: out of the retention's reach
        self._expire_soon = False  # a request released held jobs: expire before waiting again
        self._stopping = False
        self._left: list[str] = []  # the jobs a stop left unfinished
        self._threads = [
            threading.Thread(target=self._work, name=f"cosmos3-jobs-{index}", daemon=True)
            for index in range(self.runner.workers)
        ]

    def start(self) -> None:
        """Delete what the retention no longer keeps (before the first request is answered), then work."""
        self.expire()
        for thread in self._threads:
            thread.start()

    @property
    def alive(self) -> bool:
        """Whether every worker thread runs (False before `start` and after `stop`)."""
        return all(thread.is_alive() for thread in self._threads)

    def submit(self, works: list[Work], *, hold: bool = False) -> None:
        """Queue `works` together, or none of them (429) when the queue has no room for all. With `hold`,
        the retention keeps them until `release`."""
        with self._condition:
            if self._stopping:
                raise queue_full(self.size)
            if len(self._waiting) + len(works) > self.size:
                raise queue_full(self.size)
            if hold:
                self._held.update(work.job_id for work in works)
            self._waiting.extend(works)
            self._condition.notify(len(works))  # with replicas, as many workers as jobs may take one

    def release(self, job_ids: list[str]) -> None:
        """The held jobs `job_ids` are read: the worker applies the retention to them next (this never blocks,
        so a request may call it as it ends, even cancelled)."""
        with self._condition:
            self._held.difference_update(job_ids)
            self._expire_soon = True
            self._condition.notify()

    def __len__(self) -> int:
        with self._condition:
            return len(self._waiting)

    def cancel(self, job_id: str) -> bool:
        """Take a waiting job out of the queue, or stop the running one at its next step. True when it is
        running: its worker removes the job's folder when it stops (the caller removes any other's)."""
        with self._condition:
            for work in self._waiting:
                if work.job_id == job_id:
                    self._waiting.remove(work)
                    work.done.set()
                    return False
            if job_id in self._running:
                self._cancelled.add(job_id)
                self.runner.cancel(job_id)
                return True
        return False

    def stop(self, timeout: float | None = None) -> list[str]:
        """Stop taking jobs, end the running one at its next step and wait for the worker; the waiting
        jobs are marked failed. Returns their ids and the running one's."""
        with self._condition:
            self._stopping = True
            left = self._left  # a second stop (the signal's, then the server's exit) reports the first's too
            left += [work.job_id for work in self._waiting]
            for work in self._waiting:
                self.store.fail(work.job_id, "server_stopped", "the server stopped before this job ran")
                self.feeds.close(work.job_id)
                work.done.set()
            self._waiting.clear()
            for job_id in self._running:
                if job_id not in left:
                    left.append(job_id)
                self.runner.cancel(job_id)
            self._condition.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return list(left)

    def expire(self) -> None:
        """Delete the finished jobs past the retention, with their files (the worker's, and the start's before
        it runs). A store that refuses is logged, never raised: the next pass tries again."""
        with self._condition:
            held = set(self._held)
        removed = 0
        try:
            with self._expiring:
                for kind, retention in self.retention.items():
                    for job_id in self.store.expired(kind, retention, now=time.time(), keep=held):
                        self.store.delete(job_id)
                        removed += 1
        except Exception:
            logger.exception("finished jobs past the retention could not all be deleted")
        if removed:
            logger.info("deleted %d finished job(s) past the retention", removed)

    def _next(self, timeout: float) -> Work | None:
        """The next job, or None when stopping, when held jobs were released, or after `timeout` seconds."""
        with self._condition:
            if not self._waiting and not self._stopping and not self._expire_soon:
                self._condition.wait(timeout)
            self._expire_soon = False  # the worker expires jobs whenever this returns
            if self._stopping or not self._waiting:
                return None
            work = self._waiting.popleft()
            self._running[work.job_id] = work
            return work

    def _work(self) -> None:
        while not self._stopping:
            work = self._next(EXPIRE_EVERY_SECONDS)
            if work is not None:
                self._run_safely(work)
            if not self._stopping:
                self.expire()

    def _run_safely(self, work: Work) -> None:
        """Run `work`; whatever it raises fails it alone (and whatever that raises is logged), so the worker
        goes on with the next job."""
        try:
            self._run(work)
        except BaseException as error:
            try:
                self._ended(work.job_id, error)
            except BaseException:
                logger.exception("job %s failed and its failure could not be recorded", work.job_id)
        finally:
            with self._condition:
                self._running.pop(work.job_id, None)
                self._cancelled.discard(work.job_id)
            self.feeds.close(work.job_id)  # the store says how it ended: its clients read that now
            work.done.set()

    def _check_stopped(self, job_id: str) -> None:
        if job_id in self._cancelled or self._stopping:
            raise JobStopped

    def _run(self, work: Work) -> None:
        job_id = work.job_id
        if not self.store.update(job_id, status=IN_PROGRESS, progress=STARTED_PROGRESS):
            self.store.remove_files(job_id)  # deleted between the queue and here
            return
        self.feeds.started(job_id)
        folder = self.store.folder_of(job_id)
        stats = self.runner.run(work, folder, self._listener(job_id), lambda: self._check_stopped(job_id))
        recorded = self.store.update(
            job_id,
            status=COMPLETED,
            progress=100,
            completed_at=int(time.time()),
            file=work.config.output.name,
            stats=stats,
        )
        if not recorded:  # deleted as it finished
            self.store.remove_files(job_id)

    def _listener(self, job_id: str) -> Listener:
        """What hears the job's run events: its feed, the step metrics, and its stored progress (written when
        its whole percent moves)."""
        stored = STARTED_PROGRESS

        def heard(event: RunEvent) -> None:
            nonlocal stored
            self.feeds.record(job_id, event)
            if event.kind == STEP and event.seconds is not None:
                self.metrics.step(event.seconds)
            percent = min(LAST_RUN_PROGRESS, round(100 * event.progress))
            if percent > stored:
                stored = percent
                self.store.update(job_id, progress=percent)

        return heard

    def _ended(self, job_id: str, error: BaseException) -> None:
        """A job that raised `error`: gone if it was deleted, else failed with its code and no output left."""
        code, message = failure(error)
        if code == "server_error":
            logger.error("job %s failed unexpectedly", job_id, exc_info=error)
        elif code == "out_of_memory":
            gc.collect()
            torch.cuda.empty_cache()
        self.metrics.failed()
        gone = job_id in self._cancelled
        if not gone:
            with contextlib.suppress(sqlite3.Error):  # a database that cannot be read: fail the job all the same
                gone = self.store.get(job_id) is None
        if gone:
            self.store.remove_files(job_id)
            return
        self.store.remove_outputs(job_id)  # a file written before its record failed is no job's file
        self.store.fail(job_id, code, message)
