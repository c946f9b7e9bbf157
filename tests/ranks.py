"""Run a function on several CPU processes joined by torch.distributed (gloo), as torchrun would start
them: each gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and what it returns comes back.

The ranks are forked from the test process, so they start with torch, diffusers and the test module already
imported (a spawned rank spends seconds importing them again). A fork is safe here: the parent holds no process
group and no CUDA context, and each rank runs torch single-threaded (OpenMP's pool does not survive a fork, and
one thread never asks for it). A parent that has initialized CUDA spawns its ranks, since a forked child cannot
use CUDA."""

from __future__ import annotations

import multiprocessing
import os
import traceback
from pathlib import Path
from typing import Any

import torch

from cosmos3_offload.app.workers import free_port, worker_environment


def _child(rank: int, world: int, port: int, folder: str, target, args) -> None:
    os.environ.update(worker_environment(rank, world, port))  # what `generate --gpus` gives its workers
    torch.set_num_threads(1)  # CI has two cores for every rank
    path = Path(folder) / f"rank{rank}.pt"
    try:
        torch.save({"result": target(*args)}, path)
    except BaseException as error:  # the parent reads it; the exit status says it failed
        torch.save({"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}, path)
        os._exit(3)


def start_method() -> str:
    """'fork' while this process has no CUDA context, else 'spawn'."""
    return "spawn" if torch.cuda.is_initialized() else "fork"


def run_ranks(target, world: int, folder: Path, *args: Any, timeout: float = 240.0) -> list[dict]:
    """target(*args) on `world` ranks; each rank's {'result': ...} or {'error': ...}, with 'exitcode'."""
    context = multiprocessing.get_context(start_method())
    port = free_port()
    processes = [
        context.Process(target=_child, args=(rank, world, port, str(folder), target, args)) for rank in range(world)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout)
    hung = [p for p in processes if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} of {world} ranks still running after {timeout} s"
    outcomes = []
    for rank, p in enumerate(processes):
        path = folder / f"rank{rank}.pt"
        outcome = torch.load(path, weights_only=False) if path.exists() else {"error": "no result"}
        outcomes.append({**outcome, "exitcode": p.exitcode})
    return outcomes
