"""A Cosmos3 checkpoint folder, checked before it is trusted: the checks that need the model classes.

The folder is what `Cosmos3OmniPipeline.save_pretrained` writes: `model_index.json` (or, in the
distilled repos, also `modular_model_index.json`; either one will do), `transformer/`, `vae/`,
`text_tokenizer/`, `scheduler/`, and optionally `sound_tokenizer/`. Each model folder holds its
`config.json` and either one `*.safetensors` file or shards listed by a `*.safetensors.index.json`.
Before a single weight is allocated, every file's header is read and checked: every shard the index
names exists and is whole, no stray weight file sits beside the shards, no weight appears twice,
every weight is a floating-point tensor (FP8: e4m3 with its scales), every weight the
model needs is there with the shape its config implies, and nothing is there that the model does
not have. The JSON files (the pipeline index, the model configs, the shard indexes, the scheduler
and tokenizer files) are read too, and each config must build its model.

The checks of files alone (layout, JSON, shard indexes, headers) are in files.py and run without
torch; this module adds what needs the model classes: each config builds its model, and each stored
weight has the shape the config implies. A config is built only once the sizes it claims agree with
the headers (claims.py): a claim of 1e9 layers or channels is refused, not built. Every check can
collect its problems (`CheckpointWeights.problems_against`, `inspect_checkpoint`: `cosmos3-offload
check` prints them all) or raise the first as an InputError that names the file (the loader).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer
from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer

from ..errors import InputError, first_line
from ..model.groups import UNUSED, sound_group_of, transformer_group_of, vae_group_of
from ..offload.materialize import build_on_meta, group_layouts
from ..quant.policy import TowerSwitches
from .claims import claim_problem
from .files import CheckpointWeights, Problems, check_checkpoint, part_problems, pipeline_problems, read_json
from .mapped_files import MappedFiles
from .quantization import NONE, Quantization, apply_quantization, check_scales, quantization_of, stored_skip

# The model folders whose weights are read, and the class each config must build.
MODEL_CLASSES: dict[str, type] = {
    "transformer": Cosmos3OmniTransformer,
    "vae": AutoencoderKLWan,
    "sound_tokenizer": Cosmos3AVAEAudioTokenizer,
}


def model_configs_of(path: Path) -> tuple[dict, dict]:
    """(transformer config, VAE config) of a checked checkpoint folder; each must build its model."""
    check_checkpoint(path)
    return model_config(path, "transformer"), model_config(path, "vae")


def model_config(path: Path, part: str) -> dict:
    """The config of one model folder of `MODEL_CLASSES`; an InputError unless it names that class (or
    no class) and builds it."""
    cls = MODEL_CLASSES[part]
    file = path / part / "config.json"
    read_json(file, f"{part} config")
    try:
        config = cls.load_config(path / part)
    except (OSError, ValueError, TypeError):
        raise InputError(f"{part} config {str(file)!r} cannot be used") from None
    class_name = config.get("_class_name", cls.__name__)
    if class_name != cls.__name__:
        raise InputError(f"{part} config {str(file)!r} is for a {class_name!r}; a Cosmos3 {part} is a {cls.__name__}")
    # Before anything is built: a config claiming more than its weights would cost its claim to build.
    problem = claim_problem(part, config, CheckpointWeights(path / part, strict=False))
    if problem is not None:
        raise InputError(problem)
    problem = _config_problem(config) if cls is Cosmos3OmniTransformer else None
    if problem is None:
        problem = _build_problem(cls, json.dumps(config, sort_keys=True))
    if problem is not None:
        raise InputError(f"{part} config {str(file)!r} cannot build a {cls.__name__}: {problem}")
    return config


@functools.lru_cache(maxsize=8)
def _build_problem(cls: type, config_text: str) -> str | None:
    """Why `cls` cannot be built on meta from this config (None: it can); a run asks more than once."""
    try:
        build_on_meta(cls, json.loads(config_text))
    except Exception as error:  # whatever the constructor raises for values it cannot use
        return first_line(error)
    return None


def _config_problem(config: dict) -> str | None:
    """What the transformer's constructor accepts but the split cannot run (None: nothing)."""
    layers = config.get("num_hidden_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        return f"num_hidden_layers must be a whole number from 1, got {layers!r}"
    head_dim, axes = config.get("head_dim"), config.get("rope_axes_dim")
    if axes is not None and isinstance(head_dim, int):
        if (
            not isinstance(axes, list | tuple)
            or len(axes) != 3
            or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in axes)
            or sum(axes) != head_dim // 2
        ):
            return (
                f"rope_axes_dim must be 3 positive whole numbers adding up to head_dim / 2 ({head_dim // 2}), "
                f"got {axes!r}"
            )
    return None


# --- The whole check, every problem collected --------------------------------------------------------


@dataclass
class CheckpointContents:
    """What `inspect_checkpoint` found: every problem, and what it could read of each model folder."""

    problems: list[str]
    pipeline: bool = False  # the folder is a Cosmos3 pipeline, so its parts were checked
    configs: dict[str, dict] = field(default_factory=dict)  # model folder -> config that builds its class
    weights: dict[str, CheckpointWeights] = field(default_factory=dict)  # model folder -> its indexed weights
    quantization: Quantization = NONE  # how the transformer's linears are stored


def inspect_checkpoint(path: Path) -> CheckpointContents:
    """The loader's validation of every model folder (`sound_tokenizer/` too, when there), collecting
    every problem instead of stopping at the first; reads JSON and safetensors headers only."""
    problems = Problems(pipeline_problems(path))
    if problems:
        return CheckpointContents(problems)
    problems.extend(part_problems(path))
    contents = CheckpointContents(problems, pipeline=True)
    for part, cls in MODEL_CLASSES.items():
        if not (path / part).is_dir():
            continue
        config = problems.attempt(functools.partial(model_config, path, part))
        weights = contents.weights[part] = CheckpointWeights(path / part, strict=False)
        problems.extend(weights.problems)
        if config is None:
            continue
        contents.configs[part] = config
        group_of = group_rule(part, config)
        model = build_on_meta(cls, config)
        if part == "transformer":
            quantization = problems.attempt(functools.partial(quantization_of, config, weights))
            if quantization is None:
                continue
            contents.quantization = quantization
            if weights.complete:  # the scales' values too, as the loader checks them (a few bytes each)
                problems.attempt(functools.partial(check_scales, MappedFiles(weights).view, quantization))
            apply_quantization(model, quantization, TowerSwitches())
        layouts = group_layouts(model, group_of, lambda name: torch.float32)
        expected = [(e.names, e.shape) for group, layout in layouts.items() if group != UNUSED for e in layout.entries]
        problems.extend(weights.problems_against(expected, stored_skip(group_of, UNUSED)))
    contents.problems = list(dict.fromkeys(problems))  # a config read twice is one problem
    return contents


def group_rule(part: str, config: dict) -> Callable[[str], str]:
    """The weight groups of one model folder (what generation never reads is `unused`)."""
    if part == "transformer":
        return functools.partial(transformer_group_of, num_layers=config["num_hidden_layers"])
    return {"vae": vae_group_of, "sound_tokenizer": sound_group_of}[part]
