"""A run over several processes: which layout, which GPU this rank drives, and the checks every rank
makes before any of them joins the group (so a bad request stops all of them the same way).

Launched by torchrun (or `generate --gpus N`, app/workers.py, which sets the same environment), every
rank parses the same command line and runs the same checks; a check that fails fails on every rank
before the first collective, so no rank waits for another that has already left.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import InputError
from ..model.geometry import generator_tokens
from ..parallel.mesh import Environment, ProcessMesh
from ..planning.parallel import SINGLE, ParallelLayout
from .config import GenerationConfig


def parallel_layout(config: GenerationConfig, transformer_config: dict, cfg_parallel: str = "auto") -> ParallelLayout:
    """The layout of the processes this one was launched with (SINGLE without a launcher), checked
    against the model's heads and the request's tokens."""
    environment = Environment.read()
    if not environment.distributed:
        if cfg_parallel == "on":
            raise InputError("--cfg-parallel on needs two or more processes: add --gpus 2 (or launch with torchrun)")
        return SINGLE
    return layout_for(config, transformer_config, environment.world_size, cfg_parallel)


def layout_for(config: GenerationConfig, transformer_config: dict, ranks: int, cfg_parallel: str) -> ParallelLayout:
    """The layout of `ranks` processes for this request and model, or an InputError saying why none fits."""
    layout = ParallelLayout.for_ranks(ranks, guidance=config.uses_guidance, cfg_parallel=cfg_parallel)
    layout.check_model(
        heads=transformer_config["num_attention_heads"], kv_heads=transformer_config["num_key_value_heads"]
    )
    layout.check_tokens(generator_tokens(config.frames, config.height, config.width))
    return layout


def check_replica_ranks(transformer_config: dict, ranks: int) -> None:
    """Refuse `ranks` processes per serve replica for a model whose heads they cannot share: a job with guidance
    runs CFG-parallel over an even count and its sequence over the rest (a job without, over all of them, is
    checked when it comes)."""
    layout = ParallelLayout.for_ranks(ranks, guidance=True)
    layout.check_model(
        heads=transformer_config["num_attention_heads"], kv_heads=transformer_config["num_key_value_heads"]
    )


def rank_device(device: torch.device) -> torch.device:
    """The GPU this rank drives: cuda:LOCAL_RANK for a CUDA run launched over several processes."""
    environment = Environment.read()
    if device.type != "cuda" or not environment.distributed:
        return device
    available = torch.cuda.device_count()
    if environment.local_world_size > available:
        raise InputError(
            f"{environment.local_world_size} processes on this host, one GPU each, but this machine has "
            f"{available} GPU{'s' if available != 1 else ''}; launch fewer, or pass --device cpu"
        )
    if device.index not in (None, environment.local_rank):
        raise InputError(f"with several processes each drives cuda:LOCAL_RANK; drop --device {device}")
    return torch.device("cuda", environment.local_rank)


def start_mesh(layout: ParallelLayout, device: torch.device) -> ProcessMesh | None:
    """Join the other ranks (None for a single process). Blocks until every rank has joined, at most the
    mesh's RENDEZVOUS_TIMEOUT; SIGINT and SIGTERM end the wait (parallel/mesh.py)."""
    if not layout.parallel:
        return None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ProcessMesh.start(dataclasses.replace(layout, on_cpu=device.type == "cpu"), Environment.read(), device)
