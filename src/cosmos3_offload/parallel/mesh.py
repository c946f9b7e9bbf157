"""The process groups of one `ParallelLayout` over torch.distributed, started from torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL between GPUs, gloo on
the CPU. Rank r runs CFG branch r // sequence and holds row block r % sequence of its tokens.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import InputError, first_line
from ..planning.parallel import ParallelLayout
from .ulysses import SequenceShards

logger = logging.getLogger(__name__)

# How long a collective may wait for the others. Long: ranks meet again only after the load, and
# the process that fills the shared host copy of a large checkpoint takes minutes; a rank that dies
# is noticed sooner by its launcher (torchrun or --gpus), which stops the rest.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# How long a rank waits at the rendezvous for the others to join. Every rank gets there after the
# same checks (seconds, a minute on a cold machine); one that has not come by then was never started
# or has died before it, and waiting longer only holds this one.
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)
REDUCE_BLOCK_BYTES = 64 << 20  # what `sum_to_leader` holds on the device at once


@dataclass(frozen=True)
class Environment:
    """What a launcher tells each process about itself."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def read(cls) -> Environment:
        """From torchrun's variables; a single process without them."""

        def number(name: str, default: int) -> int:
            text = os.environ.get(name, "").strip()
            if not text:
                return default
            try:
                return int(text)
            except ValueError:
                raise InputError(f"{name}={text!r} is not a whole number; launch with torchrun or --gpus N") from None

        world = number("WORLD_SIZE", 1)
        rank = number("RANK", 0)
        local_rank = number("LOCAL_RANK", rank)
        local_world = number("LOCAL_WORLD_SIZE", world)
        if world < 1 or not 0 <= rank < world or not 0 <= local_rank < local_world <= world:
            raise InputError(
                f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local_world} "
                "do not describe a process group; launch with torchrun or --gpus N"
            )
        if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            raise InputError(
                f"WORLD_SIZE={world} but MASTER_ADDR and MASTER_PORT are not set: no launcher started these "
                "processes; use torchrun or --gpus N (or unset WORLD_SIZE)"
            )
        return cls(rank, world, local_rank, local_world)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class ProcessMesh:
    """This process's place in the layout and the groups it exchanges over."""

    def __init__(self, layout: ParallelLayout, environment: Environment, run_name: str):
        self.layout = layout
        self.environment = environment
        self.rank = environment.rank
        self.branch = layout.branch_of(self.rank)
        self.run_name = run_name  # the same on every rank: names what the ranks share on the host
        s = layout.sequence
        # Every rank creates every group, in the same order (torch.distributed requires it).
        self.sequence: SequenceShards | None = None
        for branch in range(layout.cfg):
            group = dist.new_group(list(range(branch * s, (branch + 1) * s)))
            if branch == self.branch and s > 1:
                self.sequence = SequenceShards(group, s, layout.sequence_rank_of(self.rank))
        self.cfg_group = None
        for j in range(s):
            group = dist.new_group([j + branch * s for branch in range(layout.cfg)])
            if j == layout.sequence_rank_of(self.rank):
                self.cfg_group = group

    @classmethod
    def start(cls, layout: ParallelLayout, environment: Environment, device: torch.device) -> ProcessMesh:
        """Join the process group and build the layout's groups. Blocks until every rank has joined, at most
        RENDEZVOUS_TIMEOUT (then an InputError naming what it waited for); SIGINT and SIGTERM still end it."""
        if environment.world_size != layout.world_size:
            raise InputError(
                f"the layout {layout.describe()!r} needs {layout.world_size} processes, "
                f"but WORLD_SIZE={environment.world_size}"
            )
        address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        logger.info("rank %d of %d: waiting at %s for the others", environment.rank, environment.world_size, address)
        joined = _wait_interruptibly(lambda: cls._join(layout, environment, device), RENDEZVOUS_TIMEOUT)
        if joined is None:
            raise InputError(
                f"rank {environment.rank} of {environment.world_size} waited {RENDEZVOUS_TIMEOUT.total_seconds():g} s "
                f"at {address} (MASTER_ADDR:MASTER_PORT) for the other {environment.world_size - 1} rank(s) to join, "
                "and not all came; start every rank with the same MASTER_ADDR and MASTER_PORT; nothing was written"
            )
        return joined

    @classmethod
    def _join(cls, layout: ParallelLayout, environment: Environment, device: torch.device) -> ProcessMesh:
        """Join the process group and build the layout's groups: blocks, in C++, until every rank has joined."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(
                backend,
                rank=environment.rank,
                world_size=environment.world_size,
                timeout=COLLECTIVE_TIMEOUT,
                device_id=device if device.type == "cuda" else None,
            )
        except dist.DistNetworkError as error:  # MASTER_PORT taken, MASTER_ADDR unreachable
            address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise InputError(f"the ranks cannot meet at {address}: {first_line(error)}") from None
        name = [secrets.token_hex(6) if environment.rank == 0 else None]
        dist.broadcast_object_list(name, src=0)
        return cls(layout, environment, name[0])

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes the output and prints the report."""
        return self.rank == 0

    @property
    def host_leader(self) -> bool:
        """Local rank 0: the one that fills this host's shared copy of the weights."""
        return self.environment.local_rank == 0

    def wait_for_all(self) -> None:
        """Blocks until every rank gets here."""
        dist.barrier()

    def broadcast_from_leader(self, value: object) -> object:
        """The leader's `value` (any picklable value) on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """This rank's branch tensor -> [conditional, unconditional] on every rank of its CFG group
        (the one exchange a step CFG-parallel makes); [x] without CFG-parallel."""
        if self.layout.cfg == 1:
            return [x]
        parts = [torch.empty_like(x) for _ in range(self.layout.cfg)]
        dist.all_gather(parts, x.contiguous(), group=self.cfg_group)
        return parts

    def sum_to_leader(self, x: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """The sum over every rank of the host tensor x, on the leader (None elsewhere). Sent in blocks
        of rows through `device` (NCCL reduces device tensors; gloo reduces these host tensors as they are)."""
        through = device if dist.get_backend() == "nccl" else torch.device("cpu")
        rows = max(1, REDUCE_BLOCK_BYTES // max(1, x[0].numel() * x.element_size()))
        for start in range(0, x.shape[0], rows):
            block = x[start : start + rows].to(through)
            dist.reduce(block, dst=0, op=dist.ReduceOp.SUM)
            if self.leader:
                x[start : start + rows].copy_(block)
        return x if self.leader else None

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _wait_interruptibly(join: Callable[[], ProcessMesh], timeout: timedelta) -> ProcessMesh | None:
    """`join()` on a helper thread while this one waits, at most `timeout` (None then). Blocks the host.

    The rendezvous blocks in C++, where Python runs no signal handler: called here, SIGINT and SIGTERM
    would wait for it. This thread's wait is interruptible, so their handlers run (the CLI ends in one
    line, 130 or 143) and the helper, a daemon still blocked, ends with the process."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["mesh"] = join()
        except BaseException as error:  # raised again on the waiting thread
            outcome["error"] = error

    helper = threading.Thread(target=run, name="rendezvous", daemon=True)
    helper.start()
    helper.join(timeout.total_seconds())
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("mesh")
