"""A replica of K GPUs (`serve --gpus-per-replica K`): K ranks running each job together, CFG-parallel and Ulysses.

The replica's own process is rank 0, the leader: it talks to the server, sends the events and previews and
writes the output. It starts the other K-1 ranks itself, as `generate --gpus K` starts its workers (the
torchrun environment: rank i drives the i-th GPU Ray gave the replica, or runs on the CPU over gloo), but with
multiprocessing's spawn, each tied to the replica by Linux's parent-death signal: a replica that dies (or that
Serve replaces) takes its ranks with it. The ranks join one process group, load the model together (one host
copy for the replica's ranks: offload/shared.py) and then wait for jobs, which the leader sends each of them
through a pipe. A job runs on every rank in its own layout (app/distributed.py `layout_for`: CFG-parallel with
guidance, else sequence-parallel); the groups of a layout are made the first time a job needs it, on every rank
in the same order, since every rank sees the same jobs in the same order.

Stopping: a deleted job stops on every rank at the same step: after each step the leader's decision is
broadcast. The decode is not interrupted (the ranks share its tiles); a job deleted there is dropped after it.

A rank that fails or dies mid-job may leave the others waiting in a collective for good, so the replica is then
`broken`: the job fails, the replica's health check fails, and Serve replaces it with fresh ranks. A job that
ends the same way on every rank (done, stopped, or the same refusal) leaves the replica as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ...app.config import GenerationConfig
from ...app.distributed import layout_for, rank_device, start_mesh
from ...app.inputs import read_conditioning
from ...app.runner import LoadedModel
from ...app.timer import PhaseTimer
from ...app.workers import free_port, worker_environment
from ...loading.components import model_configs
from ...parallel.mesh import Environment, ProcessMesh
from ...planning.parallel import ParallelLayout
from ..queue import JobFailed, JobStopped, failure

logger = logging.getLogger(__name__)

WATCH_SECONDS = 1.0  # how often a rank looks for its replica
STUCK_SECONDS = 30.0  # after a rank failed mid-job, for the leader's part to end too before the replica is broken
REPLY_SECONDS = 60.0  # after the leader's part of a job, for the other ranks to say how theirs ended
LOST = ("replica_lost", "a GPU rank of the replica running this job stopped; send the request again")


@dataclasses.dataclass(frozen=True)
class RankReply:
    """How a rank's part of a job ended: `done`, `stopped` (told to), `failed` (with the job's code and
    message) or `lost` (the rank's process is gone)."""

    rank: int
    outcome: str
    code: str = ""
    message: str = ""


class ReplicaRanks:
    """The leader's side: the other ranks' processes, their pipes, and the meshes of the layouts seen so far."""

    def __init__(self, loaded: LoadedModel, count: int) -> None:
        """Start ranks 1..count-1, join them as rank 0 and load the model together; `loaded` (this process's) then
        drives this rank's GPU and holds the first layout's mesh."""
        self.loaded, self.count = loaded, count
        self.transformer_config = model_configs(loaded.checkpoint, loaded.model)[0]
        port = free_port()
        context = multiprocessing.get_context("spawn")
        self.processes: list[Any] = []
        self.pipes: list[Any] = []
        for rank in range(1, count):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_rank_main, args=(theirs, loaded, rank, count, port), name=f"rank{rank}", daemon=True
            )
            process.start()
            theirs.close()
            self.processes.append(process)
            self.pipes.append(ours)
        self.replies: queue.Queue[RankReply] = queue.Queue()
        self.troubled: float | None = None  # when a rank failed or died in this job: the others may be stuck
        self.broken = False
        for rank, pipe in enumerate(self.pipes, start=1):
            threading.Thread(target=self._listen, args=(rank, pipe), name=f"rank{rank}-replies", daemon=True).start()
        os.environ.update(worker_environment(0, count, port))
        self.group = RankGroup(loaded, count, self.transformer_config)

    def run(self, config: GenerationConfig, write: Callable[[Callable[[int], None]], Any], stop: Callable[[], bool]):
        """`write(on_step)` on this rank with `config` on every other: `stop()` is asked after each step here and
        its answer is every rank's. Returns what `write` returned, or raises: JobStopped for a stop, `LOST` when
        another rank died or did not end its part (the replica is broken then), else what this rank raised, or
        the failure of a rank that failed alone (broken too). Returns once every rank has ended its part."""
        self._drain()
        for pipe in self.pipes:
            pipe.send(config)
        try:
            self.group.use(config)
            result = write(lambda index: self.group.stop_together(stop()))
        except BaseException:
            if any(reply.outcome == "lost" for reply in self._wait_for_ranks()):
                raise JobFailed(*LOST) from None
            raise
        for reply in self._wait_for_ranks():
            if reply.outcome != "done":  # this rank finished, that one did not: they parted ways
                self.broken = True
                raise _failure_of(reply)
        return result

    def lost(self) -> bool:
        """Whether a rank died during the job now running, or failed STUCK_SECONDS ago while the leader's part goes
        on (a rank that refused the job as the leader will is not lost). Never blocks; the replica is broken then."""
        dead = any(not process.is_alive() for process in self.processes)
        if not dead and (self.troubled is None or time.monotonic() - self.troubled < STUCK_SECONDS):
            return False
        self.broken = True
        return True

    def health(self) -> str | None:
        """Why this replica cannot take jobs (None: it can)."""
        if self.broken:
            return "a rank failed mid-job; the replica's ranks may be stuck in a collective"
        dead = [process.name for process in self.processes if not process.is_alive()]
        return f"{', '.join(dead)} of the replica died" if dead else None

    def _listen(self, rank: int, pipe: Any) -> None:
        """Rank `rank`'s replies into `replies`, and `lost` once its pipe closes (its process is gone)."""
        while True:
            try:
                reply = pipe.recv()
            except (EOFError, OSError):
                self.troubled = time.monotonic()
                self.replies.put(RankReply(rank, "lost"))
                return
            if reply.outcome == "failed":
                self.troubled = time.monotonic()
            self.replies.put(reply)

    def _drain(self) -> None:
        """Forget replies left from a job that ended without them (its ranks were declared lost)."""
        self.troubled = None
        while True:
            try:
                self.replies.get_nowait()
            except queue.Empty:
                return

    def _wait_for_ranks(self) -> list[RankReply]:
        """Every other rank's reply for this job; `lost` for one that gives none in REPLY_SECONDS (the replica is
        broken then, as it is when a rank is lost)."""
        replies: list[RankReply] = []
        while len(replies) < len(self.pipes):
            try:
                replies.append(self.replies.get(timeout=REPLY_SECONDS))
            except queue.Empty:
                replies.append(RankReply(0, "lost"))
                break
        if any(reply.outcome == "lost" for reply in replies):
            self.broken = True
        return replies


class RankGroup:
    """One rank's place in the replica: its process group (joined once) and a mesh per layout (made when first used)."""

    def __init__(self, loaded: LoadedModel, count: int, transformer_config: dict) -> None:
        """Join the other ranks and load the model with them (every rank calls this at its start)."""
        self.loaded, self.count, self.transformer_config = loaded, count, transformer_config
        loaded.device = rank_device(torch.device(loaded.device.type))
        loaded.node_share = None  # the ranks share their own host copy (the mesh's)
        first = ParallelLayout.for_ranks(count, guidance=True)
        mesh = start_mesh(first, loaded.device)
        assert mesh is not None
        self.environment, self.run_name = mesh.environment, mesh.run_name
        self.meshes: dict[ParallelLayout, ProcessMesh] = {mesh.layout: mesh}
        loaded.mesh = mesh
        loaded.load(PhaseTimer(loaded.device))

    def use(self, config: GenerationConfig) -> None:
        """Run the next job in `config`'s layout (the same on every rank: the groups are made in the same order)."""
        layout = layout_for(config, self.transformer_config, self.count, "auto")
        layout = dataclasses.replace(layout, on_cpu=self.loaded.device.type == "cpu")
        if layout not in self.meshes:
            self.meshes[layout] = ProcessMesh(layout, self.environment, self.run_name)
        self.loaded.mesh = self.meshes[layout]

    def stop_together(self, stop: bool) -> None:
        """The leader's `stop` on every rank (the others pass anything): JobStopped everywhere when it is true."""
        if self.loaded.mesh.broadcast_from_leader(stop):
            raise JobStopped


def _failure_of(reply: RankReply) -> BaseException:
    if reply.outcome == "stopped":
        return JobStopped()
    if reply.outcome == "failed" and reply.code:
        return JobFailed(reply.code, reply.message)
    return JobFailed(*LOST)


def _rank_main(pipe: Any, loaded: LoadedModel, rank: int, count: int, port: int) -> None:
    """Rank `rank` of a replica: join, load, then run each job the leader sends until its pipe closes."""
    _die_with_parent()
    os.environ.update(worker_environment(rank, count, port))
    logging.basicConfig(level=logging.INFO, format=f"rank {rank}: %(levelname)s %(name)s: %(message)s")
    group = RankGroup(loaded, count, model_configs(loaded.checkpoint, loaded.model)[0])
    assert Environment.read().rank == rank
    while True:
        try:
            config = pipe.recv()
        except (EOFError, OSError):  # the leader is gone
            return
        try:
            group.use(config)
            loaded.write(
                config,
                PhaseTimer(loaded.device),
                conditioning=read_conditioning(config),
                progress=False,
                on_step=lambda index: group.stop_together(False),
            )
            reply = RankReply(rank, "done")
        except JobStopped:
            reply = RankReply(rank, "stopped")
        except BaseException as error:
            code, message = failure(error)
            logger.error("rank %d: the job failed", rank, exc_info=error)
            reply = RankReply(rank, "failed", code, message)
        try:
            pipe.send(reply)
        except (BrokenPipeError, OSError):
            return


def _die_with_parent() -> None:
    """End this process within a second of the replica's (its parent's) death, even inside a collective: a thread
    watches the parent's id (Linux's parent-death signal follows the thread that started a child, not its process)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
