"""What the routes share (`Service`): the loaded model, the job store, the queue, the metrics and the settings,
and how a request becomes jobs: its files saved in each job's folder, checked as the model runs it, recorded and
queued, all or none; a request the model cannot take is a 400 naming the field (never the server's paths).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..app.config import GenerationConfig
from ..app.distributed import layout_for
from ..app.inputs import read_conditioning
from ..app.runner import LoadedModel
from ..app.serve_settings import ServeSettings
from ..errors import InputError
from ..loading.components import model_configs
from ..model.specs import embedded_tiny
from ..planning.parallel import SINGLE, ParallelLayout
from ..request.checks import FieldError
from ..request.spec import named_at, request_defaults
from .action_request import (
    action_parameters,
    action_seconds,
    action_video_size,
    check_action_limit,
    check_served,
    served_action_dim,
)
from .api_errors import ApiError, bad_request
from .metrics import Metrics
from .queue import JobQueue, Work
from .requests import HTTP_NAMES, IMAGE_FIELDS, READ_APART, VIDEO_FIELDS, ParsedRequest
from .storage_errors import StorageError, storage_error
from .store import Job, JobStore
from .uploads import Upload, saved_name


class Replicas(Protocol):
    """What the routes read of the replicas (serve/replicas/cluster.py `Cluster`): how many were asked for, how
    many run now."""

    replicas: int

    def alive(self) -> int: ...


# The words before a saved input's path in a refusal (app/inputs.py, app/action_files.py), by GenerationConfig
# field: a refusal names the input as the request sent it, never by the server's own path.
INPUT_WORDS = {"image": "image", "video": "video", "actions": "actions file"}


class Service:
    """What the routes share: the model, the store, the queue, the metrics and the settings."""

    def __init__(
        self,
        loaded: LoadedModel,
        store: JobStore,
        queue: JobQueue,
        metrics: Metrics,
        settings: ServeSettings,
        *,
        replicas: Replicas | None = None,
    ) -> None:
        self.loaded, self.store, self.queue, self.metrics, self.settings = loaded, store, queue, metrics, settings
        self.replicas = replicas
        self.action_dim = served_action_dim(loaded)
        tiny = embedded_tiny(loaded.checkpoint, loaded.model)  # as the CLI's defaults say it
        self.action_tier = request_defaults(tiny=tiny, action=True)["resolution"]

    def video_object(self, job: Job) -> dict[str, Any]:
        """OpenAI's video object, with our `parameters` (the resolved request) and `stats` (what it measured)."""
        return {
            "id": job.id,
            "object": "video" if job.kind == "video" else "image",
            "model": self.settings.model_name,
            "status": job.status,
            "progress": job.progress,
            "created_at": job.created_at,
            "completed_at": job.completed_at,
            "expires_at": None,
            "prompt": job.request.get("prompt"),
            "seconds": job.request.get("seconds", "0"),
            "size": job.request.get("size"),
            "remixed_from_video_id": None,
            "error": job.error,
            "parameters": job.request,
            "stats": job.stats,
        }

    def preview_url(self, video_id: str) -> str | None:
        """Where the video job's live preview is served, None when previews are off."""
        return None if self.queue.previews is None else f"/v1/videos/{video_id}/preview"

    def problem(self) -> str | None:
        """Why the server cannot run jobs now (its worker is dead, no replica runs, its storage refuses a
        write), or None."""
        if not self.queue.alive:
            return "the job worker has stopped; restart the server"
        if self.replicas is not None and self.replicas.alive() == 0:
            return "no replica is running (Ray restarts the ones that died); wait, or restart the server"
        return self.store.problem()

    def replica_counts(self) -> dict[str, int] | None:
        """{"replicas": asked for, "alive": running now}, None without replicas. Blocking: a thread's."""
        if self.replicas is None:
            return None
        return {"replicas": self.replicas.replicas, "alive": self.replicas.alive()}

    def admit(self, kind: str, parsed: ParsedRequest, *, suffix: str, seeds: list[int]) -> list[str]:
        """Check each request as the model runs it, record the jobs and queue them (all or none). Blocking
        (it saves and decodes the uploads): run it in a worker thread. An image request's jobs are held from
        the retention until it has read them (`queue.release`)."""
        if parsed.action is not None:
            check_served(parsed.action, self.action_dim)
        self.store.check_room()
        reserved: list[str] = []
        works: list[Work] = []
        inputs: dict[str, tuple[Path, str]] = {}
        try:
            for seed in seeds:
                job_id = self.store.reserve(kind)
                reserved.append(job_id)
                folder = self.store.folder_of(job_id)
                inputs = _save_inputs(parsed, folder)
                values = {**parsed.config, "seed": seed}
                paths = {field: path for field, (path, _) in inputs.items()}
                config = GenerationConfig(**values, **paths, output=folder / f"{kind}{suffix}")
                previews = self.queue.previews
                frames = previews.frames if previews is not None and kind == "video" else 0
                budgeted = self.settings.limit is not None
                config = self.loaded.check(
                    config, budgeted=budgeted, layout=self._layout(config), preview_frames=frames
                )
                if config.action is not None:
                    check_action_limit(config, self.settings.limit)
                read_conditioning(config)  # readable, before it waits
                works.append(Work(job_id, config, kind))
            for work in works if kind == "video" else ():  # before the store shows them: clients may follow
                self.queue.feeds.open(work.job_id, preview_url=self.preview_url(work.job_id))
            model = self.settings.model_name
            self.store.insert([(work.job_id, kind, _public(kind, parsed, work.config, model)) for work in works])
            self.queue.submit(works, hold=kind == "image")
        except InputError as error:
            self._forget(reserved)
            raise _refusal(error, inputs) from None
        except BaseException:
            self._forget(reserved)
            raise
        return reserved

    def _layout(self, config: GenerationConfig) -> ParallelLayout:
        """How a replica of several GPUs spreads `config` over its ranks (an InputError when it cannot)."""
        ranks = self.settings.gpus_per_replica
        if ranks == 1:
            return SINGLE
        return layout_for(config, model_configs(self.loaded.checkpoint, self.loaded.model)[0], ranks, "auto")

    def delete(self, job: Job) -> None:
        """Cancel a waiting or running job, or delete a finished one, with its files. Blocking: a thread's."""
        running = self.queue.cancel(job.id)  # a waiting job leaves the queue, a running one stops
        self.store.delete(job.id, files=not running)  # a running job's folder goes when its worker stops
        self.queue.feeds.close(job.id)  # its clients are told at once: it is gone

    def _forget(self, job_ids: list[str]) -> None:
        """Undo a request that failed after reserving `job_ids`: no folder and no job left (a job the full
        database cannot delete is failed instead, in memory if need be)."""
        for job_id in job_ids:
            try:
                self.store.delete(job_id)
            except StorageError:
                self.store.fail(job_id, "storage_full", "the server's storage was full when this job was created")
            self.queue.feeds.close(job_id)


def _save_inputs(parsed: ParsedRequest, folder: Path) -> dict[str, tuple[Path, str]]:
    """The request's files saved in the job's folder: {GenerationConfig's image, video, actions: (the path,
    the request's name of it)}."""
    uploads = {"image": ("input_reference", parsed.upload), "video": ("input_video", parsed.video_upload)}
    inputs = {}
    try:
        for field, (name, upload) in uploads.items():
            if upload is not None:
                inputs[field] = (_save(upload, folder / saved_name(name, upload)), name)
        rows = None if parsed.action is None else parsed.action.save_rows(folder)
    except OSError as error:
        raise storage_error(error, "the uploaded files") from None
    except RecursionError:  # rows nested deeper than JSON is written
        raise bad_request("action.actions is not a list of rows of numbers", "action.actions") from None
    if rows is not None:
        inputs["actions"] = (rows, parsed.action.rows_name)
    return inputs


def _save(upload: Upload, path: Path) -> Path:
    path.write_bytes(upload.data)
    return path


def _refusal(error: InputError, inputs: dict[str, tuple[Path, str]]) -> ApiError:
    """A request the model cannot take, as a 400: a field named as the API names it, a saved input by the field
    it came from (never by the server's path)."""
    param = None
    if isinstance(error, FieldError):
        error = named_at(error, "http")
        param = error.name
    message = str(error)
    for field, (path, name) in inputs.items():
        said = f"{INPUT_WORDS[field]} {str(path)!r}"
        if said in message:
            message, param = message.replace(said, name), name
        message = message.replace(str(path), path.name)  # any other mention: the file's name alone
    return bad_request(message, param)


def _public(kind: str, parsed: ParsedRequest, config: GenerationConfig, model: str) -> dict[str, Any]:
    """The request as the job reports it, under the API's names: every field the endpoint takes, resolved
    (the effective shift, the seed), with the size, the model, and whether an image was sent."""
    taken = VIDEO_FIELDS if kind == "video" else IMAGE_FIELDS
    request = {
        http_name: getattr(config, name)
        for name, http_name in HTTP_NAMES.items()
        if http_name in taken and http_name not in READ_APART
    }
    request |= {"size": parsed.size, "frames": config.frames, "shift": config.flow_shift, "model": model}
    if kind == "video":
        request |= {"seconds": parsed.seconds, "input_reference": config.image is not None}
        request |= {"input_video": config.video is not None, "action": None}
    if parsed.action is not None:
        request |= {"size": action_video_size(config), "seconds": action_seconds(config)}
        request |= {"action": action_parameters(parsed.action, config)}
    return request
