"""A checkpoint folder is never trusted as found: shards load exactly like one file, and every kind
of damage is refused, before any weight is allocated, by an InputError that names the file (through
the CLI: one line on stderr, exit status 2, nothing written)."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_pipeline

from cosmos3_offload.app.cli import main
from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading import components as components_module
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.loading.files import check_checkpoint
from cosmos3_offload.planning.plan import GroupPlan, Plan

CPU = torch.device("cpu")
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = f"{WEIGHTS}.index.json"
# Shard sizes of the saved variants: "sharded" has a few shards per model, "fine" many.
SHARD_SIZES = {"sharded": {"transformer": "200KB", "vae": "1MB"}, "fine": {"transformer": "40KB", "vae": "300KB"}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One tiny pipeline saved by diffusers as one file per model ("single") and sharded ("sharded", "fine")."""
    root = tmp_path_factory.mktemp("saved")
    pipe = tiny_pipeline()
    pipe.save_pretrained(root / "single")
    for variant, sizes in SHARD_SIZES.items():
        shutil.copytree(root / "single", root / variant)
        for part, size in sizes.items():
            shutil.rmtree(root / variant / part)
            getattr(pipe, part).save_pretrained(root / variant / part, max_shard_size=size)
            assert len(shards(root / variant / part)) >= 3 and (root / variant / part / INDEX).is_file()
    return root


def copy_of(saved: Path, tmp_path: Path, variant: str) -> Path:
    return Path(shutil.copytree(saved / variant, tmp_path / "ckpt"))


# --- Editing a saved checkpoint --------------------------------------------------------------------


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*-of-*.safetensors"))


def weight_file(folder: Path, which: int) -> Path:
    """The `which`-th shard of a sharded folder, or its one weight file."""
    found = shards(folder)
    return found[which] if found else folder / WEIGHTS


def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def write_weight_map(folder: Path, mapping: dict[str, str]) -> None:
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = mapping
    (folder / INDEX).write_text(json.dumps(index))


def rewrite(file: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def cut(file: Path, keep: Callable[[bytes], int]) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: keep(data)])


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


# Truncations: bytes kept of a file of `data`.
CUTS = {
    "last-byte": lambda data: len(data) - 1,
    "half-the-data": lambda data: (8 + header_length(data) + len(data)) // 2,
    "all-the-data": lambda data: 8 + header_length(data),
    "inside-header": lambda data: 8 + header_length(data) // 2,
    "inside-length": lambda data: 5,
    "empty": lambda data: 0,
}


@dataclass(frozen=True)
class Damage:
    """A way to break a saved checkpoint: `apply` breaks the copy and returns what the error must name."""

    id: str
    variant: str
    apply: Callable[[Path], tuple[str, ...]]


def truncated(part: str, which: int, how: str) -> Callable[[Path], tuple[str, ...]]:
    def apply(ckpt: Path) -> tuple[str, ...]:
        file = weight_file(ckpt / part, which)
        cut(file, CUTS[how])
        return (file.name, part)

    return apply


def missing_shard(part: str, which: int) -> Callable[[Path], tuple[str, ...]]:
    def apply(ckpt: Path) -> tuple[str, ...]:
        file = weight_file(ckpt / part, which)
        file.unlink()
        return (file.name, INDEX)

    return apply


def stray(part: str, kind: str) -> Callable[[Path], tuple[str, ...]]:
    """A weight file the index does not name, beside the shards."""

    def apply(ckpt: Path) -> tuple[str, ...]:
        folder = ckpt / part
        if kind == "stale-single-file":  # an older unsharded save left behind: same keys, other values
            name = WEIGHTS
            save_file({k: v + 1 for k, v in load_file(shards(folder)[0]).items()}, folder / name)
        elif kind == "copy-of-a-shard":
            name = "extra.safetensors"
            shutil.copy(shards(folder)[-1], folder / name)
        else:  # overriding one weight only
            name = "override.safetensors"
            key = sorted(load_file(shards(folder)[0]))[0]
            save_file({key: torch.zeros_like(load_file(shards(folder)[0])[key])}, folder / name)
        return (name, INDEX)

    return apply


def duplicated(part: str) -> Callable[[Path], tuple[str, ...]]:
    """One key of the first shard also stored in the second, the index unchanged."""

    def apply(ckpt: Path) -> tuple[str, ...]:
        first, second = shards(ckpt / part)[:2]
        key = sorted(load_file(first))[0]
        value = load_file(first)[key]
        rewrite(second, lambda t: t.update({key: value}))
        return (first.name, second.name, key)

    return apply


def ghost_in_index(part: str) -> Callable[[Path], tuple[str, ...]]:
    def apply(ckpt: Path) -> tuple[str, ...]:
        mapping = weight_map(ckpt / part)
        shard = shards(ckpt / part)[0].name
        write_weight_map(ckpt / part, {**mapping, "ghost.weight": shard})
        return (INDEX, "ghost.weight", shard)

    return apply


def dropped_from_shard(part: str) -> Callable[[Path], tuple[str, ...]]:
    """A key taken out of its shard while the index still names it there."""

    def apply(ckpt: Path) -> tuple[str, ...]:
        shard = shards(ckpt / part)[1]
        key = sorted(load_file(shard))[0]
        rewrite(shard, lambda t: t.pop(key))
        return (INDEX, key, shard.name)

    return apply


def misplaced_in_index(part: str) -> Callable[[Path], tuple[str, ...]]:
    """The index puts a key in the second shard; the first holds it."""

    def apply(ckpt: Path) -> tuple[str, ...]:
        first, second = shards(ckpt / part)[:2]
        key = sorted(load_file(first))[0]
        write_weight_map(ckpt / part, {**weight_map(ckpt / part), key: second.name})
        return (INDEX, key, first.name)

    return apply


def index_outside(part: str) -> Callable[[Path], tuple[str, ...]]:
    """The index names a file in another folder."""

    def apply(ckpt: Path) -> tuple[str, ...]:
        mapping = weight_map(ckpt / part)
        key = sorted(mapping)[0]
        write_weight_map(ckpt / part, {**mapping, key: f"../{part}/{mapping[key]}"})
        return (INDEX, f"../{part}/")

    return apply


def index_without_map(value: object) -> Callable[[Path], tuple[str, ...]]:
    def apply(ckpt: Path) -> tuple[str, ...]:
        (ckpt / "transformer" / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": value}))
        return (INDEX, "weight_map")

    return apply


def no_index(part: str) -> Callable[[Path], tuple[str, ...]]:
    def apply(ckpt: Path) -> tuple[str, ...]:
        (ckpt / part / INDEX).unlink()
        return (shards(ckpt / part)[0].name, "no shard index")

    return apply


def second_file_no_index(part: str) -> Callable[[Path], tuple[str, ...]]:
    def apply(ckpt: Path) -> tuple[str, ...]:
        shutil.copy(ckpt / part / WEIGHTS, ckpt / part / "diffusion_pytorch_model.fp16.safetensors")
        return ("diffusion_pytorch_model.fp16.safetensors", "no shard index")

    return apply


def two_indexes(ckpt: Path) -> tuple[str, ...]:
    shutil.copy(ckpt / "transformer" / INDEX, ckpt / "transformer" / "model.safetensors.index.json")
    return (INDEX, "model.safetensors.index.json")


def no_weights(part: str) -> Callable[[Path], tuple[str, ...]]:
    def apply(ckpt: Path) -> tuple[str, ...]:
        for file in [*(ckpt / part).glob("*.safetensors"), *(ckpt / part).glob("*.index.json")]:
            file.unlink()
        return (str(ckpt / part), "no .safetensors")

    return apply


def removed(relative: str, *names: str) -> Callable[[Path], tuple[str, ...]]:
    def apply(ckpt: Path) -> tuple[str, ...]:
        (ckpt / relative).unlink()
        return (relative, *names)

    return apply


# Unreadable JSON: the bytes a file is replaced with.
BAD_JSON = {
    "garbage": lambda old: b"{oops",
    "empty": lambda old: b"",
    "cut-in-half": lambda old: old[: len(old) // 2],
    "not-utf8": lambda old: b"\xff\xfe\x00{",
    "a-list": lambda old: b"[1, 2]",
}
JSON_FILES = {
    "single": ["model_index.json", "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json"],
    "sharded": [f"transformer/{INDEX}", f"vae/{INDEX}"],
}
TOKENIZER_FILES = ["text_tokenizer/tokenizer.json", "text_tokenizer/tokenizer_config.json"]


def bad_json(relative: str, how: str) -> Callable[[Path], tuple[str, ...]]:
    def apply(ckpt: Path) -> tuple[str, ...]:
        file = ckpt / relative
        file.write_bytes(BAD_JSON[how](file.read_bytes()))
        return (relative,)

    return apply


def config_edit(part: str, **changes) -> Callable[[Path], tuple[str, ...]]:
    """The model's config.json edited so that it no longer describes the stored weights."""

    def apply(ckpt: Path) -> tuple[str, ...]:
        edit_json(ckpt / part / "config.json", **changes)
        return (f"{part}/config.json",)

    return apply


def unknown_scheduler(ckpt: Path) -> tuple[str, ...]:
    edit_json(ckpt / "scheduler" / "scheduler_config.json", _class_name="DDIMScheduler")
    return ("scheduler/scheduler_config.json", "DDIMScheduler")


def wrong_shape(part: str, key: str) -> Callable[[Path], tuple[str, ...]]:
    """One stored weight one row short; the config and the index untouched."""

    def apply(ckpt: Path) -> tuple[str, ...]:
        file = next(f for f in ckpt.glob(f"{part}/*.safetensors") if key in load_file(f))
        rewrite(file, lambda t: t.update({key: t[key][:-1].clone()}))
        return (file.name, key)

    return apply


def wrong_dtype(part: str, key: str, dtype: torch.dtype) -> Callable[[Path], tuple[str, ...]]:
    """One stored weight of a dtype that is no weight's (it would be cast silently)."""

    def apply(ckpt: Path) -> tuple[str, ...]:
        file = next(f for f in ckpt.glob(f"{part}/*.safetensors") if key in load_file(f))
        rewrite(file, lambda t: t.update({key: t[key].to(dtype)}))
        return (file.name, key)

    return apply


def extra_weight(part: str, key: str) -> Callable[[Path], tuple[str, ...]]:
    """A weight the model does not have, stored in the (first) weight file and named by its index."""

    def apply(ckpt: Path) -> tuple[str, ...]:
        file = weight_file(ckpt / part, 0)
        rewrite(file, lambda t: t.update({key: torch.ones(3, 4)}))
        if (ckpt / part / INDEX).is_file():
            write_weight_map(ckpt / part, {**weight_map(ckpt / part), key: file.name})
        return (file.name, key)

    return apply


def missing_weight(part: str, key: str) -> Callable[[Path], tuple[str, ...]]:
    """A weight the model needs, taken out of its file and its index."""

    def apply(ckpt: Path) -> tuple[str, ...]:
        file = next(f for f in ckpt.glob(f"{part}/*.safetensors") if key in load_file(f))
        rewrite(file, lambda t: t.pop(key))
        if (ckpt / part / INDEX).is_file():
            write_weight_map(ckpt / part, {k: v for k, v in weight_map(ckpt / part).items() if k != key})
        return (str(ckpt / part), key)

    return apply


def spot(part: str, which: int) -> str:
    return f"{part}{which}" if which >= 0 else f"{part}-last"


DAMAGES = [
    *[
        Damage(f"truncated-{variant}-{spot(part, which)}-{how}", variant, truncated(part, which, how))
        for variant, part, which in [
            ("sharded", "transformer", 0),
            ("sharded", "transformer", -1),
            ("sharded", "vae", 1),
            ("single", "transformer", 0),
            ("single", "vae", 0),
        ]
        for how in CUTS
    ],
    *[
        Damage(f"missing-shard-{spot(part, which)}", "sharded", missing_shard(part, which))
        for part, which in [("transformer", 0), ("transformer", -1), ("vae", 0)]
    ],
    *[
        Damage(f"stray-{part}-{kind}", "sharded", stray(part, kind))
        for part in ("transformer", "vae")
        for kind in ("stale-single-file", "copy-of-a-shard", "override-one-weight")
    ],
    *[Damage(f"duplicate-key-{part}", "sharded", duplicated(part)) for part in ("transformer", "vae")],
    *[Damage(f"index-ghost-{part}", "sharded", ghost_in_index(part)) for part in ("transformer", "vae")],
    *[Damage(f"index-dropped-{part}", "sharded", dropped_from_shard(part)) for part in ("transformer", "vae")],
    *[Damage(f"index-misplaced-{part}", "sharded", misplaced_in_index(part)) for part in ("transformer", "vae")],
    Damage("index-outside-folder", "sharded", index_outside("transformer")),
    Damage("index-map-a-list", "sharded", index_without_map(["a", "b"])),
    Damage("index-map-of-numbers", "sharded", index_without_map({"proj_in.weight": 1})),
    Damage("index-without-map", "sharded", index_without_map(None)),
    Damage("two-indexes", "sharded", two_indexes),
    *[Damage(f"shards-no-index-{part}", "sharded", no_index(part)) for part in ("transformer", "vae")],
    *[Damage(f"two-files-no-index-{part}", "single", second_file_no_index(part)) for part in ("transformer", "vae")],
    *[
        Damage(f"no-weights-{variant}-{part}", variant, no_weights(part))
        for variant in ("single", "sharded")
        for part in ("transformer", "vae")
    ],
    Damage("no-transformer-config", "single", removed("transformer/config.json", "missing")),
    Damage("no-vae-config", "single", removed("vae/config.json", "missing")),
    Damage("no-model-index", "single", removed("model_index.json")),
    *[
        Damage(f"bad-json-{relative.replace('/', '-')}-{how}", variant, bad_json(relative, how))
        for variant, files in JSON_FILES.items()
        for relative in files
        for how in BAD_JSON
    ],
    *[
        Damage(f"bad-json-{relative.replace('/', '-')}-{how}", "single", bad_json(relative, how))
        for relative in TOKENIZER_FILES
        for how in ("garbage", "cut-in-half")
    ],
    *[
        Damage(f"config-unusable-{name}", "single", config_edit(part, **changes))
        for name, part, changes in [
            ("hidden-size-text", "transformer", {"hidden_size": "big"}),
            ("no-layers", "transformer", {"num_hidden_layers": 0}),
            ("negative-layers", "transformer", {"num_hidden_layers": -1}),
            ("layers-text", "transformer", {"num_hidden_layers": "two"}),
            ("unknown-activation", "transformer", {"hidden_act": "gelu_tanh"}),
            ("rope-axes-two", "transformer", {"rope_axes_dim": [4, 4]}),
            ("rope-axes-sum", "transformer", {"rope_axes_dim": [4, 4, 4]}),
            ("vae-z-dim-text", "vae", {"z_dim": "many"}),
            ("vae-dim-mult-number", "vae", {"dim_mult": 3}),
            ("transformer-class", "transformer", {"_class_name": "FluxTransformer2DModel"}),
            ("vae-class", "vae", {"_class_name": "AutoencoderKL"}),
        ]
    ],
    Damage("unknown-scheduler", "single", unknown_scheduler),
    *[
        Damage(f"config-{name}-{variant}", variant, config_edit(part, **changes))
        for variant in ("single", "sharded")
        for name, part, changes in [
            ("hidden-size-up", "transformer", {"hidden_size": 96}),
            ("hidden-size-down", "transformer", {"hidden_size": 32}),
            ("fewer-layers", "transformer", {"num_hidden_layers": 1}),
            ("more-layers", "transformer", {"num_hidden_layers": 3}),
            ("intermediate-size", "transformer", {"intermediate_size": 96}),
            ("kv-heads", "transformer", {"num_key_value_heads": 4}),
            ("head-dim", "transformer", {"head_dim": 8}),
            ("vocab-size", "transformer", {"vocab_size": 300}),
            ("sound-head", "transformer", {"sound_gen": True, "sound_dim": 8}),
            ("vae-base-dim", "vae", {"base_dim": 16}),
            ("vae-decoder-dim", "vae", {"decoder_base_dim": 16}),
            ("vae-res-blocks", "vae", {"num_res_blocks": 2}),
        ]
    ],
    *[
        Damage(f"wrong-shape-{variant}-{key}", variant, wrong_shape(part, key))
        for variant in ("single", "sharded")
        for part, key in [
            ("transformer", "proj_in.weight"),
            ("transformer", "layers.1.self_attn.to_k.weight"),
            ("transformer", "embed_tokens.weight"),
            ("vae", "decoder.conv_out.weight"),
        ]
    ],
    *[
        Damage(f"wrong-dtype-{key}-{str(dtype)[6:]}", "sharded", wrong_dtype(part, key, dtype))
        for part, key, dtype in [
            ("transformer", "proj_in.weight", torch.int8),
            ("transformer", "layers.0.mlp.up_proj.weight", torch.int64),
            ("vae", "decoder.conv_out.weight", torch.bool),
            ("transformer", "layers.0.self_attn.to_q.weight", torch.float8_e4m3fn),  # FP8 without a quantization_config
            ("transformer", "layers.0.mlp.up_proj.weight", torch.float8_e5m2),  # an FP8 format that does not run
        ]
    ],
    *[
        Damage(f"extra-weight-{variant}-{key}", variant, extra_weight(part, key))
        for variant in ("single", "sharded")
        for part, key in [
            ("transformer", "foo.weight"),
            ("transformer", "layers.0.self_attn.extra_proj.weight"),
            ("transformer", "layers.7.mlp.up_proj.weight"),
            ("transformer", "proj_in.weight.extra"),
            ("vae", "decoder.extra.weight"),
        ]
    ],
    *[
        Damage(f"missing-weight-{variant}-{key}", variant, missing_weight(part, key))
        for variant in ("single", "sharded")
        for part, key in [
            ("transformer", "layers.0.self_attn.to_q.weight"),
            ("transformer", "time_embedder.linear_1.weight"),
            ("vae", "encoder.conv_in.weight"),
        ]
    ],
]


@pytest.fixture
def never_allocate(monkeypatch):
    """Fail the test if any weight is placed (allocated) before the refusal."""

    class Refused:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a weight home was allocated before the checkpoint was refused")

    monkeypatch.setattr(components_module, "Placer", Refused)


# --- Sharded == one file ---------------------------------------------------------------------------


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.is_meta}


@pytest.mark.parametrize("variant", ["sharded", "fine"])
@pytest.mark.parametrize(
    "plan",
    [Plan(), Plan.from_offload(["reasoner", "generator", "vae"])],
    ids=["resident", "staged"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sharded_checkpoint_loads_the_same_weights(saved, variant, plan, dtype):
    """If this fails, a sharded checkpoint (as real Cosmos3 ships) loads other weights than the one-file save."""
    single = load_components(saved / "single", CPU, dtype, plan)
    sharded = load_components(saved / variant, CPU, dtype, plan)
    for attr in ("transformer", "vae"):
        a, b = parameters(getattr(single, attr)), parameters(getattr(sharded, attr))
        assert a.keys() == b.keys() and len(a) > 20
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{attr}.{name}"
    source = tiny_pipeline()
    if dtype == torch.float32:  # and both are the weights that were saved
        for attr in ("transformer", "vae"):
            original = dict(getattr(source, attr).named_parameters())
            for name, value in parameters(getattr(sharded, attr)).items():
                assert torch.equal(value, original[name]), f"{attr}.{name}"


def test_sharded_checkpoint_generates_the_same_latents(saved, tmp_path):
    """If this fails, a one-step generation from the sharded checkpoint differs from the one-file checkpoint's."""
    config = GenerationConfig(prompt="a fox", frames=1, resolution=256, steps=1, output=tmp_path / "o.png")
    streamed = Plan(reasoner=GroupPlan(mode="staged"), generator=GroupPlan(mode="streamed"))
    single, fine = (
        generate_video(
            config, load_components(saved / variant, CPU, torch.float32, plan), PhaseTimer(CPU), progress=False
        )
        for variant, plan in [("single", Plan()), ("fine", streamed)]
    )
    assert single.latents.abs().sum() > 0
    assert torch.equal(single.latents, fine.latents)
    assert (single.frames == fine.frames).all()


# --- Damage is refused -----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.id for d in DAMAGES])
def test_damaged_checkpoint_is_refused_naming_the_file(saved, tmp_path, never_allocate, damage):
    """If this fails, a damaged checkpoint loads, crashes or allocates weights instead of a refusal naming the file."""
    ckpt = copy_of(saved, tmp_path, damage.variant)
    names = damage.apply(ckpt)
    with pytest.raises(InputError) as refused:
        load_components(ckpt, CPU, torch.float32)
    message = str(refused.value)
    assert len(message.splitlines()) == 1, message
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"


def test_the_undamaged_copies_load(saved, tmp_path):
    """If this fails, the damage tests above prove nothing: the copies they start from are refused already."""
    for variant in ("single", "sharded", "fine"):
        ckpt = Path(shutil.copytree(saved / variant, tmp_path / variant))
        assert load_components(ckpt, CPU, torch.float32).random_weights is False


# --- Through the CLI -------------------------------------------------------------------------------

# Through the CLI, each kind of damage once or twice (the library test above covers every case).
CLI_CASES = [
    "truncated-sharded-transformer-last-half-the-data",
    "truncated-sharded-vae1-inside-header",
    "truncated-single-transformer0-last-byte",
    "truncated-single-vae0-empty",
    "missing-shard-transformer0",
    "missing-shard-vae0",
    "stray-transformer-stale-single-file",
    "stray-vae-override-one-weight",
    "duplicate-key-transformer",
    "index-ghost-transformer",
    "index-dropped-vae",
    "index-misplaced-transformer",
    "index-outside-folder",
    "index-map-of-numbers",
    "two-indexes",
    "shards-no-index-transformer",
    "two-files-no-index-vae",
    "no-weights-single-transformer",
    "no-weights-sharded-vae",
    "no-transformer-config",
    "no-vae-config",
    "no-model-index",
    "bad-json-model_index.json-garbage",
    "bad-json-transformer-config.json-cut-in-half",
    "bad-json-vae-config.json-not-utf8",
    "bad-json-scheduler-scheduler_config.json-empty",
    "bad-json-scheduler-scheduler_config.json-a-list",
    "bad-json-transformer-diffusion_pytorch_model.safetensors.index.json-garbage",
    "bad-json-vae-diffusion_pytorch_model.safetensors.index.json-a-list",
    "bad-json-text_tokenizer-tokenizer.json-cut-in-half",
    "config-unusable-hidden-size-text",
    "config-unusable-no-layers",
    "config-unusable-unknown-activation",
    "config-unusable-rope-axes-sum",
    "config-unusable-vae-dim-mult-number",
    "config-hidden-size-up-sharded",
    "config-fewer-layers-single",
    "config-more-layers-sharded",
    "config-intermediate-size-single",
    "config-vae-base-dim-sharded",
    "wrong-shape-sharded-layers.1.self_attn.to_k.weight",
    "wrong-shape-single-decoder.conv_out.weight",
    "wrong-dtype-proj_in.weight-int8",
    "extra-weight-sharded-foo.weight",
    "extra-weight-single-layers.7.mlp.up_proj.weight",
    "missing-weight-sharded-time_embedder.linear_1.weight",
]
CLI_DAMAGES = [d for d in DAMAGES if d.id in CLI_CASES]
assert len(CLI_DAMAGES) == len(CLI_CASES)

CLI_ARGS = ["generate", "--prompt", "a fox", "--frames", "5", "--steps", "1", "--resolution", "256", "--no-progress"]


def run_cli(capsys, ckpt: Path, output: Path) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([*CLI_ARGS, "--device", "cpu", "--checkpoint", str(ckpt), "--output", str(output)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize("damage", CLI_DAMAGES, ids=[d.id for d in CLI_DAMAGES])
def test_cli_refuses_damage_in_one_line_and_writes_nothing(saved, tmp_path, capsys, damage):
    """If this fails, a damaged checkpoint makes the CLI print a traceback, exit otherwise or leave files behind."""
    ckpt = copy_of(saved, tmp_path, damage.variant)
    names = damage.apply(ckpt)
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    code, out, err = run_cli(capsys, ckpt, out_folder / "video.mp4")
    assert code == 2, err
    assert out == "" and err.endswith("\n") and len(err.splitlines()) == 1, err
    assert err.startswith("cosmos3-offload: error: ")
    for name in names:
        assert name in err, f"{name!r} not named in: {err}"
    assert list(out_folder.iterdir()) == []


def test_cli_writes_the_video_from_a_whole_checkpoint(saved, tmp_path, capsys):
    """If this fails, the CLI refusals above prove nothing: the undamaged checkpoint does not run through the CLI."""
    output = tmp_path / "out" / "v.mp4"
    output.parent.mkdir()
    assert main([*CLI_ARGS, "--device", "cpu", "--checkpoint", str(saved / "fine"), "--output", str(output)]) == 0
    assert "wrote " in capsys.readouterr().out
    assert list(output.parent.iterdir()) == [output]


# --- The pipeline index ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "class_name, accepted",
    [("Cosmos3DistilledModularPipeline", True), ("Cosmos3OmniPipeline", True), ("FluxModularPipeline", False)],
)
def test_a_modular_index_alone_identifies_the_pipeline(saved, tmp_path, class_name, accepted):
    """If this fails, a distilled repo's folder (modular_model_index.json only) is refused, or any modular
    pipeline passes for Cosmos3."""
    ckpt = copy_of(saved, tmp_path, "single")
    (ckpt / "model_index.json").unlink()
    (ckpt / "modular_model_index.json").write_text(json.dumps({"_class_name": class_name}))
    if accepted:
        check_checkpoint(ckpt)
    else:
        with pytest.raises(InputError, match="FluxModularPipeline"):
            check_checkpoint(ckpt)
