"""The HTTP API: OpenAI's video job routes and image route, /health, /metrics and the web page.

- `POST /v1/videos` -> a queued job (OpenAI's video object); `GET /v1/videos/{id}` its state and
  progress; `GET /v1/videos/{id}/content` the mp4 once completed (HEAD: its headers); `GET /v1/videos`
  the list (newest first, `after`/`limit`/`order`); `DELETE /v1/videos/{id}` cancels a waiting or running
  job, or deletes a finished one with its files; `GET /v1/videos/{id}/actions` an action run's predicted
  actions (JSON, as `generate` writes NAME.actions.json) once completed; `GET /v1/videos/{id}/events` its
  run as Server-Sent Events (event_stream.py); `GET /v1/videos/{id}/preview` its latest live preview image.
- `POST /v1/images/generations` waits for its one-frame jobs and returns the images (base64), each with
  its job `id` and `seed`; `DELETE /v1/images/{id}` deletes one (kept by --keep-images otherwise).
- `GET /health` (no key needed; 503 with the reason when the job worker, every replica or the storage cannot
  work; with replicas, how many are alive), `GET /metrics` (Prometheus text), `GET /` the page. No /docs or
  /openapi.json: the routes are OpenAI's.

With an API key every /v1 route and /metrics need `Authorization: Bearer KEY` (401 otherwise). Every
error has OpenAI's body; a bad request is a 400, a full queue a 429, a full storage a 507, never a 500.
Whatever blocks (saving and decoding an upload, checking a request, reading and deleting files, the
health probe) runs in a worker thread, so one slow request never stalls the others.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..app.outputs import actions_beside
from ..request.checks import shown
from .action_request import action_choices
from .api_errors import (
    ApiError,
    bad_request,
    error_body,
    file_gone,
    not_found,
    storage_full,
    storage_unavailable,
)
from .event_stream import event_stream
from .guard import install_guard
from .job_previews import MEDIA_TYPE as PREVIEW_MEDIA_TYPE
from .job_previews import PREVIEW_FILE
from .requests import parse_image, parse_video, read_fields
from .service import Service
from .storage_errors import StorageError, StorageFull
from .store import COMPLETED, FAILED, Job, JobStore

logger = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "page"
PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
MAX_LIST = 100
WAIT_POLL_SECONDS = 0.05
# What a failed image job answers: its error code -> HTTP status (the request's fault is a 400).
IMAGE_FAILURE_STATUS = {
    "generation_failed": 400,
    "out_of_memory": 503,
    "server_stopped": 503,
    "deleted": 409,
    "storage_full": 507,
    "storage_error": 503,
}
MEDIA_TYPES = {".mp4": "video/mp4", ".png": "image/png", ".jpg": "image/jpeg"}


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="cosmos3-offload", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service  # for the tests, which reach the queue and the store through the app
    settings, store = service.settings, service.store
    install_guard(app, settings)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error(error)

    @app.exception_handler(StorageError)
    async def storage(request: Request, error: StorageError):
        logger.error("%s %s: %s", request.method, request.url.path, error)
        full = isinstance(error, StorageFull)
        return _error(storage_full(str(error)) if full else storage_unavailable(str(error)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse(error_body(str(error.detail), type="invalid_request_error"), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        param = str(first.get("loc", ["", ""])[-1]) or None
        return _error(bad_request(f"{param}: {first.get('msg', 'invalid value')}", param))

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, error: ClientDisconnect):  # the client left mid-body: nobody to answer
        logger.info("%s %s: the client disconnected before its body was whole", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("the server failed on this request", type="server_error"), status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return HTMLResponse((PAGE / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in PAGE_FILES:
            raise not_found("file", name)
        return FileResponse(PAGE / name, media_type=PAGE_FILES[name])

    @app.get("/health")
    async def health() -> JSONResponse:
        problem = await asyncio.to_thread(service.problem)
        replicas = await asyncio.to_thread(service.replica_counts)
        body = {
            "status": "ok" if problem is None else "unavailable",
            "model": settings.model_name,
            "device": str(service.loaded.device),
            "queue_length": len(service.queue),
            "queue_size": settings.queue_size,
            "auth": settings.api_key is not None,
            "defaults": settings.defaults,
            "actions": action_choices(service.action_dim, service.action_tier),
        }
        if replicas is not None:
            body["replicas"] = replicas
        if problem is not None:
            body["reason"] = problem
        return JSONResponse(body, status_code=200 if problem is None else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = service.metrics.text(len(service.queue), store.counts(), service.loaded.device)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/videos")
    async def create_video(request: Request) -> JSONResponse:
        fields = await read_fields(request)
        parsed = parse_video(fields, settings.defaults, settings.limit, action_tier=service.action_tier)
        admitted = await asyncio.to_thread(service.admit, "video", parsed, suffix=".mp4", seeds=[parsed.config["seed"]])
        return JSONResponse(service.video_object(store.get(admitted[0])))

    @app.get("/v1/videos")
    async def list_videos(after: str | None = None, limit: int = 20, order: str = "desc") -> dict[str, Any]:
        if not 1 <= limit <= MAX_LIST:
            raise bad_request(f"limit must be 1 to {MAX_LIST}", "limit")
        if order not in ("asc", "desc"):
            raise bad_request("order must be asc or desc", "order")
        place = None if after is None else store.cursor("video", after)  # a deleted job's id still places it
        if after is not None and place is None:
            raise bad_request(f"after: {not_found('video', after).message}", "after")
        jobs = store.list("video", after=place, limit=limit + 1, newest_first=order == "desc")
        data = [service.video_object(job) for job in jobs[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(jobs) > limit,
        }

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str) -> dict[str, Any]:
        return service.video_object(_job(store, "video", video_id))

    @app.api_route("/v1/videos/{video_id}/content", methods=["GET", "HEAD"])
    async def video_content(video_id: str, variant: str = "video") -> Response:
        job = _job(store, "video", video_id)
        if variant != "video":
            raise bad_request("variant must be video (no thumbnails or spritesheets here)", "variant")
        if job.status != COMPLETED:
            raise ApiError(409, f"video {shown(video_id)} is {job.status}, not completed", code="not_ready")
        path = store.folder_of(job.id) / job.file
        if not await asyncio.to_thread(path.is_file):
            raise file_gone("video", job.id)
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"))

    @app.api_route("/v1/videos/{video_id}/actions", methods=["GET", "HEAD"])
    async def video_actions(video_id: str) -> Response:
        job = _job(store, "video", video_id)
        action = job.request.get("action")
        if action is None or action["mode"] == "forward_dynamics":
            said = "is no action run" if action is None else "is a forward_dynamics run, which follows given actions"
            message = f"video {shown(video_id)} {said}; only inverse_dynamics and policy jobs predict actions"
            raise ApiError(404, message, code="not_found")
        if job.status != COMPLETED:
            raise ApiError(409, f"video {shown(video_id)} is {job.status}, not completed", code="not_ready")
        _, path = actions_beside(store.folder_of(job.id) / job.file)
        if not await asyncio.to_thread(path.is_file):
            raise file_gone("video", job.id)
        return FileResponse(path, media_type="application/json")

    @app.get("/v1/videos/{video_id}/events")
    async def video_events(video_id: str, request: Request) -> Response:
        job = _job(store, "video", video_id)
        return event_stream(service, job, request.headers.get("last-event-id"))

    @app.get("/v1/videos/{video_id}/preview")
    async def video_preview(video_id: str) -> Response:
        job = _job(store, "video", video_id)
        try:  # read whole: the previewer replaces the file, never rewrites it in place
            image = await asyncio.to_thread((store.folder_of(job.id) / PREVIEW_FILE).read_bytes)
        except FileNotFoundError:
            raise ApiError(404, f"video {shown(video_id)} has no preview yet", code="not_found") from None
        return Response(image, media_type=PREVIEW_MEDIA_TYPE, headers={"cache-control": "no-store"})

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str) -> dict[str, Any]:
        job = _job(store, "video", video_id)
        await asyncio.to_thread(service.delete, job)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    @app.delete("/v1/images/{image_id}")
    async def delete_image(image_id: str) -> dict[str, Any]:
        job = _job(store, "image", image_id)
        await asyncio.to_thread(service.delete, job)
        return {"id": job.id, "object": "image.deleted", "deleted": True}

    @app.post("/v1/images/generations")
    async def generate_images(request: Request) -> dict[str, Any]:
        parsed, count, suffix = parse_image(await read_fields(request), settings.defaults, settings.limit)
        first = parsed.config["seed"]
        seeds = [first + i for i in range(count)]
        job_ids = await asyncio.to_thread(service.admit, "image", parsed, suffix=suffix, seeds=seeds)
        try:
            jobs = await _finished(store, job_ids)
            failed = next((job for job in jobs if job.status == FAILED), None)
            if failed is not None:
                code = failed.error["code"]
                status = IMAGE_FAILURE_STATUS.get(code, 500)
                kind = "server_error" if status >= 500 else "invalid_request_error"
                raise ApiError(status, failed.error["message"], code=code, type=kind)
            images = await asyncio.to_thread(_read_images, store, jobs)
        finally:
            service.queue.release(job_ids)
        data = [{"b64_json": image, "id": job.id, "seed": seed} for image, job, seed in zip(images, jobs, seeds)]
        return {"created": int(time.time()), "data": data, "size": parsed.size, "output_format": suffix[1:]}

    return app


def _job(store: JobStore, kind: str, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None or job.kind != kind:
        raise not_found(kind, job_id)
    return job


async def _finished(store: JobStore, job_ids: list[str]) -> list[Job]:
    """The jobs once each has completed or failed (a deleted one counts as failed)."""
    while True:
        jobs = [store.get(job_id) for job_id in job_ids]
        if all(job is None or job.status in (COMPLETED, FAILED) for job in jobs):
            break
        await asyncio.sleep(WAIT_POLL_SECONDS)
    return [
        job
        or Job(
            job_id,
            "image",
            FAILED,
            0,
            0,
            None,
            {},
            {"code": "deleted", "message": "it was deleted while this request waited"},
        )
        for job, job_id in zip(jobs, job_ids)
    ]


def _read_images(store: JobStore, jobs: list[Job]) -> list[str]:
    """The completed image jobs' files, base64; a file removed behind the server's back is a 410."""
    images = []
    for job in jobs:
        try:
            images.append(base64.b64encode((store.folder_of(job.id) / job.file).read_bytes()).decode())
        except FileNotFoundError:
            raise file_gone("image", job.id) from None
    return images


def _error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)
