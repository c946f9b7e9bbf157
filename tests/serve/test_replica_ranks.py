"""`serve --gpus-per-replica 2` on a local Ray of 2 CPUs: one replica whose two ranks (CPU processes over gloo, as
`generate --gpus 2 --device cpu` runs them) run each job together, CFG-parallel with guidance and sequence-parallel
without, and stop together when a job is deleted; a rank killed mid-job fails that job and the replica comes back.

One server for the module (Ray, a replica and its second rank take about 20 s to start on 2 cores)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest
from server_process import InProcessServer, wait_for_video

from cosmos3_offload.app import cli

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks its video API deprecated

PROMPT = "a lighthouse on a cliff at dusk"
SHORT = {"frames": 5, "steps": 2}
SLOW = {"frames": 17, "steps": 200}  # a job that runs until it is stopped
JOB_SECONDS = 240


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        storage = tmp_path_factory.mktemp("storage")
        with InProcessServer(storage, "--gpus-per-replica", "2", "--queue-size", "8", listen=True) as running:
            yield running
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def client_for(server: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def generate_on_two_ranks(output: Path, seed: int, *extra: str) -> bytes:
    """What `generate --gpus 2 --device cpu` writes for the request."""
    args = ["generate", "--prompt", PROMPT, "--frames", "5", "--steps", "2", "--seed", str(seed), *extra]
    assert cli.main([*args, "--gpus", "2", "--device", "cpu", "--output", str(output), "--no-progress"]) == 0
    return output.read_bytes()


def test_a_job_runs_cfg_parallel_on_the_replicas_two_ranks_as_generate_gpus_2_writes(server, tmp_path):
    """With guidance the two ranks run one CFG branch each: the video is the bytes `generate --gpus 2` writes."""
    client = client_for(server)
    created = client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SHORT, "seed": 5})
    assert wait_for_video(client, created.id, JOB_SECONDS).status == "completed"
    content = client.videos.download_content(created.id).read()
    assert content == generate_on_two_ranks(tmp_path / "cfg.mp4", 5)


def test_a_job_without_guidance_runs_sequence_parallel_and_the_next_cfg_one_still_runs(server, tmp_path):
    """Guidance 1: no CFG branches to split, so the two ranks share the tokens (Ulysses), a second layout whose
    groups the ranks make on first use; a job with guidance after it runs in the first layout again."""
    client = client_for(server)
    plain = client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SHORT, "seed": 6, "guidance": 1})
    assert wait_for_video(client, plain.id, JOB_SECONDS).status == "completed"
    content = client.videos.download_content(plain.id).read()
    assert content == generate_on_two_ranks(tmp_path / "ulysses.mp4", 6, "--guidance", "1")
    again = client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SHORT, "seed": 7})
    assert wait_for_video(client, again.id, JOB_SECONDS).status == "completed"


def test_a_request_whose_tokens_two_ranks_cannot_share_is_refused_before_it_queues(server):
    """Sequence-parallel splits the generator's tokens in two: a request with an odd count is a 400 at once."""
    client = client_for(server)
    with pytest.raises(openai.BadRequestError, match="token"):
        client.videos.create(prompt=PROMPT, size="736x544", extra_body={"frames": 9, "steps": 1, "guidance": 1})


def test_deleting_a_running_job_stops_both_ranks_and_the_replica_takes_the_next(server):
    """DELETE mid-denoise: the leader's stop reaches the other rank at the same step, so the replica (its ranks
    the same processes) takes the next job at once."""
    client = client_for(server)
    slow = client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SLOW, "seed": 8})
    wait_for_video(client, slow.id, JOB_SECONDS, until=("in_progress",))
    _wait_for_steps(server, slow.id)
    ranks = _second_ranks()
    client.videos.delete(slow.id)
    quick = client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SHORT, "seed": 9})
    started = time.monotonic()
    assert wait_for_video(client, quick.id, JOB_SECONDS).status == "completed"
    assert time.monotonic() - started < 120  # long before the deleted job's 200 steps would end
    assert len(ranks) == 1 and _second_ranks() == ranks  # both ranks stopped at one step: the replica was kept


def test_a_rank_killed_mid_job_fails_that_job_and_the_replica_comes_back(server):
    """SIGKILL to the replica's second rank (a crash, the OOM killer): the job fails as replica_lost, Serve
    replaces the broken replica (fresh ranks) and a later job completes."""
    client = client_for(server)
    slow = client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SLOW, "seed": 10})
    wait_for_video(client, slow.id, JOB_SECONDS, until=("in_progress",))
    _wait_for_steps(server, slow.id)
    (rank,) = _second_ranks()
    os.kill(rank, signal.SIGKILL)
    video = wait_for_video(client, slow.id, JOB_SECONDS)
    assert video.status == "failed" and video.error.code == "replica_lost"
    deadline = time.monotonic() + JOB_SECONDS
    while len(ranks := _second_ranks()) != 1 or ranks == [rank] or _alive(server) != 1:
        assert time.monotonic() < deadline, "no new replica came"
        time.sleep(0.2)
    later = client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SHORT, "seed": 11})
    assert wait_for_video(client, later.id, JOB_SECONDS).status == "completed"


def _alive(server: InProcessServer) -> int:
    return server.http.get("/health").json()["replicas"]["alive"]


def _wait_for_steps(server: InProcessServer, job_id: str) -> None:
    """Until the job has denoised a step (its ranks are past the load and in the loop)."""
    deadline = time.monotonic() + JOB_SECONDS
    while server.http.get(f"/v1/videos/{job_id}").json().get("progress", 0) < 2:
        assert time.monotonic() < deadline, "the job made no step"
        time.sleep(0.1)


def _second_ranks() -> list[int]:
    """The pids of the replicas' other ranks: processes multiprocessing spawned from a Serve replica's process."""
    replicas = {pid for pid in _pids() if _command(pid).startswith("ray::ServeReplica")}
    return [pid for pid in _pids() if _parent(pid) in replicas and "spawn_main" in _command(pid)]


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_replicas_needing_more_gpus_than_ray_has_are_refused(server):
    """Serve would wait for them for good: 2 replicas of 2 GPUs on this Ray of none are one clear line instead."""
    from cosmos3_offload.errors import InputError
    from cosmos3_offload.serve.replicas.cluster import check_gpus

    with pytest.raises(InputError, match="need 4 GPUs, but this machine has 0"):
        check_gpus(2, 2, None)
    check_gpus(2, 0, None)  # CPU replicas ask Ray for no GPU
