"""The bounded FIFO of jobs and the one worker thread that runs them on the loaded model.

One GPU runs one job at a time: the worker takes the oldest waiting job, runs it as `generate`
would (`LoadedModel.write` into the job's folder, under the output's lock, written whole or not at
all) and records the outcome. Progress is the denoising steps' share (5% to 95%); a job that is
deleted while it runs, or a server that stops, ends it at the next step. A job that fails (bad input
found late, NaN latents, out of memory) fails alone: the worker goes on with the next.
"""

from __future__ import annotations

import collections
import gc
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..app.config import GenerationConfig
from ..app.inputs import read_conditioning
from ..app.outputs import OutputLock
from ..app.runner import LoadedModel
from ..app.timer import PhaseTimer
from ..errors import InputError
from .api_errors import queue_full
from .metrics import Metrics
from .store import COMPLETED, FAILED, IN_PROGRESS, JobStore

logger = logging.getLogger(__name__)

FIRST_STEP_PROGRESS, LAST_STEP_PROGRESS = 5, 95


class JobStopped(Exception):
    """Raised at a step boundary: the job was deleted, or the server is stopping."""


@dataclass
class Work:
    """A job waiting for the worker: its request and how many of its requests' outcomes a waiter reads."""

    job_id: str
    config: GenerationConfig
    done: threading.Event = field(default_factory=threading.Event)


class JobQueue:
    def __init__(self, loaded: LoadedModel, store: JobStore, size: int, metrics: Metrics) -> None:
        self.loaded, self.store, self.size, self.metrics = loaded, store, size, metrics
        self._waiting: collections.deque[Work] = collections.deque()
        self._condition = threading.Condition()
        self._running: Work | None = None
        self._cancelled: set[str] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="cosmos3-jobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, works: list[Work]) -> None:
        """Queue `works` together, or none of them (429) when the queue has no room for all."""
        with self._condition:
            if self._stopping:
                raise queue_full(self.size)
            if len(self._waiting) + len(works) > self.size:
                raise queue_full(self.size)
            self._waiting.extend(works)
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
            left = [work.job_id for work in self._waiting]
            for work in self._waiting:
                self.store.fail(work.job_id, "server_stopped", "the server stopped before this job ran")
                work.done.set()
            self._waiting.clear()
            if self._running is not None:
                left.append(self._running.job_id)
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return left

    def _next(self) -> Work | None:
        with self._condition:
            while not self._waiting and not self._stopping:
                self._condition.wait()
            if self._stopping:
                return None
            self._running = self._waiting.popleft()
            return self._running

    def _work(self) -> None:
        while (work := self._next()) is not None:
            try:
                self._run(work)
            except BaseException:  # never leave a job in progress: the worker goes on with the next
                logger.exception("job %s failed unexpectedly", work.job_id)
                self.store.fail(work.job_id, "server_error", "the server failed while running this job")
            finally:
                with self._condition:
                    self._running = None
                    self._cancelled.discard(work.job_id)
                work.done.set()

    def _run(self, work: Work) -> None:
        job_id, config = work.job_id, work.config
        if not self.store.update(job_id, status=IN_PROGRESS, progress=1):
            self.store.remove_files(job_id)  # deleted between the queue and here
            return
        timer = PhaseTimer(self.loaded.device)
        started = last = time.perf_counter()

        def on_step(index: int) -> None:
            nonlocal last
            now = time.perf_counter()
            self.metrics.step(now - last)
            last = now
            if job_id in self._cancelled or self._stopping:
                raise JobStopped
            share = (index + 1) / config.steps
            self.store.update(
                job_id, progress=FIRST_STEP_PROGRESS + round((LAST_STEP_PROGRESS - FIRST_STEP_PROGRESS) * share)
            )

        try:
            conditioning = read_conditioning(config.image, config.video, config.condition_frames)
            with OutputLock(config.output):
                self.loaded.write(config, timer, conditioning=conditioning, progress=False, on_step=on_step)
        except JobStopped:
            self._ended(job_id, "server_stopped", "the server stopped while this job ran")
            return
        except (InputError, OSError) as error:
            message = str(error) if isinstance(error, InputError) else f"{error.strerror or error}"
            self._ended(job_id, "generation_failed", message)
            return
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            self._ended(job_id, "out_of_memory", "the GPU ran out of memory for this request; ask for fewer frames")
            return
        seconds = time.perf_counter() - started
        stats = self.metrics.finished(timer, seconds, self.loaded.device)
        recorded = self.store.update(
            job_id, status=COMPLETED, progress=100, completed_at=int(time.time()), file=config.output.name, stats=stats
        )
        if not recorded:  # deleted as it finished
            self.store.remove_files(job_id)

    def _ended(self, job_id: str, code: str, message: str) -> None:
        """A job that did not finish: gone if it was deleted, else failed with `code`."""
        self.metrics.failed()
        job = self.store.get(job_id)
        if job_id in self._cancelled or job is None:
            self.store.remove_files(job_id)
        elif job.status != FAILED:
            self.store.fail(job_id, code, message)
