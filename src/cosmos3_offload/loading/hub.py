"""A checkpoint named by its Hugging Face Hub repo (`nvidia/Cosmos3-Nano`, `nvidia/Cosmos3-Nano@fp8`), found
in the Hugging Face cache and downloaded there when it is missing.

`--checkpoint OWNER/NAME[@REVISION]` (and `check OWNER/NAME`) goes through `huggingface_hub`'s own cache
(`HF_HUB_CACHE`, or `HF_HOME/hub`): `snapshot_download` answers with the snapshot folder of the revision
(a branch such as `main` or `fp8`, a tag, or a commit), downloading with its progress bar only the files
a run reads (`allow_patterns`: see layout.py for what generation opens; never `vision_encoder/`, the
root-level transformers files, the example clips or a pickle; `sound_tokenizer/` only for sound). With
`HF_HUB_OFFLINE=1` nothing is downloaded: a snapshot the cache lacks, or one that lacks a file a run needs,
is one line saying so, not a loader error later. A local folder always wins: text that names an existing
path is that path, whatever it looks like.

Torch-free, and `huggingface_hub` itself is imported only to resolve a repo id: a command given a folder
never pays for it.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError, first_line
from .files import MODULAR_INDEX, read_json

if TYPE_CHECKING:
    from huggingface_hub.errors import HfHubHTTPError

PIPELINE_INDEX = "model_index.json"
WEIGHT_PARTS = ("transformer", "vae")  # read by every run; the sound tokenizer only for sound
SOUND_TOKENIZER = "sound_tokenizer"  # layout.py's SOUND_TOKENIZER (that module imports torch)
# What a run reads besides the model folders: the tokenizer (whatever files it ships, see files.py), the
# scheduler config, and the negative prompts of layout.py's default_negative_prompt (never the clips beside them).
READ_FILES = (
    PIPELINE_INDEX,
    MODULAR_INDEX,
    "text_tokenizer/*",
    "scheduler/scheduler_config.json",
    "assets/negative_prompt.json",
    "assets/negative_prompt_i2v.json",
)
# Never downloaded, even where an allow pattern matches: nothing here unpickles, so no pickle is fetched.
IGNORE_PATTERNS = ("*.pth", "*.pt", "*.bin", "*.pkl", "*.pickle", "*.ckpt")
TOKENIZER_CONFIG = "text_tokenizer/tokenizer_config.json"

MAX_REPO_ID = 96  # the Hub's limit
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"  # a Hub owner or repo name
REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")  # a branch, tag (refs/pr/3 too) or commit
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubRepo:
    """A model repo on the Hugging Face Hub at a revision (None: its default branch), as typed."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def is_repo_id(text: str) -> bool:
    """Whether `text` names a Hub repo (`owner/name`, `owner/name@revision`) and no existing path: a local
    folder always wins, and `./x/y`, `/abs/x`, `x/y/`, `a/b/c` and `C:\\x` are paths, never repos."""
    repo_id = text.partition("@")[0]
    return (
        REPO_ID.fullmatch(repo_id) is not None
        and len(repo_id) <= MAX_REPO_ID
        and "--" not in repo_id
        and ".." not in repo_id
        and not os.path.lexists(text)
    )


def parse_repo_id(text: str) -> HubRepo:
    """The repo and revision of `owner/name[@revision]` (`is_repo_id` text); an InputError for a revision
    that is no branch, tag or commit name."""
    repo_id, at, revision = text.partition("@")
    if not at:
        return HubRepo(repo_id)
    if REVISION.fullmatch(revision) is None or ".." in revision or revision.endswith("/"):
        raise InputError(
            f"{text!r}: {revision!r} is no branch, tag or commit name; write OWNER/NAME@REVISION "
            "(e.g. nvidia/Cosmos3-Nano@fp8), or ./PATH for a local folder"
        )
    return HubRepo(repo_id, revision)


def checkpoint_or_repo(text: str) -> Path | HubRepo:
    """What a `--checkpoint` text names: the Hub repo of a repo id, the path of anything else."""
    return parse_repo_id(text) if is_repo_id(text) else Path(text)


def allow_patterns(*, sound: bool) -> list[str]:
    """The repo files a run reads, as `snapshot_download` patterns: the pipeline indexes, the model folders'
    configs, shard indexes and safetensors, the tokenizer, the scheduler config and the negative prompts;
    `sound_tokenizer/` too with `sound` (its encoder and decoder share one file: the loader reads the decoder)."""
    parts = (*WEIGHT_PARTS, SOUND_TOKENIZER) if sound else WEIGHT_PARTS
    weights = [f"{part}/{name}" for part in parts for name in ("config.json", "*.safetensors.index.json")]
    weights += [f"{part}/*.safetensors" for part in parts]
    return [*READ_FILES, *weights]


def missing_files(folder: Path, *, sound: bool) -> list[str]:
    """The files a run cannot do without that `folder` (a snapshot) lacks, as repo paths: a pipeline index,
    each model folder's config and every weight file its shard index names, the tokenizer's config. A link
    to a blob the cache no longer holds counts as missing. A broken index is left to the loader to name."""
    missing = [] if any(os.path.isfile(folder / name) for name in (PIPELINE_INDEX, MODULAR_INDEX)) else [PIPELINE_INDEX]
    for part in (*WEIGHT_PARTS, SOUND_TOKENIZER) if sound else WEIGHT_PARTS:
        missing += _missing_weights(folder, part)
    if not os.path.isfile(folder / TOKENIZER_CONFIG):
        missing.append(TOKENIZER_CONFIG)
    return missing


def _missing_weights(folder: Path, part: str) -> list[str]:
    missing = [] if os.path.isfile(folder / part / "config.json") else [f"{part}/config.json"]
    indexes = sorted((folder / part).glob("*.safetensors.index.json"))
    if not indexes:  # one weight file: whichever is there, or a link to a blob the cache lost
        found = sorted((folder / part).glob("*.safetensors"))
        lost = [f"{part}/{file.name}" for file in found if not os.path.isfile(file)]
        return missing + (lost or ([] if found else [f"{part}/*.safetensors"]))
    try:
        shards = sorted(set(read_json(indexes[0], "shard index")["weight_map"].values()))
    except (InputError, KeyError, AttributeError, TypeError):
        return missing
    return missing + [f"{part}/{shard}" for shard in shards if not os.path.isfile(folder / part / str(shard))]


def resolve_checkpoint(repo: HubRepo, *, sound: bool, progress: bool = True) -> Path:
    """The snapshot folder of `repo` in the Hugging Face cache, with every file a run reads (`sound`: the
    sound tokenizer's too): downloaded where missing unless HF_HUB_OFFLINE=1 forbids it. Every way this
    can fail (offline and not cached, no such repo or revision, a gated repo, the network, a full disk)
    is one InputError saying what to do."""
    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(
            snapshot_download(
                repo.repo_id,
                revision=repo.revision,
                allow_patterns=allow_patterns(sound=sound),
                ignore_patterns=list(IGNORE_PATTERNS),
                tqdm_class=None if progress else _hidden_bar(),
            )
        )
    except Exception as error:  # huggingface_hub's, httpx's and the OS's errors, each translated
        raise InputError(_download_problem(repo, error, sound=sound)) from None
    offline = constants.HF_HUB_OFFLINE
    # Online, every sound_tokenizer/ file the repo has was fetched: none at all means the repo has none, which
    # the sound checks say in their own words (Super-Image2Video has no sound).
    sound_files = sound and (offline or (folder / SOUND_TOKENIZER).is_dir())
    missing = missing_files(folder, sound=sound_files)
    if missing:
        raise InputError(_incomplete(repo, missing, offline=offline, downloaded=True))
    return folder


def _hidden_bar() -> type:
    """A progress bar class whose bars never show (`--no-progress`); tqdm is imported only for it."""
    from tqdm.auto import tqdm

    class HiddenBar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    return HiddenBar


def _download_problem(repo: HubRepo, error: Exception, *, sound: bool) -> str:
    """One line saying why `repo` could not be had and what to do about it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = constants.HF_HUB_CACHE
    if isinstance(error, HfHubHTTPError):
        return _hub_refusal(repo, error)
    if isinstance(error, LocalEntryNotFoundError):  # not cached (or only in part), and nothing was downloaded
        snapshot = _cached_snapshot(repo, cache)
        if snapshot is not None:
            missing = missing_files(snapshot, sound=sound) or ["some of the files a run reads"]
            return _incomplete(repo, missing, offline=constants.HF_HUB_OFFLINE, downloaded=False)
        where = f"{repo.repo_id!r} is no folder here, and {repo} is not in the Hugging Face cache ({cache})"
        return f"{where}; {_no_download(constants.HF_HUB_OFFLINE)}"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (
            f"no space left on the disk of the Hugging Face cache ({cache}) while downloading {repo}; free some "
            "space, or point HF_HUB_CACHE (or HF_HOME) at a larger disk, and run again"
        )
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"cannot write the Hugging Face cache ({cache}) to download {repo}: {error.strerror}; point "
            "HF_HUB_CACHE (or HF_HOME) at a folder you can write"
        )
    return (
        f"downloading {repo} failed ({type(error).__name__}: {first_line(error)}); check the network "
        "(or HF_ENDPOINT) and run again: what was downloaded is kept"
    )


def _hub_refusal(repo: HubRepo, error: HfHubHTTPError) -> str:
    """What the Hub's answer means: no such repo or revision, a gated or private repo, the Hub down."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    page = f"https://huggingface.co/{repo.repo_id}"
    if isinstance(error, GatedRepoError):
        return f"{repo} is a gated repo: accept its terms at {page} and log in (`hf auth login`, or set HF_TOKEN)"
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{repo.repo_id!r} is no folder here and no Hugging Face repo (a private one needs `hf auth login` "
            "or HF_TOKEN); pass a checkpoint folder, or a repo id such as nvidia/Cosmos3-Nano"
        )
    if isinstance(error, RevisionNotFoundError):
        return f"{repo.repo_id} has no revision {repo.revision!r}; pick a branch, tag or commit of {page}"
    status = None if error.response is None else error.response.status_code
    if status in (401, 403):
        return f"the Hugging Face Hub refused {repo} (HTTP {status}): log in (`hf auth login`) or set HF_TOKEN"
    return f"the Hugging Face Hub could not give {repo} (HTTP {status}: {first_line(error)}); try again later"


def _no_download(offline: bool) -> str:
    if offline:
        return "HF_HUB_OFFLINE=1 forbids downloading it: run once online, or unset HF_HUB_OFFLINE"
    return "the Hugging Face Hub could not be reached to download it: check the network (or HF_ENDPOINT) and run again"


def _incomplete(repo: HubRepo, missing: list[str], *, offline: bool, downloaded: bool) -> str:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    lacks = f"the Hugging Face cache's snapshot of {repo} lacks {missing[0]}{more}"
    if offline or not downloaded:
        return f"{lacks}, and {_no_download(offline)}"
    return (
        f"{lacks} after the download: the Hub could not be reached to fetch it, or the repo lacks it too "
        f"(see https://huggingface.co/{repo.repo_id}/tree/{repo.revision or 'main'})"
    )


def _cached_snapshot(repo: HubRepo, cache: str) -> Path | None:
    """The cache's snapshot folder of `repo` at its revision (a commit, or the commit its ref names), if any."""
    storage = Path(cache) / ("models--" + repo.repo_id.replace("/", "--"))
    revision = repo.revision or "main"
    commit = revision
    if COMMIT.fullmatch(revision) is None:
        try:
            commit = (storage / "refs" / revision).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
    snapshot = storage / "snapshots" / commit
    return snapshot if COMMIT.fullmatch(commit) and snapshot.is_dir() else None
