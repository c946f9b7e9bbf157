"""`serve --replicas 2` on a local Ray of 2 CPUs: the same job API, its jobs run on two replicas of the tiny model.

One server (and one Ray) for the module: starting Ray and two replicas takes about 15 s on 2 cores. The app is
the one `serve` builds, served by uvicorn from a thread of this process (server_process.py), so the openai
clients use real connections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image
from server_process import InProcessServer, wait_for_video
from share_memory import share_memory_kib

from cosmos3_offload.app import cli
from cosmos3_offload.offload.node_share import node_share_folder

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks its video API deprecated

PROMPT = "a red fox running through fresh snow"
SHORT = {"frames": 5, "steps": 2}
SLOW = {"frames": 17, "steps": 200}  # a job that runs until it is stopped
CLIENTS = 8
JOB_SECONDS = 240
STOP_SECONDS = 20  # a deleted job's replica is free by then (its 200 steps take minutes)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The module's server: `serve --replicas 2` on a local Ray of 2 CPUs, built once in this process."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        storage = tmp_path_factory.mktemp("storage")
        # Staged groups: the two replicas share one host copy of the weights (offload/node_share.py).
        flags = ["--replicas", "2", "--queue-size", "16", "--offload-stages", "reasoner", "generator", "vae"]
        with InProcessServer(storage, *flags, listen=True) as running:
            share = running.http.app.state.service.queue.runner.cluster.share
            yield running
        assert share is not None and not node_share_folder(share).exists()  # the server removed the node's copy
        assert ray.is_initialized()  # the server leaves a Ray it did not start running
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def client_for(server: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def wait(client: openai.OpenAI, video_id: str, *, until=("completed", "failed")):
    return wait_for_video(client, video_id, JOB_SECONDS, until=until)


def metrics_of(server: InProcessServer) -> dict[str, float]:
    text = server.http.get("/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def replica_metrics(server: InProcessServer, name: str) -> dict[str, float]:
    """{replica id: value} of the per-replica gauge `name`."""
    prefix = f'cosmos3_{name}{{replica="'
    return {key[len(prefix) : -2]: value for key, value in metrics_of(server).items() if key.startswith(prefix)}


def busy_replica(server: InProcessServer, deadline: float) -> str:
    """The id of the one replica running a job (the only one sent), once it has started it."""
    while time.monotonic() < deadline:
        busy = [replica for replica, value in replica_metrics(server, "replica_busy").items() if value == 1]
        if len(busy) == 1:
            return busy[0]
        time.sleep(0.05)
    raise AssertionError("no replica took the job")


def test_eight_clients_jobs_all_complete_on_both_replicas_each_as_generate_writes(server, tmp_path):
    """8 concurrent clients' video jobs all complete, both replicas ran some (each job names its replica), and
    every video is the mp4 `generate` writes for the same request."""
    results: dict[int, tuple[str, bytes, dict]] = {}
    errors: list[str] = []

    def one(seed: int) -> None:
        try:
            client = client_for(server)
            created = client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SHORT, "seed": seed})
            video = wait(client, created.id)
            content = client.videos.download_content(created.id).read() if video.status == "completed" else b""
            results[seed] = (video.status, content, video.model_extra["stats"] or {})
        except Exception as error:  # counted below: every client must complete
            errors.append(f"{seed}: {error!r}")

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOB_SECONDS)
    assert errors == [] and sorted(results) == list(range(CLIENTS))
    assert {status for status, _, _ in results.values()} == {"completed"}
    replicas = {stats["replica"] for _, _, stats in results.values()}
    assert len(replicas) == 2  # both replicas ran jobs
    for seed in (0, 1):  # two of them checked against `generate` (each run takes a while on 2 cores)
        expected = tmp_path / f"generate-{seed}.mp4"
        args = ["generate", "--prompt", PROMPT, "--frames", "5", "--steps", "2", "--seed", str(seed)]
        assert cli.main([*args, "--output", str(expected), "--no-progress"]) == 0
        assert results[seed][1] == expected.read_bytes()
    counted = replica_metrics(server, "replica_jobs_total")
    assert sum(counted[replica] for replica in replicas) >= CLIENTS
    health = server.http.get("/health").json()
    assert health["status"] == "ok" and health["replicas"] == {"replicas": 2, "alive": 2}


def test_the_replicas_of_a_node_hold_one_host_copy(server):
    """Fails when each replica fills a host copy of its own (two copies' memory) or the copy is not filled by one
    of them (the module's server fixture checks that stopping the server removes it). Before the test that kills
    a replica: the one Serve starts again maps the copy too, but the filler's pid may be gone."""
    cluster = server.http.app.state.service.queue.runner.cluster
    folder = node_share_folder(cluster.share)
    manifest = json.loads((folder / "complete").read_text())
    mapping = [int(p) for p in os.listdir("/proc") if p.isdigit() and _maps(int(p), folder)]
    assert len(mapping) == 2 and manifest["filled_by"] in mapping  # the two replicas; one filled it
    copy_kib = sum(f.stat().st_size for f in folder.glob("slab-*")) / 1024
    held = {pid: share_memory_kib(pid, folder) for pid in mapping}
    assert held[manifest["filled_by"]][0] >= 0.95 * copy_kib  # the filler wrote the whole copy...
    assert all(rss > 0 for rss, _ in held.values())  # ...the other reads the weights its jobs use from it...
    assert sum(pss for _, pss in held.values()) <= 1.1 * copy_kib  # ...and the node holds it once


def test_an_images_request_of_two_runs_on_both_replicas_at_once(server):
    """images.generate with n=2 queues two jobs together: both workers take one at once, so each replica runs
    one and the answer comes in about one job's time (not after the idle worker's minute-long wait)."""
    before = replica_metrics(server, "replica_jobs_total")
    started = time.monotonic()
    result = client_for(server).images.generate(prompt=PROMPT, n=2, extra_body={"steps": 1, "seed": 11})
    assert len(result.data) == 2 and time.monotonic() - started < 30
    after = replica_metrics(server, "replica_jobs_total")
    assert sorted(after[replica] - before.get(replica, 0) for replica in after)[-2:] == [1, 1]


def test_deleting_a_running_job_stops_it_on_its_replica(server):
    """With a job running on each replica, DELETE of each stops it on its own replica at its next step: that
    replica is free again at once, the other still busy, long before the job's 200 steps would end."""
    client = client_for(server)
    jobs = [client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SLOW, "seed": s}) for s in (1, 2)]
    deadline = time.monotonic() + JOB_SECONDS
    while sorted(replica_metrics(server, "replica_busy").values())[-2:] != [1, 1]:
        assert time.monotonic() < deadline, "the two jobs did not run at once"
        time.sleep(0.05)
    freed = []
    for job in jobs:
        wait(client, job.id, until=("in_progress",))
        busy = {replica for replica, value in replica_metrics(server, "replica_busy").items() if value == 1}
        client.videos.delete(job.id)
        stop_by = time.monotonic() + STOP_SECONDS
        while len(now := {r for r, v in replica_metrics(server, "replica_busy").items() if v == 1}) == len(busy):
            assert time.monotonic() < stop_by, "no replica stopped the deleted job"
            time.sleep(0.05)
        freed += list(busy - now)
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(job.id)
    assert len(set(freed)) == 2  # each deletion reached its own replica
    quick = client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SHORT, "seed": 2})
    assert wait(client, quick.id).status == "completed"


def test_a_replica_killed_mid_job_fails_that_job_and_comes_back(server):
    """Killing the process of the replica running a job fails that job (replica_lost) and only it; Serve starts
    a new replica, /health counts two alive again, and later jobs complete."""
    client = client_for(server)
    created = client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SLOW, "seed": 3})
    deadline = time.monotonic() + JOB_SECONDS
    replica = busy_replica(server, deadline)
    _kill(replica)
    video = wait(client, created.id)
    assert video.status == "failed" and video.error.code == "replica_lost"
    while server.http.get("/health").json()["replicas"]["alive"] != 2:
        assert time.monotonic() < deadline, "the killed replica did not come back"
        time.sleep(0.2)
    later = [client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SHORT, "seed": s}) for s in (4, 5)]
    assert [wait(client, job.id).status for job in later] == ["completed", "completed"]


def test_an_uploaded_image_reaches_the_replica_and_its_preview_comes_back(server, tmp_path):
    """An image-to-video job's upload goes to its replica as bytes: the video equals `generate --image`'s; the
    replica's live preview is written into the job's folder and served."""
    picture = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 160, 3), dtype=np.uint8)).save(picture)
    client = client_for(server)
    created = client.videos.create(
        prompt=PROMPT, size="320x192", input_reference=picture.open("rb"), extra_body={**SHORT, "seed": 9}
    )
    assert wait(client, created.id).status == "completed"
    expected = tmp_path / "generate.mp4"
    args = ["generate", "--prompt", PROMPT, "--frames", "5", "--steps", "2", "--seed", "9", "--image", str(picture)]
    assert cli.main([*args, "--output", str(expected), "--no-progress"]) == 0
    assert client.videos.download_content(created.id).read() == expected.read_bytes()
    preview = server.http.get(f"/v1/videos/{created.id}/preview")
    assert preview.status_code == 200 and preview.content[:4] == b"RIFF"  # a whole webp


def test_one_replica_never_imports_ray(tmp_path):
    """`serve` with one replica and no --ray-address (the default) starts without importing Ray."""
    code = (
        "import sys; sys.path.insert(0, 'tests/serve'); sys.path.insert(0, 'tests')\n"
        "from server_process import InProcessServer\n"
        f"with InProcessServer({str(tmp_path / 'storage')!r}) as server:\n"
        "    assert server.http.get('/health').json()['status'] == 'ok'\n"
        "print('ray' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def _kill(replica: str) -> None:
    """Kill the process of the Serve replica whose id is `replica` (as a crash or the OOM killer would)."""
    for named in ray.util.list_named_actors(all_namespaces=True):
        if named["name"].endswith(f"#{replica}"):
            ray.kill(ray.get_actor(named["name"], namespace=named["namespace"]), no_restart=False)
            return
    raise AssertionError(f"replica {replica} has no live actor")


def _maps(pid: int, folder: Path) -> bool:
    try:
        return str(folder) in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # gone, or not ours to read
        return False
