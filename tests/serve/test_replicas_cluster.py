"""`serve --replicas 2 --ray-address ADDR` on a simulated two-node Ray cluster (Ray's own test utility: two raylets
on this machine, one CPU each): the replicas are placed on both nodes, the jobs run there, and stopping the server
leaves the cluster running."""

from __future__ import annotations

import threading
import time

import openai
import pytest
from server_process import InProcessServer

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks its video API deprecated

PROMPT = "a red fox running through fresh snow"
JOB_SECONDS = 240


def test_replicas_on_a_two_node_cluster_run_jobs_on_both_nodes(tmp_path):
    """One replica per node (each node has the one CPU a replica takes); two jobs at once run on different
    nodes and complete; after the server stops, the cluster still has both nodes alive and its Serve running."""
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        flags = ("--replicas", "2", "--ray-address", cluster.address)
        with InProcessServer(tmp_path / "storage", *flags, listen=True) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
            stats = []

            def one(seed: int) -> None:
                created = client.videos.create(prompt=PROMPT, extra_body={"frames": 5, "steps": 2, "seed": seed})
                deadline = time.monotonic() + JOB_SECONDS
                while (video := client.videos.retrieve(created.id)).status not in ("completed", "failed"):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                stats.append((video.status, video.model_extra["stats"]))

            threads = [threading.Thread(target=one, args=(seed,)) for seed in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(JOB_SECONDS)
            assert [status for status, _ in stats] == ["completed"] * 4
            assert len({figures["node"] for _, figures in stats}) == 2  # jobs ran on both nodes
        assert not ray.is_initialized()  # the server left the cluster...
        ray.init(address=cluster.address)
        assert len([node for node in ray.nodes() if node["Alive"]]) == 2  # ...and the cluster goes on,
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)  # its Serve too (others' apps with it)
    finally:
        ray.shutdown()
        cluster.shutdown()
