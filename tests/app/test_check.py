"""`cosmos3-offload check DIR`: every problem of a damaged folder, one line each, exit 2, nothing
written; a good folder (the published layout) gets its report and exit 0."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from published_layout import corrupt, never_read_files, pickle_marker, write_published_checkpoint
from safetensors.torch import load_file, save_file

from cosmos3_offload.app.check import Machine, check_folder, describe
from cosmos3_offload.app.cli import main
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.checkpoint import inspect_checkpoint
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.units import GIB, MIB

INDEX = "diffusion_pytorch_model.safetensors.index.json"
PREFIX = "cosmos3-offload: error: "


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    return write_published_checkpoint(tmp_path_factory.mktemp("hub") / "Cosmos3-Nano")


@pytest.fixture
def ckpt(published, tmp_path) -> Path:
    """A copy of the published folder to damage."""
    return Path(shutil.copytree(published, tmp_path / "ckpt"))


# --- Damage -----------------------------------------------------------------------------------------


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*-of-*.safetensors"))


def holding(folder: Path, key: str) -> Path:
    return next(f for f in sorted(folder.glob("*.safetensors")) if key in load_file(f))


def rewrite(file: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def missing_shard(ckpt: Path) -> tuple[str, ...]:
    shard = shards(ckpt / "transformer")[1]
    shard.unlink()
    return (shard.name, INDEX)


def extra_shard(ckpt: Path) -> tuple[str, ...]:
    shutil.copy(shards(ckpt / "transformer")[0], ckpt / "transformer" / "extra.safetensors")
    return ("extra.safetensors", "does not name")


def truncated_header(ckpt: Path) -> tuple[str, ...]:
    shard = shards(ckpt / "transformer")[2]
    data = shard.read_bytes()
    shard.write_bytes(data[: 8 + struct.unpack("<Q", data[:8])[0] // 2])
    return (shard.name, "not a whole safetensors file")


def index_names_absent(ckpt: Path) -> tuple[str, ...]:
    index = json.loads((ckpt / "transformer" / INDEX).read_text())
    index["weight_map"]["ghost.weight"] = shards(ckpt / "transformer")[0].name
    (ckpt / "transformer" / INDEX).write_text(json.dumps(index))
    return (INDEX, "ghost.weight", "does not hold it")


def wrong_shape(ckpt: Path) -> tuple[str, ...]:
    key = "layers.1.self_attn.to_k.weight"
    file = holding(ckpt / "transformer", key)
    rewrite(file, lambda t: t.update({key: t[key][:-1].clone()}))
    return (file.name, key, "shape")


def wrong_dtype(ckpt: Path) -> tuple[str, ...]:
    key = "decoder.conv_out.weight"
    file = holding(ckpt / "vae", key)
    rewrite(file, lambda t: t.update({key: t[key].to(torch.int8)}))
    return (file.name, key, "I8")


def fp8_weights(ckpt: Path) -> tuple[str, ...]:
    """FP8 weights in a folder whose config says nothing of how they were quantized."""
    file = shards(ckpt / "transformer")[0]
    rewrite(file, lambda t: t.update({k: v.to(torch.float8_e4m3fn) for k, v in t.items() if v.ndim == 2}))
    return (file.name, "in FP8", "no quantization_config")


def unknown_class_name(ckpt: Path) -> tuple[str, ...]:
    edit_json(ckpt / "transformer" / "config.json", _class_name="FluxTransformer2DModel")
    return ("transformer/config.json", "FluxTransformer2DModel", "Cosmos3OmniTransformer")


def unknown_scheduler(ckpt: Path) -> tuple[str, ...]:
    edit_json(ckpt / "scheduler" / "scheduler_config.json", _class_name="DDIMScheduler")
    return ("scheduler_config.json", "DDIMScheduler")


def rejected_config(ckpt: Path) -> tuple[str, ...]:
    edit_json(ckpt / "transformer" / "config.json", hidden_act="gelu_tanh")
    return ("transformer/config.json", "cannot build a Cosmos3OmniTransformer")


def not_cosmos3(ckpt: Path) -> tuple[str, ...]:
    edit_json(ckpt / "model_index.json", _class_name="WanPipeline")
    return ("WanPipeline", "not a Cosmos3OmniPipeline")


def sound_tokenizer_shape(ckpt: Path) -> tuple[str, ...]:
    file = ckpt / "sound_tokenizer" / "diffusion_pytorch_model.safetensors"
    key = next(k for k, v in sorted(load_file(file).items()) if k.startswith("decoder.") and v.ndim >= 2)
    rewrite(file, lambda t: t.update({key: t[key][:-1].clone()}))
    return ("sound_tokenizer", key, "shape")


def bad_distilled_sigmas(ckpt: Path) -> tuple[str, ...]:
    modular = {"_class_name": "Cosmos3DistilledModularPipeline", "distilled_sigmas": [0.2, 0.9]}
    (ckpt / "modular_model_index.json").write_text(json.dumps(modular))
    return ("modular_model_index.json", "distilled_sigmas")


def scheduler_rejected(ckpt: Path) -> tuple[str, ...]:
    """A scheduler config diffusers refuses: generate would fail on it after the load."""
    edit_json(ckpt / "scheduler" / "scheduler_config.json", num_train_timesteps=-1)
    return ("scheduler_config.json", "num_train_timesteps -1")


def bad_negative_prompt(ckpt: Path) -> tuple[str, ...]:
    """A default negative prompt generate refuses to read."""
    (ckpt / "assets" / "negative_prompt.json").write_text("{oops")
    return ("assets/negative_prompt.json", "cannot be read as JSON")


def claims_more_layers(ckpt: Path) -> tuple[str, ...]:
    edit_json(ckpt / "transformer" / "config.json", num_hidden_layers=10**9)
    return ("transformer/config.json", "num_hidden_layers is 1000000000, but its shards hold 2 layers")


# One damage per case of the issue: each is exactly one problem, so exactly one line.
DAMAGES = {
    "missing-shard": missing_shard,
    "extra-shard": extra_shard,
    "truncated-header": truncated_header,
    "index-names-absent-weight": index_names_absent,
    "wrong-shape": wrong_shape,
    "wrong-dtype": wrong_dtype,
    "fp8-weights": fp8_weights,
    "unknown-class-name": unknown_class_name,
    "unknown-scheduler": unknown_scheduler,
    "config-rejected": rejected_config,
    "not-cosmos3": not_cosmos3,
    "sound-tokenizer-shape": sound_tokenizer_shape,
    "bad-distilled-sigmas": bad_distilled_sigmas,
    "scheduler-rejected": scheduler_rejected,
    "bad-negative-prompt": bad_negative_prompt,
    "claims-more-layers": claims_more_layers,
}


# --- Running the command ----------------------------------------------------------------------------


def files_of(root: Path) -> dict[str, tuple[int, int]]:
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in root.rglob("*")}


def run_check(capsys, monkeypatch, folder: Path, cwd: Path) -> tuple[int, str, list[str]]:
    """Exit status, stdout and stderr lines of `check folder`, run from `cwd`; asserts nothing was written
    into the folder or the working directory."""
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    before = files_of(folder) if folder.exists() else {}
    try:
        code = main(["check", str(folder)])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    assert (files_of(folder) if folder.exists() else {}) == before, "check wrote into the checkpoint folder"
    assert list(cwd.iterdir()) == [], "check wrote into the working directory"
    assert captured.err == "" or captured.err.endswith("\n")
    return code, captured.out, captured.err.splitlines()


def assert_refused(code: int, out: str, lines: list[str], *expected: tuple[str, ...]) -> None:
    """Exit 2, nothing on stdout, one error line per expected problem, each naming its parts."""
    assert code == 2, lines
    assert out == ""
    assert len(lines) == len(expected), "\n".join(lines)
    for line, names in zip(lines, expected, strict=True):
        assert line.startswith(PREFIX), line
        for name in names:
            assert name in line, f"{name!r} not named in: {line}"


@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
def test_each_damage_is_one_line_and_exit_2(ckpt, tmp_path, capsys, monkeypatch, damage):
    """If this fails, a damaged folder passes `check`, crashes, writes a file, or is not one line per problem."""
    names = DAMAGES[damage](ckpt)
    assert_refused(*run_check(capsys, monkeypatch, ckpt, tmp_path / "cwd"), names)


def test_every_problem_is_listed_not_only_the_first(ckpt, tmp_path, capsys, monkeypatch):
    """If this fails, `check` stops at the first problem like the loader instead of listing them all."""
    shard, extra, dtype, scheduler = missing_shard(ckpt), extra_shard(ckpt), wrong_dtype(ckpt), unknown_scheduler(ckpt)
    code, out, lines = run_check(capsys, monkeypatch, ckpt, tmp_path / "cwd")
    # The pipeline's own files first, then each model folder in turn.
    assert_refused(code, out, lines, scheduler, shard, extra, dtype)


def test_the_loader_raises_the_first_problem_check_lists(ckpt):
    """If this fails, `check` and the loader disagree: the loader stops at a problem `check` does not list first."""
    missing_shard(ckpt)
    wrong_dtype(ckpt)
    problems = inspect_checkpoint(ckpt).problems
    assert len(problems) == 2
    with pytest.raises(InputError) as refused:
        load_components(ckpt, torch.device("cpu"), torch.float32)
    assert str(refused.value) == problems[0]


@pytest.mark.parametrize(
    "make",
    [lambda d: None, lambda d: d.mkdir(), lambda d: (d.mkdir(), (d / "model_index.json").write_text("{oops"))],
    ids=["absent", "empty-folder", "index-not-json"],
)
def test_a_folder_that_is_no_checkpoint_is_one_line(tmp_path, capsys, monkeypatch, make):
    """If this fails, a path that is not a pipeline folder gets a traceback or a flood of follow-on lines."""
    folder = tmp_path / "nothing"
    make(folder)
    code, out, lines = run_check(capsys, monkeypatch, folder, tmp_path / "cwd")
    assert_refused(code, out, lines, (str(folder),))


# --- A good folder ----------------------------------------------------------------------------------


def test_published_folder_passes_and_is_described(ckpt, tmp_path, capsys, monkeypatch):
    """If this fails, a good published-layout folder is refused or its report misses what it holds."""
    code, out, lines = run_check(capsys, monkeypatch, ckpt, tmp_path / "cwd")
    assert (code, lines) == (0, [])
    assert "every check passed" in out
    assert "model: tiny size (hidden 64, 2 layers" in out
    assert "sound (sound_dim 8; decoded by sound_tokenizer/" in out
    assert "action (action_dim 32; loaded with the generator for --action" in out and "14 domains fit" in out
    assert "transformer 7 file(s): fp32" in out and "sound_tokenizer 1 file(s): fp32" in out
    groups = out.split("groups, as loaded (bf16): ")[1].splitlines()[0]
    for group in ("embedding", "reasoner", "generator", "vae", "vae_encoder", "sound", "never read:"):
        assert re.search(rf"(^| ){group} \d", groups), groups
    assert "plans for the default request (1280x720, 189 frames, 35 steps, guidance 6" in out
    assert "all resident: GPU peak" in out and "all staged: GPU peak" in out


def test_check_reads_nothing_generation_leaves_alone(ckpt, tmp_path, capsys, monkeypatch):
    """If this fails, `check` opens vision_encoder/, the root transformers files, assets or a pickle."""
    corrupt(never_read_files(ckpt))
    code, out, lines = run_check(capsys, monkeypatch, ckpt, tmp_path / "cwd")
    assert (code, lines) == (0, []) and "every check passed" in out
    assert not pickle_marker(ckpt).exists()


def test_a_distilled_folder_with_only_the_modular_index_passes(ckpt, tmp_path, capsys, monkeypatch):
    """If this fails, a distilled repo's folder (modular_model_index.json) is taken for a non-pipeline."""
    modular = {"_class_name": "Cosmos3DistilledModularPipeline", "distilled_sigmas": [1.0, 0.9, 0.6, 0.3]}
    (ckpt / "modular_model_index.json").write_text(json.dumps(modular))
    (ckpt / "model_index.json").unlink()
    edit_json(ckpt / "scheduler" / "scheduler_config.json", _class_name="FlowMatchEulerDiscreteScheduler")
    code, out, lines = run_check(capsys, monkeypatch, ckpt, tmp_path / "cwd")
    assert (code, lines) == (0, [])
    assert "scheduler: FlowMatchEulerDiscreteScheduler; distilled: a fixed 4-step schedule" in out


def test_plans_say_what_fits_the_gpu(published):
    """If this fails, the report's plan lines ignore the GPU's free memory."""
    contents = inspect_checkpoint(published)
    roomy = describe(published, contents, Machine("Test GPU (cuda:0)", 80 * GIB, 500 * GIB))
    assert "all resident: GPU peak" in roomy and ": fits" in roomy and "does not fit" not in roomy
    assert "this machine: Test GPU (cuda:0), 80.00 GiB free" in roomy
    assert "the planner's pick for 80.0 GiB: reasoner resident; generator resident; vae resident" in roomy
    tight = describe(published, contents, Machine("Test GPU (cuda:0)", 1 * MIB, 500 * GIB))
    assert tight.count("does not fit") == 2 and "the planner's pick: none; nothing fits" in tight
    cpu = describe(published, contents, Machine(None, None, 500 * GIB))
    assert "this machine: no GPU" in cpu and "need a GPU budget of at least" in cpu


def test_check_folder_returns_the_report_for_a_good_folder(published):
    """If this fails, the library call behind `check` refuses the folder the CLI test above passes."""
    assert check_folder(published, Machine(None, None, None)).startswith(f"checkpoint {str(published)!r}")


def test_installed_script_lists_each_problem(ckpt, tmp_path):
    """If this fails, the console script prints warnings or tracebacks around the problem lines."""
    names = [missing_shard(ckpt), rejected_config(ckpt)]
    script = Path(sys.executable).parent / "cosmos3-offload"
    result = subprocess.run(
        [str(script), "check", str(ckpt)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert_refused(result.returncode, result.stdout, result.stderr.splitlines(), names[1], names[0])
