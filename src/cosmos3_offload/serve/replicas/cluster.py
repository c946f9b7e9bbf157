"""Where the replicas run: a local Ray started (and stopped) with the server, or the cluster at `--ray-address`.

`start_replicas` starts Serve without its HTTP proxy (our own app stays the ingress, in the serve process),
deploys `Generator` with one replica per `--replicas`, each on `--gpus-per-replica` GPUs (none on a CPU
machine; with several, the replica's ranks run each job together: ranks.py) and taking one job at a time, and
returns once every replica has loaded its model. At the end only what the server made goes: its Serve
application and its board; a local Ray it started is stopped, a cluster it connected to is left as it was
(other applications' Serve included). A Ray this process finds already initialized (a test's) is used and left
running.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve._private.common import ReplicaState
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ...app.runner import LoadedModel
from ...app.serve_settings import ServeSettings
from ...errors import InputError
from ...model.groups import PLANNED_GROUPS
from ...offload.node_share import node_share_name, remove_node_share
from ...planning.plan import Mode
from .deployment import CancelBoard, Generator

logger = logging.getLogger(__name__)

DEPLOYMENT = "generator"


@dataclass
class Cluster:
    """The running replicas: Serve's `handle` on them, the `board` of cancelled jobs, the Serve application's
    `name`, how many `replicas` were asked for, and what this server did to Ray: `started` a local one,
    or `connected` to a cluster (False, False: it found this process connected)."""

    handle: Any  # serve.handle.DeploymentHandle
    board: Any  # CancelBoard's actor handle
    name: str
    replicas: int
    started: bool
    connected: bool
    share: str | None = None  # the replicas' shared host copy on each node (offload/node_share.py), if any

    def alive(self) -> int:
        """Replicas running now (a dead one is restarted by Serve and counts again once it has loaded)."""
        try:
            application = serve.status().applications[self.name]
            states = application.deployments[DEPLOYMENT].replica_states
        except Exception:  # Serve's controller is gone or restarting: none known alive
            logger.exception("the replicas' state could not be read")
            return 0
        return int(states.get(ReplicaState.RUNNING, 0))

    def stop(self) -> None:
        """Remove the replicas and the board; stop Ray when this server started it."""
        try:
            serve.delete(self.name)
            ray.kill(self.board)
            if self.share is not None:
                _remove_share_everywhere(self.share)
        finally:
            if self.started:
                serve.shutdown()
            if self.started or self.connected:
                ray.shutdown()  # a cluster's: this process leaves it, the cluster goes on


def start_replicas(loaded: LoadedModel, settings: ServeSettings) -> Cluster:
    """Connect to (or start) Ray, deploy the replicas and wait until each has loaded its model."""
    calls_init = not ray.is_initialized()
    started = calls_init and settings.ray_address is None
    connected = calls_init and settings.ray_address is not None
    if calls_init:
        try:
            if started:  # "local": a new Ray of this machine, never one some `ray start` left running
                ray.init(address="local", include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=settings.ray_address, log_to_driver=False)
        except ConnectionError as error:
            raise InputError(f"--ray-address {settings.ray_address!r}: no Ray cluster there ({error})") from None
    try:
        serve.start(proxy_location="Disabled")
        name = f"cosmos3-{uuid.uuid4().hex[:8]}"
        board = CancelBoard.options(name=f"{name}-cancelled").remote()
        ranks = settings.gpus_per_replica
        gpus = ranks if loaded.device.type == "cuda" else 0
        check_gpus(settings.replicas, gpus, settings.ray_address)
        deployment = serve.deployment(
            Generator,
            name=DEPLOYMENT,
            num_replicas=settings.replicas,
            max_ongoing_requests=1,  # one job at a time: Serve sends the next to a free replica
            ray_actor_options={"num_gpus": gpus, "num_cpus": 1},
        )
        loading = time.perf_counter()
        share = replica_share_name(loaded, settings.replicas, name) if ranks == 1 else None
        handle = serve.run(
            deployment.bind(loaded, board, settings.preview_kind, settings.preview_every, share, ranks),
            name=name,
            route_prefix=None,
        )
        logger.info("%d replica(s) loaded in %.1fs", settings.replicas, time.perf_counter() - loading)
    except BaseException:
        if calls_init:
            ray.shutdown()
        raise
    return Cluster(handle, board, name, settings.replicas, started, connected, share)


def check_gpus(replicas: int, gpus: int, address: str | None) -> None:
    """Refuse replicas that need more GPUs than Ray has: Serve would wait for them for good."""
    total = int(ray.cluster_resources().get("GPU", 0))
    if replicas * gpus > total:
        where = "this machine" if address is None else f"the Ray cluster at {address}"
        raise InputError(
            f"--replicas {replicas} of {gpus} GPU{'s' if gpus != 1 else ''} each need {replicas * gpus} GPUs, "
            f"but {where} has {total}; run fewer replicas or fewer GPUs per replica"
        )


def replica_share_name(loaded: LoadedModel, replicas: int, run: str) -> str | None:
    """The name of the host copy the replicas of one node share (offload/node_share.py): one per server run and
    model load; None when there is nothing to share (one replica, or a plan with every group resident)."""
    if replicas < 2 or all(loaded.plan.group(group).mode is Mode.RESIDENT for group in PLANNED_GROUPS):
        return None
    load = (str(loaded.checkpoint or loaded.model), loaded.plan, str(loaded.dtype), loaded.fp8, loaded.sound)
    return node_share_name(run, *load, loaded.actions)


@ray.remote(num_cpus=0)
def _remove_share(name: str) -> None:
    remove_node_share(name)


def _remove_share_everywhere(name: str) -> None:
    """Delete the shared host copy on every live node (each node's /dev/shm is its own), once the replicas are gone."""
    nodes = [node["NodeID"] for node in ray.nodes() if node.get("Alive")]
    removals = [
        _remove_share.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(name)
        for node in nodes
    ]
    try:
        ray.get(removals, timeout=60)
    except Exception:  # a node that left meanwhile: its copy went with it
        logger.exception("the replicas' shared host copy could not be removed on every node")
