"""A bounded load on loopback: 200 requests from 8 clients against a queue of 4, every one accounted for."""

from __future__ import annotations

import threading
import time
import urllib.request

import openai
import pytest
from server_process import ServerProcess

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks its video API deprecated

CLIENTS, PER_CLIENT = 8, 25  # 200 requests; every fifth a video job, the rest images
QUEUE = 4  # fewer places than clients: some requests must be refused with 429 and sent again
DEADLINE_SECONDS = 600  # the whole load; on an idle 2-core machine it takes about 1.5 minutes
RETRY_SECONDS = 0.1


def test_two_hundred_requests_from_eight_clients_are_all_accounted_for(tmp_path):
    with ServerProcess(tmp_path / "storage", "--queue-size", str(QUEUE)) as server:
        deadline = time.monotonic() + DEADLINE_SECONDS
        outcomes: list[tuple[str, str]] = []  # (kind, "completed" or what went wrong)
        refusals = [0]
        lock = threading.Lock()

        def client_loop(client_index: int) -> None:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
            for request in range(PER_CLIENT):
                seed = client_index * PER_CLIENT + request
                kind = "video" if request % 5 == 0 else "image"
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
        assert len(videos) == CLIENTS * PER_CLIENT // 5 and {v.status for v in videos} == {"completed"}
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
