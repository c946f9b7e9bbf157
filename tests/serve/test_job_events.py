"""A job's feed (serve/job_events.py) on its own: what a client subscribing at any moment gets, the replay after a
Last-Event-ID, the end, a client whose event loop is gone; and the decode pace that seeds the next job's ETA."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cosmos3_offload.app.events import RunEvent
from cosmos3_offload.serve.job_events import DecodePace, JobFeeds


def step(index: int, total: int = 4) -> RunEvent:
    return RunEvent(kind="step", phase="denoise", elapsed=index, index=index, total=total, eta=total - index,
                    progress=index / total)  # fmt: skip


def started(phase: str) -> RunEvent:
    return RunEvent(kind="phase_started", phase=phase, elapsed=0.0)


def test_a_client_gets_the_state_so_far_then_each_new_event_in_order_then_the_end():
    """Subscribed after two steps: the state says step 2 of 4 in the denoise, nothing is replayed; the events
    recorded on another thread afterwards come in order, numbered on; closing the feed hands None."""
    feeds = JobFeeds()
    feeds.open("job", preview_url="/v1/videos/job/preview")
    for event in (started("denoise"), step(1), step(2)):
        feeds.record("job", event)

    async def follow():
        client = feeds.subscribe("job")
        worker = threading.Thread(target=lambda: [feeds.record("job", step(i)) for i in (3, 4)] + [feeds.close("job")])
        worker.start()
        received = [await client.next() for _ in range(3)]
        worker.join()
        return client, received

    client, received = asyncio.run(follow())
    assert client.replay == [] and client.state["phase"] == "denoise"
    assert (client.state["step"], client.state["steps"], client.state["eta"]) == (2, 4, 2)
    assert [(event.seq, event.kind, event.data["index"]) for event in received[:2]] == [(4, "step", 3), (5, "step", 4)]
    assert received[2] is None and not feeds.is_open("job")


def test_last_event_id_replays_the_kept_events_after_it():
    """A client that saw event 2 is replayed 3 and 4 (a preview with its URL); one that saw none (0) all four."""
    feeds = JobFeeds()
    feeds.open("job", preview_url="/v1/videos/job/preview")
    feeds.started("job")
    for event in (started("denoise"), step(1)):
        feeds.record("job", event)
    feeds.record("job", RunEvent(kind="preview", phase="denoise", elapsed=1.0, index=1, total=4, preview="fast"))

    async def replays(after):
        return feeds.subscribe("job", after=after).replay

    after_two = asyncio.run(replays(2))
    assert [(event.seq, event.kind) for event in after_two] == [(3, "step"), (4, "preview")]
    assert after_two[1].data["url"] == "/v1/videos/job/preview"
    assert [event.seq for event in asyncio.run(replays(0))] == [1, 2, 3, 4]


def test_an_ended_job_has_no_feed_and_its_late_events_go_nowhere():
    """After close a subscription is None (the store says how the job ended) and a late event is dropped."""
    feeds = JobFeeds()
    feeds.open("job")
    feeds.close("job")
    feeds.record("job", step(1))

    async def subscribe():
        return feeds.subscribe("job")

    assert asyncio.run(subscribe()) is None and not feeds.is_open("job")


def test_a_client_whose_event_loop_closed_is_dropped_without_troubling_the_worker():
    """A client whose loop has gone (its server stopped) is forgotten at the next event; the worker never sees
    an error."""
    feeds = JobFeeds()
    feeds.open("job")
    loop = asyncio.new_event_loop()

    async def subscribe():
        return feeds.subscribe("job")

    client = loop.run_until_complete(subscribe())
    loop.close()
    feeds.record("job", step(1))
    assert client not in feeds._feeds["job"].clients


@pytest.mark.parametrize("frames, seconds", [(5, 2.0), (189, 75.6)])
def test_the_decode_pace_scales_the_last_decode_to_the_next_jobs_size(frames, seconds):
    """None before any decode; after a 5-frame 320x192 decode of 2 s, the same size is guessed 2 s and 189 frames
    37.8 times that."""
    pace = DecodePace()
    assert pace.guess(frames, 192, 320) is None
    pace.learn(5, 192, 320, 2.0)
    assert pace.guess(frames, 192, 320) == pytest.approx(seconds)
