"""The generator deployment: a Ray Serve replica holding one loaded model, running one job at a time.

Each replica opens the model as the server was asked (the `LoadedModel` the serve process opened, not yet
loaded) and loads it once, in its `__init__`. A job arrives as a `ReplicaJob`: the request as the server
checked it and its conditioning files' bytes, so a replica on another node needs no shared folder. `run` is
an async generator (the run in a thread of its own) the server reads as a stream
(`handle.options(stream=True)`): first `Started` (which replica, its process), then the run's events
(app/events.py `RunEvent`) and each preview's bytes as they come, and last `Finished` (the output files' bytes
and the job's stats) or `Failed` (a code and message, as the queue names them). Nothing is kept on the
replica: it works in a temporary folder removed after each job.

A deleted job, or a stopping server, is told through `CancelBoard`, a small named actor the replica asks at
every step and decode piece; Ray's own cancellation is not used, since it cannot interrupt the run's thread
inside a step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve

from ...app.config import GenerationConfig
from ...app.events import RunEvents
from ...app.inputs import read_conditioning
from ...app.outputs import actions_beside
from ...app.runner import LoadedModel
from ...app.timer import PhaseTimer
from ...offload.node_share import NodeShare
from ..job_events import DecodePace
from ..job_previews import PREVIEW_FILE, JobPreviews
from ..metrics import Metrics
from ..queue import JobStopped, failure
from .ranks import LOST, ReplicaRanks

logger = logging.getLogger(__name__)

INPUT_FIELDS = ("image", "video", "actions")  # GenerationConfig's conditioning files, sent as bytes


@ray.remote(num_cpus=0)
class CancelBoard:
    """The ids of jobs deleted (or stopped) while they run: the server adds one, the replica running it asks."""

    def __init__(self) -> None:
        self.cancelled: set[str] = set()

    def cancel(self, job_id: str) -> None:
        self.cancelled.add(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        return job_id in self.cancelled

    def forget(self, job_id: str) -> None:
        self.cancelled.discard(job_id)


@dataclass(frozen=True)
class ReplicaJob:
    """One job as the server sends it: its id and kind, the checked request (its paths the server's), and
    {GenerationConfig field: (file name, bytes)} of its conditioning inputs."""

    job_id: str
    kind: str
    config: GenerationConfig
    inputs: dict[str, tuple[str, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class Started:
    """The replica that took the job: its Serve id, process id and Ray node."""

    replica: str
    pid: int
    node: str


@dataclass(frozen=True)
class PreviewBytes:
    """The job's preview image, whole, as it was just rewritten."""

    data: bytes


@dataclass(frozen=True)
class Finished:
    """The job's output files ({name: bytes}: the video or image, an action run's .npy and .json) and stats."""

    files: dict[str, bytes]
    stats: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    """The job ended without a file: the code and message the queue fails it with (`stopped`: it was told to)."""

    code: str
    message: str
    stopped: bool = False


_DONE = object()  # the run's thread has put its last item
_STUCK = object()  # the replica's ranks were lost mid-job
RANKS_POLL_SECONDS = 1.0  # how often a replica of several ranks looks for a lost one while a job runs
EXIT_DELAY_SECONDS = 1.0  # a broken replica's wait, after its last job's result, before its process ends


class Generator:
    """One replica: the model loaded once, then `run` for each job (Serve sends one at a time)."""

    def __init__(
        self,
        loaded: LoadedModel,
        board: Any,
        preview_kind: str,
        preview_every: int | None,
        share: str | None = None,
        ranks: int = 1,
    ) -> None:
        """`share`: the name of the host copy this node's replicas share (cluster.replica_share_name); the first
        replica of a node to load fills it, the others (and one Serve restarts) map it. `ranks`: the replica's GPUs,
        one rank each (ranks.py; this process is the leader)."""
        # A copy: Serve pickles its init arguments again after __init__ (to find handles in them), and the loaded
        # weights and a process group must not be among them.
        loaded = dataclasses.replace(loaded)
        self.loaded, self.board = loaded, board
        self.ranks: ReplicaRanks | None = None
        if ranks > 1:
            self.ranks = ReplicaRanks(loaded, ranks)  # the ranks load the model together
        else:
            if share is not None:
                loaded.node_share = NodeShare(share)
            loaded.load(PhaseTimer(loaded.device), progress=False)
        self.previews = None
        if preview_kind != "none":
            self.previews = JobPreviews(loaded, kind=preview_kind, every=preview_every)
            with tempfile.TemporaryDirectory(prefix="cosmos3-replica-") as folder:
                self.previews.check(Path(folder))  # the fast map fitted before the first job
        self._decode_pace = DecodePace()
        context = serve.get_replica_context()
        self.started = Started(context.replica_id.unique_id, os.getpid(), ray.get_runtime_context().get_node_id())
        logger.info("replica %s loaded its model", self.started.replica)

    def check_health(self) -> None:
        """Serve's periodic check: a replica whose ranks parted ways or died is replaced."""
        problem = None if self.ranks is None else self.ranks.health()
        if problem is not None:
            raise RuntimeError(problem)

    async def run(self, job: ReplicaJob) -> AsyncIterator[Any]:
        """Run `job`; yields Started, then the run's RunEvent and PreviewBytes, and last Finished or Failed.
        The run has a thread of its own: the replica's event loop stays free for Ray's health checks."""
        yield self.started
        if self.ranks is not None and self.ranks.health() is not None:  # until Serve replaces this replica
            yield Failed(*LOST)
            return
        items: queue.Queue = queue.Queue()
        dropped = threading.Event()  # the server stopped reading: stop at the next step
        folder = Path(tempfile.mkdtemp(prefix="cosmos3-job-"))
        thread = threading.Thread(target=self._run, args=(job, folder, items, dropped), daemon=True)
        thread.start()
        stuck = False
        try:
            while (item := await asyncio.to_thread(self._next, items)) is not _DONE:
                if item is _STUCK:  # a rank died or failed alone: this rank may wait in a collective for good
                    stuck = True
                    yield Failed(*LOST)
                    return
                yield item
        finally:
            dropped.set()
            if not stuck:
                await asyncio.to_thread(thread.join)
            shutil.rmtree(folder, ignore_errors=True)
            if self.ranks is not None and self.ranks.broken:
                _exit_soon()  # Serve starts a replica with fresh ranks in its place; jobs wait for it meanwhile

    def _next(self, items: queue.Queue) -> Any:
        """The run's next item, or _STUCK once the replica's ranks are lost mid-job. Blocks."""
        while True:
            try:
                return items.get(timeout=RANKS_POLL_SECONDS if self.ranks is not None else None)
            except queue.Empty:
                if self.ranks.lost():
                    return _STUCK

    def _run(self, job: ReplicaJob, folder: Path, items: queue.Queue, dropped: threading.Event) -> None:
        try:
            items.put(self._write(job, folder, items, lambda: self._cancelled(job.job_id, dropped)))
        except BaseException as error:
            code, message = failure(error)
            if code == "server_error":
                logger.error("job %s failed unexpectedly", job.job_id, exc_info=error)
            elif code == "out_of_memory":  # this replica's GPU: the next job starts with its cache empty
                gc.collect()
                torch.cuda.empty_cache()
            items.put(Failed(code, message, stopped=isinstance(error, JobStopped)))
        finally:
            items.put(_DONE)

    def _write(self, job: ReplicaJob, folder: Path, items: queue.Queue, cancelled: Callable[[], bool]) -> Finished:
        """The job's files made in `folder` (its inputs saved there first) and read back whole."""
        config = _here(job, folder)
        shape = (config.frames, config.height, config.width)
        events = RunEvents(items.put, decode_seconds=self._decode_pace.guess(*shape))
        timer = PhaseTimer(self.loaded.device, events=events)
        started = time.perf_counter()
        preview = None
        if self.previews is not None and job.kind == "video":
            shown = self.previews.for_job(folder)
            preview = None if shown is None else SentPreview(shown, folder / PREVIEW_FILE, items)

        def write(on_step: Callable[[int], None], on_decode_tile: Callable[[], None] | None) -> None:
            conditioning = read_conditioning(config)
            self.loaded.write(
                config,
                timer,
                conditioning=conditioning,
                progress=False,
                on_step=on_step,
                on_decode_tile=on_decode_tile,
                preview=preview,
            )

        def check() -> None:
            if cancelled():
                raise JobStopped

        if self.ranks is None:
            write(lambda index: check(), check)
        else:  # every rank stops at the same step; the decode, split between them, runs to its end
            self.ranks.run(config, lambda on_step: write(on_step, None), cancelled)
            check()
        self._decode_pace.learn(*shape, events.last_decode_seconds)
        stats = Metrics().finished(timer, time.perf_counter() - started, self.loaded.device)
        stats["replica"], stats["node"] = self.started.replica, self.started.node
        made = [config.output, *(path for path in actions_beside(config.output) if path.is_file())]
        return Finished({path.name: path.read_bytes() for path in made}, stats)

    def _cancelled(self, job_id: str, dropped: threading.Event) -> bool:
        return dropped.is_set() or ray.get(self.board.is_cancelled.remote(job_id))  # waits on one small actor call


def _exit_soon() -> None:
    """End this replica's process once the job's last item has had time to reach the server."""
    logger.error("the replica's ranks parted ways mid-job; the replica exits and Serve replaces it")
    threading.Timer(EXIT_DELAY_SECONDS, os._exit, args=(1,)).start()


class SentPreview:
    """A job's previewer whose every image is also sent to the server as bytes."""

    def __init__(self, preview: Any, path: Path, items: queue.Queue) -> None:
        self.preview, self.path, self.items, self.kind = preview, path, items, preview.kind

    def due(self, index: int, steps: int) -> bool:
        return self.preview.due(index, steps)

    def show(self, index: int, steps: int, denoised: Any, placed: Any) -> None:
        self.preview.show(index, steps, denoised, placed)
        if self.path.is_file():
            self.items.put(PreviewBytes(self.path.read_bytes()))


def _here(job: ReplicaJob, folder: Path) -> GenerationConfig:
    """The job's request with its inputs saved in `folder` and its output there, under the server's names."""
    paths = {}
    for name, (file_name, data) in job.inputs.items():
        assert name in INPUT_FIELDS, name
        path = folder / Path(file_name).name
        path.write_bytes(data)
        paths[name] = path
    return dataclasses.replace(job.config, **paths, output=folder / job.config.output.name)
