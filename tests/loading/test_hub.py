"""A checkpoint named by its Hub repo id resolves through the Hugging Face cache, downloads only what a run reads,
and says in one line what is wrong when it cannot (offline, not cached, incomplete, refused, disk full).

The cache is laid out by hand as `huggingface_hub` writes it (`models--nvidia--Cosmos3-Nano/blobs/<hash>`,
`snapshots/<commit>/...` linking to the blobs, `refs/main`, `refs/fp8`), holding the tiny published-layout folder's
files that `allow_patterns` lets through. No test can reach the network: every one runs with `HF_HUB_OFFLINE=1`
(huggingface_hub's own switch then refuses every request), or with `snapshot_download` replaced.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects
from in_process_cli import cli
from published_layout import never_read_files
from small_disk import fill, small_disk

from cosmos3_offload.app.cli import main
from cosmos3_offload.app.cli.commands import samples_sound, with_checkpoint
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.hub import (
    IGNORE_PATTERNS,
    HubRepo,
    allow_patterns,
    checkpoint_or_repo,
    is_repo_id,
    missing_files,
    parse_repo_id,
    resolve_checkpoint,
)

REPO = "nvidia/Cosmos3-Nano"
MAIN = hashlib.sha1(b"main").hexdigest()  # the commits the refs name
FP8 = hashlib.sha1(b"fp8").hexdigest()
PINNED = hashlib.sha1(b"an older commit").hexdigest()  # reachable by its hash only
# Files of NVIDIA's FP8 release beyond the bf16 layout (fp8_layout.py): none is read.
FP8_RELEASE_EXTRAS = ("hf_quant_config.json", "modelopt_state.pth", "transformer/modelopt_state.pth")
REPO_FILES = (".gitattributes", "README.md", "LICENSE")


def repo_files(folder: Path) -> list[str]:
    """The folder's files as repo paths."""
    return sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())


def downloaded(folder: Path, *, sound: bool) -> list[str]:
    """What `snapshot_download` fetches of a repo holding `folder`'s files, by huggingface_hub's own matching."""
    return list(
        filter_repo_objects(
            repo_files(folder), allow_patterns=allow_patterns(sound=sound), ignore_patterns=list(IGNORE_PATTERNS)
        )
    )


def storage_of(cache: Path, repo_id: str = REPO) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def write_snapshot(cache: Path, source: Path, commit: str, files: list[str], ref: str | None = None) -> Path:
    """`files` of `source` as huggingface_hub caches them: one blob per content, linked from the commit's snapshot."""
    storage = storage_of(cache)
    for name in files:
        data = (source / name).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # as huggingface_hub writes it: no newline
    return storage / "snapshots" / commit


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every test: HF_HUB_OFFLINE=1 (read by huggingface_hub at import, so its constant too) and an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))


@pytest.fixture(scope="module")
def cache(published_checkpoint, tmp_path_factory) -> Path:
    """A cache holding what a download without sound fetches, at main, fp8 and a pinned commit; read-only."""
    folder = tmp_path_factory.mktemp("hf") / "hub"
    files = downloaded(published_checkpoint, sound=False)
    for commit, ref in ((MAIN, "main"), (FP8, "fp8"), (PINNED, None)):
        write_snapshot(folder, published_checkpoint, commit, files, ref)
    return folder


@pytest.fixture
def use(monkeypatch):
    """Point huggingface_hub at a cache folder."""
    return lambda folder: monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))


# --- What is a repo id --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", [REPO, f"{REPO}@fp8", f"{REPO}@{MAIN}", f"{REPO}@refs/pr/3", "org_1/model.v2", "a/b@v1.0"]
)
def test_repo_ids_are_recognised(text, tmp_path, monkeypatch):
    """Fails when an owner/name[@revision] with no such path is taken for a path."""
    monkeypatch.chdir(tmp_path)
    assert is_repo_id(text)


@pytest.mark.parametrize(
    "text",
    ["./nvidia/Cosmos3-Nano", "/models/Cosmos3-Nano", "nvidia/Cosmos3-Nano/", "a/b/c", "C:\\models\\nano",
     "C:/models", "~/models", "../x/y", "Cosmos3-Nano", "a--b/c", "a/b..c", "-a/b", "a/b.", ".a/b", "", "/"],
)  # fmt: skip
def test_paths_are_never_repo_ids(text, tmp_path, monkeypatch):
    """Fails when a relative, absolute, Windows-style or deeper path (or a name the Hub refuses) is sent to the Hub."""
    monkeypatch.chdir(tmp_path)
    assert not is_repo_id(text)
    assert isinstance(checkpoint_or_repo(text), Path)


@pytest.mark.parametrize("text", [REPO, f"{REPO}@fp8"])
def test_a_local_folder_of_that_name_wins(text, tmp_path, monkeypatch):
    """Fails when `nvidia/Cosmos3-Nano` is looked up on the Hub although a folder of that name is right here."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / text).mkdir(parents=True)
    assert checkpoint_or_repo(text) == Path(text)


def test_the_revision_follows_the_at(tmp_path, monkeypatch):
    """Fails when the revision is lost or kept in the repo id."""
    monkeypatch.chdir(tmp_path)
    assert parse_repo_id(REPO) == HubRepo(REPO)
    assert parse_repo_id(f"{REPO}@fp8") == HubRepo(REPO, "fp8")
    assert str(HubRepo(REPO, "fp8")) == f"{REPO}@fp8"


@pytest.mark.parametrize("revision", ["", "../../etc", "a b", "main/", "-x"])
def test_a_revision_that_names_nothing_is_one_line(revision):
    """Fails when an empty or path-climbing revision reaches the cache's refs/ folder."""
    with pytest.raises(InputError, match="is no branch, tag or commit name") as refused:
        parse_repo_id(f"{REPO}@{revision}")
    assert "\n" not in str(refused.value)


def test_the_module_imports_neither_torch_nor_huggingface_hub():
    """Fails when resolving the CLI's --checkpoint text costs the import of torch or huggingface_hub."""
    probe = "import sys, cosmos3_offload.loading.hub; print(sorted({'torch', 'huggingface_hub'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


# --- What is downloaded -------------------------------------------------------------------------------------


def test_every_file_a_run_reads_is_downloaded(published_checkpoint):
    """Fails when a file generation reads (shards, configs, tokenizer, scheduler, negative prompts) is left out."""
    files = repo_files(published_checkpoint)
    read = sorted(
        set(files) - {f.relative_to(published_checkpoint).as_posix() for f in never_read_files(published_checkpoint)}
    )
    without_sound = [f for f in read if not f.startswith("sound_tokenizer/")]
    assert {"transformer/diffusion_pytorch_model.safetensors.index.json", "assets/negative_prompt_i2v.json"} <= set(
        without_sound
    )
    assert downloaded(published_checkpoint, sound=False) == without_sound
    assert downloaded(published_checkpoint, sound=True) == read
    modular = ["modular_model_index.json"]  # the distilled repos' schedule
    assert list(filter_repo_objects(modular, allow_patterns=allow_patterns(sound=False))) == modular


def test_nothing_generation_never_reads_is_downloaded(published_checkpoint):
    """Fails when vision_encoder/, the root transformers files, an example clip, a pickle, the FP8 release's
    extras or the repo's own files would be fetched."""
    never = [f.relative_to(published_checkpoint).as_posix() for f in never_read_files(published_checkpoint)]
    assert any(f.startswith("vision_encoder/") for f in never) and "assets/robot_pouring.mp4" in never
    for sound in (False, True):
        fetched = list(
            filter_repo_objects(
                [*never, *FP8_RELEASE_EXTRAS, *REPO_FILES, "text_tokenizer/legacy.bin"],
                allow_patterns=allow_patterns(sound=sound),
                ignore_patterns=list(IGNORE_PATTERNS),
            )
        )
        assert fetched == []


def test_the_sound_tokenizer_is_downloaded_only_for_sound(published_checkpoint):
    """Fails when a run without sound fetches the sound tokenizer (encoder and decoder share its one file), or
    a run with sound lacks it."""
    sound_files = [f for f in repo_files(published_checkpoint) if f.startswith("sound_tokenizer/")]
    assert sound_files == ["sound_tokenizer/config.json", "sound_tokenizer/diffusion_pytorch_model.safetensors"]
    assert not set(sound_files) & set(downloaded(published_checkpoint, sound=False))
    assert set(sound_files) <= set(downloaded(published_checkpoint, sound=True))


@pytest.mark.parametrize("sound", [False, True])
def test_the_download_asks_for_those_files_at_the_revision(monkeypatch, tmp_path, sound):
    """Fails when snapshot_download is called without the patterns (the whole repo: 30 GB more) or revision."""
    calls = []

    def fake(repo_id, **options):
        calls.append((repo_id, options))
        raise OSError(errno.EIO, "stop here")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    with pytest.raises(InputError):
        resolve_checkpoint(HubRepo(REPO, "fp8"), sound=sound)
    ((repo_id, options),) = calls
    assert repo_id == REPO and options["revision"] == "fp8"
    assert options["allow_patterns"] == allow_patterns(sound=sound)
    assert options["ignore_patterns"] == list(IGNORE_PATTERNS)


# --- Resolving from the cache, offline -----------------------------------------------------------------------


@pytest.mark.parametrize("revision, commit", [(None, MAIN), ("main", MAIN), ("fp8", FP8), (PINNED, PINNED)])
def test_a_cached_revision_resolves_offline(cache, use, revision, commit):
    """Fails when refs/main, refs/fp8 or a commit hash does not lead to its snapshot with HF_HUB_OFFLINE=1."""
    use(cache)
    folder = resolve_checkpoint(HubRepo(REPO, revision), sound=False)
    assert folder == storage_of(cache) / "snapshots" / commit
    assert (folder / "model_index.json").is_file()


def test_not_cached_offline_is_one_line(use, tmp_path):
    """Fails when a repo missing from the cache gives huggingface_hub's paragraph, not one line saying what to do."""
    use(tmp_path / "cache")
    with pytest.raises(InputError) as refused:
        resolve_checkpoint(HubRepo(REPO), sound=False)
    message = str(refused.value)
    assert "\n" not in message and "is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in message and "unset HF_HUB_OFFLINE" in message


def test_an_uncached_revision_offline_is_one_line(cache, use):
    """Fails when a revision the cache has no ref for is not named in one line."""
    use(cache)
    with pytest.raises(InputError, match=r"nvidia/Cosmos3-Nano@v2 is not in the Hugging Face cache") as refused:
        resolve_checkpoint(HubRepo(REPO, "v2"), sound=False)
    assert "\n" not in str(refused.value)


def test_a_missing_shard_offline_is_one_line_before_the_loader(published_checkpoint, use, tmp_path):
    """Fails when a snapshot that lacks a shard (an interrupted download) is handed to the loader offline."""
    files = downloaded(published_checkpoint, sound=False)
    shard = "transformer/diffusion_pytorch_model-00003-of-00007.safetensors"
    write_snapshot(tmp_path / "cache", published_checkpoint, MAIN, [f for f in files if f != shard], "main")
    use(tmp_path / "cache")
    with pytest.raises(InputError) as refused:
        resolve_checkpoint(HubRepo(REPO), sound=False)
    assert str(refused.value) == (
        f"the Hugging Face cache's snapshot of {REPO} lacks {shard}, and HF_HUB_OFFLINE=1 forbids downloading it: "
        "run once online, or unset HF_HUB_OFFLINE"
    )


def test_a_link_to_a_deleted_blob_is_missing(published_checkpoint, use, tmp_path):
    """Fails when a snapshot link whose blob was deleted (cache cleaning) counts as present."""
    snapshot = write_snapshot(
        tmp_path / "cache", published_checkpoint, MAIN, downloaded(published_checkpoint, sound=False), "main"
    )
    (snapshot / "vae" / "diffusion_pytorch_model.safetensors").resolve().unlink()
    use(tmp_path / "cache")
    with pytest.raises(InputError, match="lacks vae/diffusion_pytorch_model.safetensors, and HF_HUB_OFFLINE=1"):
        resolve_checkpoint(HubRepo(REPO), sound=False)


def test_sound_offline_needs_the_sound_tokenizer_in_the_cache(cache, use):
    """Fails when a snapshot fetched without sound passes for a sound run offline (the loader would then say the
    repo has no sound tokenizer)."""
    use(cache)
    with pytest.raises(InputError, match=r"lacks sound_tokenizer/config.json \(and 1 more\), and HF_HUB_OFFLINE=1"):
        resolve_checkpoint(HubRepo(REPO), sound=True)


def test_an_incomplete_snapshot_by_the_cached_listing_is_one_line(published_checkpoint, use, tmp_path):
    """Fails when a file only huggingface_hub's cached repo listing knows is missing (a negative prompt) gives its
    paragraph, or passes."""
    files = downloaded(published_checkpoint, sound=False)
    write_snapshot(tmp_path / "cache", published_checkpoint, MAIN, [f for f in files if not f.startswith("assets/")])
    storage = storage_of(tmp_path / "cache")
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(MAIN)
    listing = {
        name: {"size": 1, "blob_id": hashlib.sha1(name.encode()).hexdigest()}
        for name in repo_files(published_checkpoint)
    }
    (storage / "trees").mkdir()
    (storage / "trees" / f"{MAIN}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    use(tmp_path / "cache")
    with pytest.raises(InputError) as refused:
        resolve_checkpoint(HubRepo(REPO), sound=False)
    assert str(refused.value).startswith(f"the Hugging Face cache's snapshot of {REPO} lacks some of the files")
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in str(refused.value) and "\n" not in str(refused.value)


def test_missing_files_names_what_the_loader_needs(published_checkpoint, tmp_path):
    """Fails when a folder without a pipeline index, a config, a shard or the tokenizer config counts as whole."""
    folder = write_snapshot(tmp_path, published_checkpoint, MAIN, downloaded(published_checkpoint, sound=True))
    assert missing_files(folder, sound=True) == []
    for name in ("model_index.json", "transformer/config.json", "text_tokenizer/tokenizer_config.json"):
        (folder / name).unlink()
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert missing_files(folder, sound=True) == [
        "model_index.json", "transformer/config.json", "vae/*.safetensors", "text_tokenizer/tokenizer_config.json"
    ]  # fmt: skip


# --- What the Hub or the disk refuses ------------------------------------------------------------------------


def http_error(cls: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}")
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    "error, expected",
    [
        (lambda: http_error(GatedRepoError, 403), "is a gated repo: accept its terms at https://huggingface.co/"),
        (lambda: http_error(RepositoryNotFoundError, 401), "is no folder here and no Hugging Face repo"),
        (lambda: http_error(RevisionNotFoundError, 404), "has no revision 'v9'; pick a branch, tag or commit"),
        (lambda: http_error(HfHubHTTPError, 401), "refused nvidia/Cosmos3-Nano@v9 (HTTP 401): log in"),
        (lambda: http_error(HfHubHTTPError, 503), "could not give nvidia/Cosmos3-Nano@v9 (HTTP 503"),
        (lambda: OSError(errno.EACCES, "Permission denied"), "cannot write the Hugging Face cache"),
        (lambda: httpx2.ConnectError("connection reset"), "downloading nvidia/Cosmos3-Nano@v9 failed (ConnectError"),
    ],
)
def test_each_refusal_is_one_line_that_says_what_to_do(monkeypatch, error, expected):
    """Fails when an error of the Hub, the network or the cache folder escapes untranslated or spans lines."""

    def fake(repo_id, **options):
        raise error()

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    with pytest.raises(InputError) as refused:
        resolve_checkpoint(HubRepo(REPO, "v9"), sound=False)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_a_full_disk_while_downloading_is_one_line(monkeypatch, tmp_path):
    """Fails when running out of space in the cache mid-download is a traceback, not one line naming the cache."""
    with small_disk(tmp_path / "disk", size="1M") as disk:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(disk))

        def fake(repo_id, **options):  # writes a blob as a download does, on a full disk
            fill(disk)
            (disk / "blob.incomplete").write_bytes(b"\0" * 65536)

        monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
        with pytest.raises(InputError) as refused:
            resolve_checkpoint(HubRepo(REPO), sound=False)
    assert str(refused.value).startswith(f"no space left on the disk of the Hugging Face cache ({disk})")


# --- Through the command line --------------------------------------------------------------------------------


def test_generate_runs_from_the_cache_offline(cache, use, capsys, tmp_path, monkeypatch):
    """Fails when `generate --checkpoint nvidia/Cosmos3-Nano` cannot run from the files a download fetches,
    with the network forbidden."""
    use(cache)
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "fox.png"
    code, out, err = cli(
        capsys, "generate", "--checkpoint", REPO, "--prompt", "a fox", "--frames", "1", "--steps", "1",
        "--resolution", "256", "--device", "cpu", "--no-progress", "--output", str(output),
    )  # fmt: skip
    assert code == 0, err
    assert output.is_file()


def test_generate_with_a_file_missing_offline_exits_2_in_one_line(published_checkpoint, use, capsys, tmp_path):
    """Fails when the CLI lets a cached snapshot without its VAE reach the loader, or says it in more than one line."""
    files = [f for f in downloaded(published_checkpoint, sound=False) if not f.startswith("vae/")]
    write_snapshot(tmp_path / "cache", published_checkpoint, MAIN, files, "main")
    use(tmp_path / "cache")
    code, _, err = cli(
        capsys, "generate", "--checkpoint", REPO, "--prompt", "a fox", "--output", str(tmp_path / "o.mp4")
    )
    assert code == 2 and err.count("\n") == 1
    assert "error: the Hugging Face cache's snapshot of nvidia/Cosmos3-Nano lacks vae/config.json" in err


def test_check_takes_a_repo_id(cache, use, capsys, tmp_path, monkeypatch):
    """Fails when `check nvidia/Cosmos3-Nano` is refused as no folder instead of checking the cached snapshot."""
    use(cache)
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "check", f"{REPO}@fp8")
    assert code == 0
    assert f"checkpoint {str(storage_of(cache) / 'snapshots' / FP8)!r}: a Cosmos3 pipeline; every check passed" in out


def test_check_of_an_uncached_repo_offline_exits_2_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "check", REPO)
    assert code == 2 and err.count("\n") == 1 and "HF_HUB_OFFLINE=1 forbids downloading it" in err


def test_plan_resolves_with_the_sound_it_plans(cache, use, capsys, tmp_path, monkeypatch):
    """Fails when `plan --sound` does not ask the cache for the sound tokenizer it counts."""
    use(cache)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "plan", "--checkpoint", REPO, "--vram-budget", "8GiB", "--sound", "--device", "cpu")
    assert code == 2 and "lacks sound_tokenizer/config.json" in err


def test_sample_files_ask_for_sound_themselves(tmp_path):
    """Fails when a sample's enable_sound does not fetch the sound tokenizer (then every sound sample is refused)."""
    sample = tmp_path / "s.json"
    sample.write_text(json.dumps({"name": "fox", "prompt": "a fox", "enable_sound": True}))
    assert samples_sound(argparse.Namespace(sound=None, input=[sample]))
    assert not samples_sound(argparse.Namespace(sound=False, input=[sample]))


def test_workers_open_the_resolved_snapshot(tmp_path):
    """Fails when `generate --gpus N` workers would look the repo up again (the branch may have moved)."""
    argv = ["generate", "--checkpoint", REPO, "--prompt", "a fox"]
    assert with_checkpoint(argv, tmp_path / "snap") == [*argv, f"--checkpoint={tmp_path / 'snap'}"]
    assert with_checkpoint([*argv, "--", "x"], tmp_path)[-3:] == [f"--checkpoint={tmp_path}", "--", "x"]


def test_serve_opens_the_snapshot_and_names_the_model_by_its_repo(cache, use, tmp_path, monkeypatch):
    """Fails when `serve --checkpoint nvidia/Cosmos3-Nano@fp8` opens anything but the fp8 snapshot, or calls the
    model by its commit hash."""
    use(cache)
    monkeypatch.chdir(tmp_path)
    served = {}

    def fake_server(loaded, settings):
        served.update(checkpoint=loaded.checkpoint, name=settings.model_name)
        return 0

    argv = [
        "serve",
        "--checkpoint",
        f"{REPO}@fp8",
        "--device",
        "cpu",
        "--storage",
        str(tmp_path / "s"),
        "--no-progress",
    ]
    assert main(argv, serve=fake_server) == 0
    assert served == {"checkpoint": storage_of(cache) / "snapshots" / FP8, "name": f"{REPO}@fp8"}


def test_the_entry_point_leaves_a_repo_id_to_the_full_command(tmp_path, monkeypatch):
    """Fails when the entry point's early file checks refuse `--checkpoint nvidia/Cosmos3-Nano` as no folder."""
    from cosmos3_offload.app.launch import checkpoint_argument

    monkeypatch.chdir(tmp_path)
    assert checkpoint_argument(["generate", "--checkpoint", REPO, "--prompt", "x"]) is None
    assert checkpoint_argument(["generate", "--checkpoint=./x/y", "--prompt", "x"]) == Path("x/y")
