"""`GET /v1/videos/{id}/events`: a video job followed as Server-Sent Events.

The stream opens with `event: state`, the job's object (as `GET /v1/videos/{id}` gives it) with `run`, where
its run stands (phase, step and steps, piece and pieces, eta, progress 0..1, elapsed, preview URL); a late
client starts from there. Then each event of the run as it happens (`event: phase_started`, `phase_ended`,
`step`, `piece`, `preview` with the preview's `url`, and `state` when a queued job starts), each with
`id:` its number in the job (from 1): a client that reconnects with `Last-Event-ID` is first replayed the
events it missed. Last comes `event: done` with the job's final object (completed, or failed with its error;
`{"id", "object": "video.deleted", "deleted": true}` for a job deleted meanwhile), and the stream closes.
A comment line every HEARTBEAT_SECONDS keeps proxies from closing a quiet stream (a long prefill).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from .job_events import STATE, FeedEvent, Subscription
from .job_previews import PREVIEW_FILE
from .service import Service
from .store import Job

HEARTBEAT_SECONDS = 15.0
DONE = "done"
HEADERS = {"cache-control": "no-store", "x-accel-buffering": "no"}  # no proxy may hold the events back


def event_stream(service: Service, job: Job, last_event_id: str | None) -> StreamingResponse:
    """The job's events from now (after `last_event_id`'s, when a reconnecting client sends it). Subscribed
    before the response starts, so nothing that happens after this call is missed."""
    subscription = service.queue.feeds.subscribe(job.id, after=_event_number(last_event_id))
    return StreamingResponse(_messages(service, job.id, subscription), media_type="text/event-stream", headers=HEADERS)


async def _messages(service: Service, job_id: str, subscription: Subscription | None) -> AsyncIterator[str]:
    feeds = service.queue.feeds
    try:
        job = service.store.get(job_id)  # read after subscribing: a job that ended since has its final state
        if job is None:
            yield message(DONE, _deleted(job_id))
            return
        run = subscription.state if subscription is not None else await _ended_run(service, job)
        yield message(STATE, service.video_object(job) | {"run": run})
        if subscription is None:  # no feed: the job had ended
            yield message(DONE, service.video_object(job))
            return
        for event in subscription.replay:
            yield _event_message(service, job_id, event)
        while (event := await _next(subscription)) is not None:
            yield _event_message(service, job_id, event) if isinstance(event, FeedEvent) else event
        job = service.store.get(job_id)  # the feed closes once the store holds how the job ended
        yield message(DONE, _deleted(job_id) if job is None else service.video_object(job))
    finally:
        if subscription is not None:
            feeds.unsubscribe(subscription)


async def _next(subscription: Subscription) -> FeedEvent | str | None:
    """The next event, a heartbeat comment after HEARTBEAT_SECONDS of none, or None once the job has ended."""
    try:
        return await asyncio.wait_for(subscription.next(), HEARTBEAT_SECONDS)
    except asyncio.TimeoutError:
        return ": keep-alive\n\n"


def _event_message(service: Service, job_id: str, event: FeedEvent) -> str:
    data = event.data
    if event.kind == STATE:  # the job started: its object now, with the run's state
        job = service.store.get(job_id)
        data = data if job is None else service.video_object(job) | data
    return message(event.kind, data, event.seq)


async def _ended_run(service: Service, job: Job) -> dict[str, Any]:
    """Where a job without a feed stands: its preview's URL, if it left one."""
    path = service.store.folder_of(job.id) / PREVIEW_FILE
    exists = await asyncio.to_thread(path.is_file)
    return {"preview": f"/v1/videos/{job.id}/preview"} if exists else {}


def message(kind: str, data: dict[str, Any], seq: int | None = None) -> str:
    """One Server-Sent Event: its name, its number (when it has one) and its data, one line of JSON."""
    number = "" if seq is None else f"id: {seq}\n"
    return f"event: {kind}\n{number}data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _deleted(job_id: str) -> dict[str, Any]:
    return {"id": job_id, "object": "video.deleted", "deleted": True}


def _event_number(header: str | None) -> int | None:
    """The number in a Last-Event-ID header; None for none, or a value this server never sent."""
    if header is None or not header.strip().isdigit() or len(header.strip()) > 12:
        return None
    return int(header.strip())
