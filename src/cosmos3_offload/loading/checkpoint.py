"""A Cosmos3 checkpoint folder, checked before it is trusted, and its weights read into their homes.

The folder is what `Cosmos3OmniPipeline.save_pretrained` writes: `model_index.json`,
`transformer/`, `vae/`, `text_tokenizer/`, `scheduler/`. Each model folder holds its
`config.json` and either one `*.safetensors` file or shards listed by a
`*.safetensors.index.json`. Before a single weight is allocated, every file's header is read and
checked: every shard the index names exists and is whole, no stray weight file sits beside the
shards, no weight appears twice, every weight is a floating-point tensor, every weight the model
needs is there with the shape its config implies, and nothing is there that the model does not
have. The JSON files (the pipeline index, the model configs, the shard indexes, the scheduler and
tokenizer files) are read too, and each config must build its model. Any failure is an InputError
that names the file.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer
from safetensors import safe_open

from ..errors import InputError, first_line
from ..offload.materialize import build_on_meta
from ..offload.slabs import SlabEntry

PIPELINE_CLASS = "Cosmos3OmniPipeline"
REQUIRED_PARTS = ("transformer", "vae", "text_tokenizer")


def read_json(path: Path, what: str, *, object_only: bool = True) -> dict:
    if not path.is_file():
        raise InputError(f"{what} {str(path)!r} is missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{what} {str(path)!r} cannot be read as JSON") from None
    if object_only and not isinstance(value, dict):
        raise InputError(f"{what} {str(path)!r} is not a JSON object")
    return value


def check_checkpoint(path: Path) -> None:
    """Raise an InputError saying what is wrong unless `path` is a Cosmos3 diffusers folder."""
    if not path.is_dir():
        raise InputError(f"checkpoint {str(path)!r} is not a folder; pass a diffusers-layout Cosmos3 folder")
    if not (path / "model_index.json").is_file():
        raise InputError(f"checkpoint {str(path)!r} has no model_index.json; it is not a diffusers pipeline folder")
    class_name = read_json(path / "model_index.json", "pipeline index").get("_class_name")
    if class_name != PIPELINE_CLASS:
        raise InputError(f"checkpoint {str(path)!r} holds a {class_name!r}, not a {PIPELINE_CLASS}")
    missing = [part for part in REQUIRED_PARTS if not (path / part).is_dir()]
    if missing:
        raise InputError(f"checkpoint {str(path)!r} lacks the folder(s) {', '.join(missing)}")
    for part in ("transformer", "vae"):
        read_json(path / part / "config.json", f"{part} config")
    # Read only at the end of a load: checked here, before any weight is allocated.
    if (path / "scheduler" / "scheduler_config.json").exists():
        read_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    for file in sorted((path / "text_tokenizer").glob("*.json")):
        read_json(file, "tokenizer file", object_only=False)


def model_configs_of(path: Path) -> tuple[dict, dict]:
    """(transformer config, VAE config) of a checked checkpoint folder; each must build its model."""
    check_checkpoint(path)
    configs = []
    for part, cls in (("transformer", Cosmos3OmniTransformer), ("vae", AutoencoderKLWan)):
        file = path / part / "config.json"
        try:
            config = cls.load_config(path / part)
        except (OSError, ValueError, TypeError):
            raise InputError(f"{part} config {str(file)!r} cannot be used") from None
        problem = _config_problem(config) if cls is Cosmos3OmniTransformer else None
        if problem is None:
            problem = _build_problem(cls, json.dumps(config, sort_keys=True))
        if problem is not None:
            raise InputError(f"{part} config {str(file)!r} cannot build a {cls.__name__}: {problem}")
        configs.append(config)
    return configs[0], configs[1]


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


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    shape: tuple[int, ...]


class CheckpointWeights:
    """The weights of one diffusers model folder (e.g. `transformer/`), indexed from the file headers."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tensors: dict[str, StoredTensor] = {}
        for file in self._weight_files():
            for key, shape in _header(file).items():
                if key in self.tensors:
                    raise InputError(
                        f"{key!r} is stored twice, in {self.tensors[key].file.name} and {file.name}; "
                        "remove the stray file"
                    )
                self.tensors[key] = StoredTensor(file, shape)
        self._check_index()

    def _index(self) -> tuple[Path, dict[str, str]] | None:
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise InputError(f"{str(self.folder)!r} has several shard indexes: {', '.join(i.name for i in indexes)}")
        if not indexes:
            return None
        weight_map = read_json(indexes[0], "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"shard index {str(indexes[0])!r} has no weight_map of names to files")
        return indexes[0], weight_map

    def _weight_files(self) -> list[Path]:
        found = sorted(self.folder.glob("*.safetensors"))
        index = self._index()
        if index is None:
            if not found:
                raise InputError(f"{str(self.folder)!r} has no .safetensors weights")
            if len(found) > 1:
                raise InputError(
                    f"{str(self.folder)!r} holds {len(found)} .safetensors files ({', '.join(f.name for f in found)}) "
                    "and no shard index; keep the model's one file or add its *.safetensors.index.json"
                )
            return found
        index_file, weight_map = index
        named = sorted(set(weight_map.values()))
        for name in named:
            if Path(name).name != name or not (self.folder / name).is_file():
                raise InputError(f"shard {name!r} named by {index_file.name} is missing from {str(self.folder)!r}")
        stray = sorted(f.name for f in found if f.name not in set(named))
        if stray:
            raise InputError(
                f"{str(self.folder)!r} holds weight file(s) its index {index_file.name} does not name: "
                f"{', '.join(stray)}; remove them"
            )
        return [self.folder / name for name in named]

    def _check_index(self) -> None:
        index = self._index()
        if index is None:
            return
        index_file, weight_map = index
        for key, stored in self.tensors.items():
            if weight_map.get(key) != stored.file.name:
                raise InputError(f"{stored.file.name} holds {key!r}, which {index_file.name} puts elsewhere")
        absent = sorted(set(weight_map) - set(self.tensors))
        if absent:
            raise InputError(
                f"{index_file.name} in {str(self.folder)!r} puts {absent[0]!r} in {weight_map[absent[0]]}, "
                f"which does not hold it ({len(absent)} such weight(s))"
            )

    def check_against(
        self, expected: list[tuple[tuple[str, ...], tuple[int, ...]]], skip: Callable[[str], bool]
    ) -> None:
        """Every expected tensor (its names: tied weights have several, one stored is enough) present
        with its shape; no stored weight the model lacks, unless `skip` says the model ignores it."""
        shapes = {name: shape for names, shape in expected for name in names}
        config = str(self.folder / "config.json")
        for key, stored in self.tensors.items():
            if key in shapes:
                if tuple(stored.shape) != tuple(shapes[key]):
                    raise InputError(
                        f"{stored.file.name}: {key!r} has shape {list(stored.shape)} but the config "
                        f"{config!r} implies {list(shapes[key])}; the config does not match the weights"
                    )
            elif not _skipped(skip, key):
                raise InputError(
                    f"{stored.file.name} in {str(self.folder)!r} holds {key!r}, which the model of the config "
                    f"{config!r} does not have; the config does not match the weights"
                )
        missing = [names[0] for names, _ in expected if not any(n in self.tensors for n in names)]
        if missing:
            raise InputError(
                f"{str(self.folder)!r} lacks {len(missing)} weight(s) that its config {config!r} implies, "
                f"e.g. {missing[0]!r}"
            )

    def fill(self, targets: list[tuple[SlabEntry, torch.Tensor]]) -> None:
        """Copy each stored weight into its home, one file open at a time."""
        by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
        for entry, home in targets:
            name = next(n for n in entry.names if n in self.tensors)
            by_file.setdefault(self.tensors[name].file, []).append((name, home))
        for file, pairs in by_file.items():
            try:
                with safe_open(file, framework="pt") as weights:
                    for name, home in pairs:
                        home.copy_(weights.get_tensor(name))
            except Exception as error:  # safetensors raises its own error types for damaged files
                raise InputError(f"{file.name} in {str(self.folder)!r} cannot be read: {first_line(error)}") from None


def _skipped(skip: Callable[[str], bool], key: str) -> bool:
    """`skip(key)`, false for a name the rule cannot even place (it raises for names unknown to the model)."""
    try:
        return skip(key)
    except (ValueError, KeyError):
        return False


def _header(file: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from a safetensors header; damaged or truncated files, and weights that are not
    floating point (they would be cast silently into their homes), are refused."""
    try:
        with safe_open(file, framework="pt") as weights:
            slices = {key: weights.get_slice(key) for key in weights.keys()}
            shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
            dtypes = {key: s.get_dtype() for key, s in slices.items()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise InputError(
            f"{file.name} in {str(file.parent)!r} is not a whole safetensors file: {first_line(error)}"
        ) from None
    for key, dtype in sorted(dtypes.items()):
        if not dtype.startswith(("F", "BF")):
            raise InputError(
                f"{file.name} in {str(file.parent)!r} stores {key!r} as {dtype}, which is no weight's dtype; "
                "weights are floating point"
            )
    return shapes
