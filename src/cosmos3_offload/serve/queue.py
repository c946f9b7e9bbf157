"""The bounded FIFO of jobs and the one worker thread that runs them on the loaded model.

One GPU runs one job at a time: the worker takes the oldest waiting job, runs it as `generate`
would (`LoadedModel.write` into the job's folder, under the output's lock, written whole or not at
all) and records the outcome. Its run's events (app/events.py) go to its feed (job_events.py), which
the job's Server-Sent Events clients follow, and move its stored progress (1% when it starts, the run's
share done up to 99%, 100% once its file is written); a video job's previewer (job_previews.py) writes its
preview as it renders. A job that is deleted while it runs, or a server that stops, ends it at the next step
or decode piece. Whatever a job raises (bad input found late, NaN latents, out of memory, a full disk, a
store that refuses its record) fails that job alone, with its files removed: the worker goes on with the
next, and the server's health says when it could not.

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
from dataclasses import dataclass, field

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


class JobQueue:
    """Jobs waiting for the one worker; `retention` (kind -> Retention) says how long finished ones are kept,
    `feeds` hears their runs' events, `previews` (None: none) makes a video job's previewer."""

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
    ) -> None:
        self.loaded, self.store, self.size, self.metrics = loaded, store, size, metrics
        self.retention = retention or {"video": KEEP_VIDEOS, "image": KEEP_IMAGES}
        self.feeds = feeds or JobFeeds()
        self.previews = previews
        self._decode_pace = DecodePace()
        self._waiting: collections.deque[Work] = collections.deque()
        self._condition = threading.Condition()
        self._running: Work | None = None
        self._cancelled: set[str] = set()
        self._held: set[str] = set()  # finished jobs a request still reads: out of the retention's reach
        self._expire_soon = False  # a request released held jobs: expire before waiting again
        self._stopping = False
        self._left: list[str] = []  # the jobs a stop left unfinished
        self._thread = threading.Thread(target=self._work, name="cosmos3-jobs", daemon=True)

    def start(self) -> None:
        """Delete what the retention no longer keeps (before the first request is answered), then work."""
        self.expire()
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (False before `start` and after `stop`)."""
        return self._thread.is_alive()

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
            self._condition.notify()

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
            if self._running is not None and self._running.job_id == job_id:
                self._cancelled.add(job_id)
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
            if self._running is not None and self._running.job_id not in left:
                left.append(self._running.job_id)
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return list(left)

    def expire(self) -> None:
        """Delete the finished jobs past the retention, with their files (the worker's, and the start's before
        it runs). A store that refuses is logged, never raised: the next pass tries again."""
        with self._condition:
            held = set(self._held)
        removed = 0
        try:
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
            self._running = self._waiting.popleft()
            return self._running

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
                self._running = None
                self._cancelled.discard(work.job_id)
            self.feeds.close(work.job_id)  # the store says how it ended: its clients read that now
            work.done.set()

    def _check_stopped(self, job_id: str) -> None:
        if job_id in self._cancelled or self._stopping:
            raise JobStopped

    def _run(self, work: Work) -> None:
        job_id, config = work.job_id, work.config
        if not self.store.update(job_id, status=IN_PROGRESS, progress=STARTED_PROGRESS):
            self.store.remove_files(job_id)  # deleted between the queue and here
            return
        self.feeds.started(job_id)
        shape = (config.frames, config.height, config.width)
        events = RunEvents(self._listener(job_id), decode_seconds=self._decode_pace.guess(*shape))
        timer = PhaseTimer(self.loaded.device, events=events)
        started = time.perf_counter()
        conditioning = read_conditioning(config)
        folder = self.store.folder_of(job_id)
        preview = self.previews.for_job(folder) if self.previews is not None and work.kind == "video" else None
        with OutputLock(config.output):
            self.loaded.write(
                config,
                timer,
                conditioning=conditioning,
                progress=False,
                on_step=lambda index: self._check_stopped(job_id),
                on_decode_tile=lambda: self._check_stopped(job_id),
                preview=preview,
            )
        self._decode_pace.learn(*shape, events.last_decode_seconds)
        seconds = time.perf_counter() - started
        stats = self.metrics.finished(timer, seconds, self.loaded.device)
        recorded = self.store.update(
            job_id, status=COMPLETED, progress=100, completed_at=int(time.time()), file=config.output.name, stats=stats
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
