"""The ingress side of the replicas: the queue's `Runner` that hands each job to a free replica.

The queue runs one worker per replica; each takes the next job of the FIFO and calls the deployment, which
Serve routes to a replica with no job (`max_ongoing_requests=1`), so the jobs wait in our queue (its bound and
429 as ever), never in a second one. The job's conditioning files go as bytes; what comes back is streamed
into the job as it runs: its events to its feed and progress, each preview written whole over the job's
preview file, and at the end its output files, each written whole (a temporary file renamed over it, the
video last) in the job's folder, so a replica on another node needs no shared storage.

A replica that dies while it runs a job (its process killed, out of host memory) fails that job with code
`replica_lost`; it is not run again, since a request that killed one replica would likely kill the next, and
its client may send it again. Serve starts a new replica in its place; the other jobs go on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from ...app.events import Listener
from ...app.outputs import OutputLock
from ..job_previews import PREVIEW_FILE
from ..metrics import Metrics
from ..queue import JobFailed, JobStopped, Work
from .cluster import Cluster
from .deployment import INPUT_FIELDS, Failed, Finished, PreviewBytes, ReplicaJob, Started

logger = logging.getLogger(__name__)

REPLICA_LOST = (
    "replica_lost",
    "the replica running this job stopped (its process died or ran out of memory); send the request again",
)
# Ray's errors for a replica whose process is gone (the others are the replica's own failures).
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ActorUnavailableError)


class ReplicaRunner:
    """Runs the queue's jobs on the `cluster`'s replicas, one worker (and one job at a time) per replica."""

    def __init__(self, cluster: Cluster, metrics: Metrics) -> None:
        self.cluster, self.metrics = cluster, metrics
        self.workers = cluster.replicas

    def run(self, work: Work, folder: Path, heard: Listener, check_stopped: Callable[[], None]) -> dict[str, Any]:
        """Run `work` on a free replica and write its files in `folder`; its stats (with `replica`)."""
        job = ReplicaJob(work.job_id, work.kind, work.config, _inputs(work))
        started: Started | None = None
        try:
            for item in self.cluster.handle.options(stream=True).run.remote(job):
                if isinstance(item, Started):
                    started = item
                    self.metrics.replica_busy(item.replica, True)
                elif isinstance(item, PreviewBytes):
                    _write_preview(folder / PREVIEW_FILE, item.data)
                elif isinstance(item, Finished):
                    _write_outputs(folder, work.config.output, item.files)
                    self.metrics.record(item.stats)
                    return item.stats
                elif isinstance(item, Failed):
                    raise JobStopped if item.stopped else JobFailed(item.code, item.message)
                else:
                    heard(item)
        except LOST as error:
            where = "before it started" if started is None else f"on replica {started.replica} (pid {started.pid})"
            logger.error("job %s: its replica died %s: %s", work.job_id, where, error)
            raise JobFailed(*REPLICA_LOST) from None
        finally:
            if started is not None:
                self.metrics.replica_busy(started.replica, False)
            self.cluster.board.forget.remote(work.job_id)
        raise JobFailed(*REPLICA_LOST)  # the stream ended without its result

    def cancel(self, job_id: str) -> None:
        """Tell the replica running `job_id` to stop at its next step or decode piece (never blocks)."""
        self.cluster.board.cancel.remote(job_id)


def _inputs(work: Work) -> dict[str, tuple[str, bytes]]:
    """The job's conditioning files as the replica takes them: {field: (file name, bytes)}."""
    inputs = {}
    for name in INPUT_FIELDS:
        path = getattr(work.config, name)
        if path is not None:
            inputs[name] = (Path(path).name, Path(path).read_bytes())
    return inputs


def _write_outputs(folder: Path, output: Path, files: dict[str, bytes]) -> None:
    """The job's files written whole in `folder` under the output's lock, the output itself last."""
    with OutputLock(output):
        for name in sorted(files, key=lambda name: name == output.name):
            _write_whole(folder / Path(name).name, files[name])


def _write_preview(path: Path, data: bytes) -> None:
    """A preview that cannot be written is logged; the job goes on without it (as a local one's)."""
    try:
        _write_whole(path, data)
    except OSError:
        logger.exception("the preview in %s could not be written; the job goes on", path.parent.name)


def _write_whole(path: Path, data: bytes) -> None:
    """`data` in `path`, whole or not at all: a temporary file beside it, synced, renamed over it."""
    part = path.with_name(f".{path.name}.part")
    try:
        with open(part, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
