"""What `cosmos3-offload serve` is asked for besides the model: where to listen, who may call, how many
jobs may wait, where jobs live, and the largest request a budgeted plan was made for.

The CLI checks these flags with the rest before anything loads; the server (serve/) reads them.
No torch here: the entry point imports this module.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
DEFAULT_QUEUE_SIZE = 16  # jobs waiting behind the running one; one more is answered 429
MAX_QUEUE_SIZE = 10_000
DEFAULT_STORAGE = Path("cosmos3-offload-storage")
MIN_API_KEY_CHARS = 8
API_KEY_VARIABLE = "COSMOS3_API_KEY"  # the key's safe form: a flag's value shows in `ps`
# A video job's live preview (app/previews.py): none, fast (a linear map of the latents) or exact (the VAE's
# decode of a few frames); made every --preview-every steps (default: the previewer's, 1 fast, 5 exact).
PREVIEW_KINDS = ("none", "fast", "exact")
DEFAULT_PREVIEW_KIND = "fast"
MAX_PREVIEW_EVERY = 1000  # the most steps a request takes
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_REPLICAS = 1024
MAX_GPUS_PER_REPLICA = 8  # the GPUs of one node: a replica's ranks meet over NCCL on one host


@dataclass(frozen=True)
class Retention:
    """How long finished jobs of one kind are kept: the newest `count` (None: any number), each for at most
    `seconds` after it ended (None: for ever). Written `all`, `N`, a duration (`90m`, `12h`, `7d`) or
    `N,DURATION` (both bounds hold)."""

    count: int | None = None
    seconds: int | None = None

    @classmethod
    def parse(cls, text: str, flag: str) -> Retention:
        """Read `all`, `N`, `DURATION` or `N,DURATION`; an InputError naming `flag` otherwise."""
        if text.strip().lower() == "all":
            return cls()
        count = seconds = None
        for part in text.split(","):
            part = part.strip().lower()
            duration = re.fullmatch(r"([0-9]{1,9})([smhd])", part)
            if part.isdigit() and len(part) <= 9 and count is None:
                count = int(part)
            elif duration is not None and seconds is None:
                seconds = int(duration[1]) * _DURATION_UNITS[duration[2]]
            else:
                raise InputError(
                    f"{flag} must be all, a count (100), an age (90m, 12h, 7d) or both (100,7d), got {text!r}"
                )
        if count == 0 or seconds == 0:
            raise InputError(f"{flag}: keep at least one job for at least a second (all: keep every job), got {text!r}")
        return cls(count, seconds)

    def __str__(self) -> str:
        parts = [] if self.count is None else [str(self.count)]
        if self.seconds is not None:
            unit = next(u for u in "dhms" if self.seconds % _DURATION_UNITS[u] == 0)
            parts.append(f"{self.seconds // _DURATION_UNITS[unit]}{unit}")
        return ",".join(parts) or "all"


KEEP_VIDEOS, KEEP_IMAGES = Retention(), Retention(count=100, seconds=86400)


@dataclass(frozen=True)
class RequestLimit:
    """The largest request a `--vram-budget` plan was made for: a request with more frames or more pixels
    per frame than this could need more device memory than the plan left, so the server refuses it."""

    frames: int
    width: int
    height: int

    def refusal(self, frames: int, width: int, height: int) -> str | None:
        """Why (frames, width, height) does not fit under this limit, or None when it does."""
        if frames <= self.frames and width * height <= self.width * self.height:
            return None
        return (
            f"this server planned its memory for at most {self.frames} frames of {self.width}x{self.height}; "
            f"{frames} frames of {width}x{height} is larger (restart it with a larger --frames/--resolution)"
        )


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """`host` and `port` to listen on; `api_key` (None: open) is the bearer token every API call needs;
    `queue_size` jobs may wait behind the running one; `storage` holds the job database and files;
    `limit` (None: any request the machine fits) comes from a budget's plan; `model_name` is what the
    API reports as the model; `progress` shows the load's progress bar; `allow_origins` are the web
    origins (scheme://host[:port]) besides the server's own whose pages may call it; `keep_videos` and
    `keep_images` say how long finished jobs and their files are kept; `preview_kind` (none, fast, exact) and
    `preview_every` (steps between previews; None: the kind's default) the live preview of each video job;
    `replicas` copies of the model run jobs (more than one, several GPUs each, or a `ray_address`: on Ray Serve,
    serve/replicas/), each on `gpus_per_replica` GPUs of one node (its ranks run each job together, CFG-parallel
    and Ulysses), in a local Ray or the cluster at `ray_address`."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    queue_size: int = DEFAULT_QUEUE_SIZE
    storage: Path = DEFAULT_STORAGE
    limit: RequestLimit | None = None
    model_name: str = "cosmos3"
    defaults: dict[str, Any] | None = None  # request defaults: frames, resolution, steps, guidance
    progress: bool = True
    allow_origins: tuple[str, ...] = ()
    keep_videos: Retention = KEEP_VIDEOS
    keep_images: Retention = KEEP_IMAGES
    preview_kind: str = DEFAULT_PREVIEW_KIND
    preview_every: int | None = None
    replicas: int = 1
    gpus_per_replica: int = 1
    ray_address: str | None = None

    @property
    def on_ray(self) -> bool:
        """Whether jobs run on Ray Serve replicas instead of this process's one model."""
        return self.replicas > 1 or self.gpus_per_replica > 1 or self.ray_address is not None

    def __post_init__(self) -> None:
        check_host(self.host)
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InputError(f"--port must be a whole number from 0 to 65535 (0: any free port), got {self.port!r}")
        if self.api_key is not None and (len(self.api_key) < MIN_API_KEY_CHARS or not self.api_key.isprintable()):
            raise InputError(f"--api-key must be at least {MIN_API_KEY_CHARS} printable characters")
        if self.api_key is not None and any(c.isspace() for c in self.api_key):
            raise InputError("--api-key must not hold spaces (it is sent as 'Authorization: Bearer KEY')")
        object.__setattr__(self, "allow_origins", tuple(check_origin(origin) for origin in self.allow_origins))
        if not isinstance(self.queue_size, int) or not 1 <= self.queue_size <= MAX_QUEUE_SIZE:
            raise InputError(f"--queue-size must be a whole number from 1 to {MAX_QUEUE_SIZE}, got {self.queue_size!r}")
        object.__setattr__(self, "storage", Path(self.storage))
        if self.preview_kind not in PREVIEW_KINDS:
            raise InputError(f"--preview-kind must be one of {', '.join(PREVIEW_KINDS)}, got {self.preview_kind!r}")
        every = self.preview_every
        if every is not None:
            if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= MAX_PREVIEW_EVERY:
                raise InputError(
                    f"--preview-every must be a whole number of steps from 1 to {MAX_PREVIEW_EVERY}, got {every!r}"
                )
            if self.preview_kind == "none":
                raise InputError("--preview-every goes with a preview; drop it, or pass --preview-kind fast or exact")
        self._check_replicas()
        if self.storage.exists() and not self.storage.is_dir():
            raise InputError(f"--storage {str(self.storage)!r} is a file; pass a folder (it is created if missing)")
        if not self.storage.exists() and not self.storage.parent.is_dir():
            raise InputError(f"--storage {str(self.storage)!r}: its parent folder does not exist; create it first")

    def _check_replicas(self) -> None:
        replicas, gpus = self.replicas, self.gpus_per_replica
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= MAX_REPLICAS:
            raise InputError(f"--replicas must be a whole number from 1 to {MAX_REPLICAS}, got {replicas!r}")
        if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= MAX_GPUS_PER_REPLICA:
            raise InputError(
                f"--gpus-per-replica must be a whole number from 1 to {MAX_GPUS_PER_REPLICA}, got {gpus!r}"
            )
        if self.ray_address is not None and not self.ray_address.strip():
            raise InputError(
                "--ray-address must name a cluster (auto, or HOST:PORT of its head); drop it for a local Ray"
            )


def check_host(host: str) -> None:
    """An IP address or a plain host name (uvicorn resolves it); anything else is a typo."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.split(".")
    if not host or len(host) > 253 or not all(label and label.replace("-", "").isalnum() for label in labels):
        raise InputError(f"--host {host!r} is neither an IP address nor a host name")


def check_origin(origin: str) -> str:
    """A web origin as browsers send it (`scheme://host[:port]`, no path), lower-cased; else an InputError."""
    match = re.fullmatch(r"(https?)://([^/?#@\s]+?)(:[0-9]{1,5})?/?", origin.strip(), flags=re.IGNORECASE)
    if match is None:
        raise InputError(f"--allow-origin must be scheme://host[:port] (http://localhost:3000), got {origin!r}")
    return f"{match[1]}://{match[2]}{match[3] or ''}".lower()


# The server, as the console script passes it to the CLI: (the opened model, the settings) -> exit status.
Serve = Callable[[Any, ServeSettings], int]
