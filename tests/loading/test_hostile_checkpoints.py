"""A hostile or broken checkpoint is refused in one line, in seconds, before anything is built: configs that
claim more than the shards hold, names that are no regular files (a link to /dev/zero, a FIFO), a scheduler
config or a negative prompt a run would fail on."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cosmos3_offload.app.check import CheckpointProblems, Machine, check_folder
from cosmos3_offload.app.cli import main
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading import checkpoint as checkpoint_module
from cosmos3_offload.loading.checkpoint import model_config
from cosmos3_offload.loading.files import MAX_JSON_BYTES, CheckpointWeights
from cosmos3_offload.loading.layout import pipeline_options

INDEX = "diffusion_pytorch_model.safetensors.index.json"
PREFIX = "cosmos3-offload: error: "
NO_GPU = Machine(None, None, None)


@pytest.fixture
def ckpt(published_checkpoint, tmp_path) -> Path:
    """A copy of the published tiny folder (2 layers, z_dim 48, with sound) to damage."""
    return Path(shutil.copytree(published_checkpoint, tmp_path / "ckpt", symlinks=True))


@pytest.fixture
def never_build(monkeypatch):
    """Fail the test if a model is built from a checkpoint's config before it is refused."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built from the config before the refusal")

    monkeypatch.setattr(checkpoint_module, "build_on_meta", refuse)
    checkpoint_module._build_problem.cache_clear()
    yield
    checkpoint_module._build_problem.cache_clear()


def edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def problems_of(folder: Path) -> list[str]:
    """Every problem `check` lists for `folder` ([] for a good one)."""
    try:
        check_folder(folder, NO_GPU)
    except CheckpointProblems as problems:
        return problems.problems
    return []


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    try:
        code = main(list(args))
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err.splitlines()


# --- Sizes a config claims -------------------------------------------------------------------------

CLAIMS = {
    # id: (model folder, config changes, what the refusal names)
    "layers-1e9": ("transformer", {"num_hidden_layers": 10**9}, ("num_hidden_layers", "1000000000", "hold 2 layers")),
    "layers-1e9-float": ("transformer", {"num_hidden_layers": 1e9}, ("num_hidden_layers", "hold 2 layers")),
    "hidden-size": ("transformer", {"hidden_size": 10**9}, ("hidden_size", "hold 64", "embed_tokens.weight")),
    "heads": ("transformer", {"num_attention_heads": 10**6}, ("num_attention_heads", "hold 4", "to_q.weight")),
    "vocab": ("transformer", {"vocab_size": 10**9}, ("vocab_size", "hold 261", "embed_tokens.weight")),
    "vae-z-dim": ("vae", {"z_dim": 1e9}, ("z_dim", "hold 48", "post_quant_conv.weight")),
    "vae-base-dim": ("vae", {"base_dim": 10**8}, ("base_dim", "hold 8", "encoder.conv_in.weight")),
    "vae-res-blocks": ("vae", {"num_res_blocks": 10**9}, ("num_res_blocks", "weights")),
    "vae-dim-mult-long": ("vae", {"dim_mult": [1, 2, 4, 4] * 1000}, ("dim_mult", "4000 entries", "4 decoder up")),
    "vae-dim-mult-wide": ("vae", {"dim_mult": [1, 2, 4, 10**9]}, ("dim_mult", "1000000000", "the largest is")),
    "sound-dec-dim": ("sound_tokenizer", {"dec_dim": 10**9}, ("dec_dim", "decoder.conv2.weight_v")),
    "sound-blocks": ("sound_tokenizer", {"enc_num_blocks": 10**9}, ("enc_num_blocks", "weights")),
}


@pytest.mark.parametrize("case", list(CLAIMS), ids=list(CLAIMS))
def test_a_config_claiming_more_than_its_shards_is_refused_before_any_build(ckpt, never_build, case):
    """If this fails, a config's sizes are trusted: building its model costs memory or minutes before a refusal."""
    part, changes, names = CLAIMS[case]
    edit_json(ckpt / part / "config.json", **changes)
    with pytest.raises(InputError) as refused:
        model_config(ckpt, part)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{part} config ") and str(ckpt / part / "config.json") in message
    for name in names:
        assert name in message, message


def test_a_claim_whose_weight_is_missing_is_still_bounded(ckpt, never_build):
    """If this fails, removing the weight that pins a size lets the config claim any size and build it."""
    for file in (ckpt / "transformer").glob("*.safetensors"):
        tensors = load_file(file)
        if "embed_tokens.weight" in tensors:
            del tensors["embed_tokens.weight"]
            save_file(tensors, file, metadata={"format": "pt"})
    index = json.loads((ckpt / "transformer" / INDEX).read_text())
    del index["weight_map"]["embed_tokens.weight"]
    (ckpt / "transformer" / INDEX).write_text(json.dumps(index))
    edit_json(ckpt / "transformer" / "config.json", hidden_size=10**9)
    refusal = r"hidden_size is 1000000000, but no weight in its shards has an axis that large \(the largest is"
    with pytest.raises(InputError, match=refusal):
        model_config(ckpt, "transformer")


@pytest.fixture
def never_build_many_layers(monkeypatch):
    """Fail the test if a transformer of more than the 2 stored layers is built (other models build as usual)."""
    build = checkpoint_module.build_on_meta

    def refuse(cls, config):
        assert config.get("num_hidden_layers", 0) <= 2, "a model of the claimed size was built"
        return build(cls, config)

    monkeypatch.setattr(checkpoint_module, "build_on_meta", refuse)
    checkpoint_module._build_problem.cache_clear()
    yield
    checkpoint_module._build_problem.cache_clear()


@pytest.mark.parametrize("command", ["check", "plan", "generate"])
def test_every_command_refuses_a_billion_layers_in_one_line(ckpt, tmp_path, capsys, never_build_many_layers, command):
    """If this fails, `check`, `plan` or `generate` builds a model of the claimed size (memory for minutes)."""
    edit_json(ckpt / "transformer" / "config.json", num_hidden_layers=10**9)
    output = tmp_path / "fox.mp4"
    args = {
        "check": ["check", str(ckpt)],
        "plan": ["plan", "--checkpoint", str(ckpt), "--vram-budget", "8GiB"],
        "generate": ["generate", "--checkpoint", str(ckpt), "--prompt", "a fox", "--output", str(output)],
    }[command]
    code, lines = run_cli(capsys, *args)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(PREFIX) and "num_hidden_layers is 1000000000, but its shards hold 2 layers" in lines[0]
    assert not output.exists()


# --- Names that are no regular files ---------------------------------------------------------------


def replace_with(file: Path, make: Callable[[Path], None]) -> None:
    file.unlink()
    make(file)


def dev_zero(file: Path) -> None:
    file.symlink_to("/dev/zero")


def fifo(file: Path) -> None:
    os.mkfifo(file)


def second_shard(ckpt: Path) -> Path:
    return sorted((ckpt / "transformer").glob("*-of-*.safetensors"))[1]


def test_a_shard_linked_to_dev_zero_is_named_for_what_it_is(ckpt, no_hang):
    """If this fails, a shard that is a link to /dev/zero is called missing, or is read (forever)."""
    shard = second_shard(ckpt)
    replace_with(shard, dev_zero)
    lines = [p for p in problems_of(ckpt) if shard.name in p]
    assert len(lines) == 1 and "is a link to '/dev/zero', a character device" in lines[0], lines
    assert "missing" not in lines[0]
    with pytest.raises(InputError, match="a character device"):
        CheckpointWeights(ckpt / "transformer")  # the loader's own check


@pytest.mark.parametrize("make", [fifo, dev_zero], ids=["fifo", "dev-zero"])
def test_a_lone_weight_file_that_is_no_file_is_refused_without_reading_it(ckpt, no_hang, make):
    """If this fails, the one weight file of a folder without an index is opened and read: a FIFO blocks."""
    weights = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    replace_with(weights, make)
    with pytest.raises(InputError, match=r"diffusion_pytorch_model.safetensors' is (a FIFO|a link to '/dev/zero')"):
        CheckpointWeights(ckpt / "vae")


# Each file a run reads, replaced by a FIFO: what the refusal must say.
READ_FILES = [
    "model_index.json",
    "vae/config.json",
    f"transformer/{INDEX}",
    "scheduler/scheduler_config.json",
    "text_tokenizer/tokenizer.json",
    "text_tokenizer/chat_template.jinja",
    "assets/negative_prompt.json",
    "assets/negative_prompt_i2v.json",
]


@pytest.mark.parametrize("relative", READ_FILES)
def test_every_file_a_run_reads_must_be_a_regular_file(ckpt, no_hang, relative):
    """If this fails, a FIFO in the folder blocks `check` (and a run) or is reported as missing or ignored."""
    replace_with(ckpt / relative, fifo)
    lines = problems_of(ckpt)
    assert any(relative in line and "is a FIFO (named pipe), not a regular file" in line for line in lines), lines


def test_a_broken_link_is_named_not_skipped(ckpt):
    """If this fails, a scheduler config that links to nothing is skipped and the run quietly uses defaults."""
    replace_with(ckpt / "scheduler" / "scheduler_config.json", lambda f: f.symlink_to(ckpt / "gone.json"))
    assert any("is a link to" in line and "which is missing" in line for line in problems_of(ckpt))


def test_a_json_file_too_large_for_one_is_refused_unread(ckpt):
    """If this fails, a config the size of a disk is read whole into memory before it is refused."""
    with open(ckpt / "vae" / "config.json", "r+b") as handle:
        handle.truncate(MAX_JSON_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(InputError, match=f"holds {MAX_JSON_BYTES + 1} bytes, too many for a JSON file"):
        model_config(ckpt, "vae")


# --- What a run reads besides the models -----------------------------------------------------------

SCHEDULERS = {
    "negative-train-steps": ({"num_train_timesteps": -1}, "num_train_timesteps -1"),
    "huge-train-steps": ({"num_train_timesteps": 10**12}, "num_train_timesteps 1000000000000"),
    "unknown-solver": ({"solver_type": "x"}, "UniPCMultistepScheduler refuses it"),
    "unknown-spacing": ({"timestep_spacing": "x"}, "UniPCMultistepScheduler refuses it"),
}


@pytest.mark.parametrize("case", list(SCHEDULERS), ids=list(SCHEDULERS))
def test_a_scheduler_config_diffusers_rejects_is_one_line_in_check_and_generate(ckpt, tmp_path, capsys, case):
    """If this fails, `check` passes a scheduler config that `generate` fails on (in a traceback, after the load)."""
    changes, said = SCHEDULERS[case]
    edit_json(ckpt / "scheduler" / "scheduler_config.json", **changes)
    with pytest.raises(InputError, match="scheduler_config.json"):
        pipeline_options(ckpt)
    assert [line for line in problems_of(ckpt) if "scheduler_config.json" in line and said in line]
    output = tmp_path / "fox.mp4"
    code, lines = run_cli(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", "a fox", "--output", str(output))
    assert code == 2 and len(lines) == 1 and said in lines[0], lines
    assert not output.exists()


@pytest.mark.parametrize("name", ["negative_prompt.json", "negative_prompt_i2v.json"])
def test_check_refuses_the_negative_prompt_generate_refuses(ckpt, name):
    """If this fails, `check` passes a folder whose default negative prompt `generate` cannot read."""
    (ckpt / "assets" / name).write_text("{oops")
    lines = problems_of(ckpt)
    assert len(lines) == 1 and f"assets/{name}" in lines[0] and "cannot be read as JSON" in lines[0], lines
