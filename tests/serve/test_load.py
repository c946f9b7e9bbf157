"""A bounded load over loopback HTTP: 24 requests from 4 clients against a queue of 2, every one accounted for.

The app is the one `serve` builds, served by uvicorn from a thread of the test process (server_process.py):
real connections and one event loop as in the server, without starting a server process. Each client has one
request in flight at a time, so four clients against one running and two waiting places must be refused
(429) now and then, and send again."""

from __future__ import annotations

import threading
import time
import urllib.request

import openai
import pytest
from server_process import InProcessServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks its video API deprecated

CLIENTS, PER_CLIENT = 4, 6  # 24 requests; every third a video job, the rest images
VIDEO_EVERY = 3
QUEUE = 2  # fewer places (one running, two waiting) than clients: some requests must be refused with 429
DEADLINE_SECONDS = 300  # the whole load; on an idle 2-core machine it takes about 15 s
RETRY_SECONDS = 0.1


def test_every_request_of_several_clients_against_a_small_queue_is_accounted_for(tmp_path):
    """Every request completes (after 429s, sent again), none fails or is lost; the 429 was reached; the
    list holds exactly the video jobs, the metrics count every job completed and the queue empty."""
    with InProcessServer(tmp_path / "storage", "--queue-size", str(QUEUE), listen=True) as server:
        deadline = time.monotonic() + DEADLINE_SECONDS
        outcomes: list[tuple[str, str]] = []  # (kind, "completed" or what went wrong)
        refusals = [0]
        lock = threading.Lock()

        def client_loop(client_index: int) -> None:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
            for request in range(PER_CLIENT):
                seed = client_index * PER_CLIENT + request
                kind = "video" if request % VIDEO_EVERY == 0 else "image"
                outcome = _one(client, kind, seed, deadline, refusals, lock)
                with lock:
                    outcomes.append((kind, outcome))

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(1.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in threads), "the load did not finish in time"
        assert len(outcomes) == CLIENTS * PER_CLIENT
        assert [o for o in outcomes if o[1] != "completed"] == []
        assert refusals[0] > 0  # the queue bound was reached, and answered 429
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        videos = client.videos.list(limit=100).data
        assert len(videos) == CLIENTS * PER_CLIENT // VIDEO_EVERY and {v.status for v in videos} == {"completed"}
        metrics = _metrics(server.url)
        assert metrics['cosmos3_jobs{state="completed"}'] == CLIENTS * PER_CLIENT
        assert metrics['cosmos3_jobs{state="failed"}'] == 0 and metrics["cosmos3_queue_length"] == 0


def _one(client: openai.OpenAI, kind: str, seed: int, deadline: float, refusals: list[int], lock) -> str:
    """One request, sent again after each 429 until the deadline; "completed" or what went wrong."""
    while time.monotonic() < deadline:
        try:
            if kind == "image":
                result = client.images.generate(prompt=f"a fox {seed}", extra_body={"steps": 1, "seed": seed})
                return "completed" if len(result.data) == 1 and result.data[0].b64_json else "no image"
            video = client.videos.create(prompt=f"a fox {seed}", extra_body={"frames": 5, "steps": 1, "seed": seed})
            while video.status not in ("completed", "failed") and time.monotonic() < deadline:
                time.sleep(0.05)
                video = client.videos.retrieve(video.id)
            return video.status
        except openai.RateLimitError:
            with lock:
                refusals[0] += 1
            time.sleep(RETRY_SECONDS)
        except openai.APIError as error:  # anything else is a failure of the server, counted as such
            return f"{type(error).__name__}: {error}"
    return "deadline"


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
