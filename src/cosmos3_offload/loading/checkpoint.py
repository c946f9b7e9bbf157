"""A Cosmos3 checkpoint folder, checked before it is trusted, and its weights read into their homes.

The folder is what `Cosmos3OmniPipeline.save_pretrained` writes: `model_index.json` (or, in the
distilled repos, also `modular_model_index.json`; either one will do), `transformer/`, `vae/`,
`text_tokenizer/`, `scheduler/`, and optionally `sound_tokenizer/`. Each model folder holds its
`config.json` and either one `*.safetensors` file or shards listed by a `*.safetensors.index.json`.
Before a single weight is allocated, every file's header is read and checked: every shard the index
names exists and is whole, no stray weight file sits beside the shards, no weight appears twice,
every weight is a floating-point tensor (FP8 is recognised but not loadable yet), every weight the
model needs is there with the shape its config implies, and nothing is there that the model does
not have. The JSON files (the pipeline index, the model configs, the shard indexes, the scheduler
and tokenizer files) are read too, and each config must build its model.

Every check can collect its problems (`folder_problems`, `CheckpointWeights(strict=False)`,
`CheckpointWeights.problems_against`, `inspect_checkpoint`: `cosmos3-offload check` prints them all)
or raise the first as an InputError that names the file (`check_checkpoint`, the loader).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer
from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer
from safetensors import safe_open

from ..errors import InputError, first_line
from ..model.groups import UNUSED, sound_group_of, transformer_group_of, vae_group_of
from ..offload.materialize import build_on_meta, group_layouts

PIPELINE_CLASS = "Cosmos3OmniPipeline"
MODULAR_INDEX = "modular_model_index.json"  # the distilled repos' index; its class names vary by pipeline
REQUIRED_PARTS = ("transformer", "vae", "text_tokenizer")
# The model folders whose weights are read, and the class each config must build.
MODEL_CLASSES: dict[str, type] = {
    "transformer": Cosmos3OmniTransformer,
    "vae": AutoencoderKLWan,
    "sound_tokenizer": Cosmos3AVAEAudioTokenizer,
}
SCHEDULER_CLASSES = ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler")
# Bytes per element of each safetensors dtype; F8_* are FP8, recognised but not loadable yet.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

T = TypeVar("T")


class Problems(list[str]):
    """Problems found so far, in the order they were met; `attempt` records a check's InputError."""

    def attempt(self, check: Callable[[], T]) -> T | None:
        try:
            return check()
        except InputError as error:
            self.append(str(error))
            return None


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
    problems = folder_problems(path)
    if problems:
        raise InputError(problems[0])


def folder_problems(path: Path) -> list[str]:
    """Every problem of the folder's layout and JSON files (not its weights); [] for a good folder.
    A folder that is not a Cosmos3 pipeline gets that problem only: the rest would be noise."""
    return _pipeline_problems(path) or _part_problems(path)


def _pipeline_problems(path: Path) -> list[str]:
    """Why `path` is not a Cosmos3 pipeline folder at all ([]: it is one)."""
    if not path.is_dir():
        return [f"checkpoint {str(path)!r} is not a folder; pass a diffusers-layout Cosmos3 folder"]
    indexes = [name for name in ("model_index.json", MODULAR_INDEX) if (path / name).is_file()]
    if not indexes:
        return [f"checkpoint {str(path)!r} has no model_index.json; it is not a diffusers pipeline folder"]
    problems = Problems()
    for name in indexes:
        index = problems.attempt(functools.partial(read_json, path / name, "pipeline index"))
        if index is None:
            continue
        class_name = index.get("_class_name")
        cosmos3 = class_name == PIPELINE_CLASS or (name == MODULAR_INDEX and str(class_name).startswith("Cosmos3"))
        if not cosmos3:
            problems.append(f"checkpoint {str(path)!r} holds a {class_name!r}, not a {PIPELINE_CLASS} ({name})")
    return problems


def _part_problems(path: Path) -> list[str]:
    """Problems of the parts' folders and JSON files in a Cosmos3 pipeline folder."""
    problems = Problems()
    missing = [part for part in REQUIRED_PARTS if not (path / part).is_dir()]
    if missing:
        problems.append(f"checkpoint {str(path)!r} lacks the folder(s) {', '.join(missing)}")
    for part in ("transformer", "vae"):
        if (path / part).is_dir():
            problems.attempt(functools.partial(read_json, path / part / "config.json", f"{part} config"))
    # Read only at the end of a load: checked here, before any weight is allocated.
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if scheduler_file.exists():
        scheduler = problems.attempt(lambda: read_json(scheduler_file, "scheduler config"))
        name = None if scheduler is None else scheduler.get("_class_name", SCHEDULER_CLASSES[0])
        if scheduler is not None and name not in SCHEDULER_CLASSES:
            problems.append(
                f"scheduler config {str(scheduler_file)!r} names a {name!r}; "
                f"Cosmos3 uses {' or '.join(SCHEDULER_CLASSES)}"
            )
    for file in sorted((path / "text_tokenizer").glob("*.json")):
        problems.attempt(functools.partial(read_json, file, "tokenizer file", object_only=False))
    return problems


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


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: str = "F32"  # the safetensors name: F32, BF16, F8_E4M3, ...

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * DTYPE_BYTES.get(self.dtype, 0)


class CheckpointWeights:
    """The weights of one diffusers model folder (e.g. `transformer/`), indexed from the file headers.

    `strict` (the loader) raises the first problem of the files as an InputError; otherwise
    `problems` lists every one, and the weights that could be read are indexed all the same."""

    def __init__(self, folder: Path, *, strict: bool = True):
        self.folder = folder
        self.tensors: dict[str, StoredTensor] = {}
        self._unread: set[str] = set()  # weight files missing or unreadable: what they hold is unknown
        self.problems: list[str] = self._scan()
        if strict and self.problems:
            raise InputError(self.problems[0])

    @property
    def complete(self) -> bool:
        """Every weight file was read, so a weight not in `tensors` is truly absent."""
        return not self._unread

    def _scan(self) -> list[str]:
        problems = Problems()
        index = problems.attempt(self._index)
        if problems:  # an index that cannot be used: which files count is unknown
            self._unread.add("*")
        files = self._weight_files(index, problems)
        twice: list[str] = []
        for file in files:
            header = problems.attempt(functools.partial(_header, file))
            if header is None:
                self._unread.add(file.name)
                continue
            for key, (shape, dtype) in header.items():
                if key in self.tensors:
                    twice.append(f"{key!r} is stored twice, in {self.tensors[key].file.name} and {file.name}")
                else:
                    self.tensors[key] = StoredTensor(file, shape, dtype)
        if twice:
            problems.append(f"{twice[0]}; remove the stray file{_more(twice)}")
        problems.extend(self._dtype_problems())
        if index is not None:
            problems.extend(self._index_problems(*index))
        return problems

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

    def _weight_files(self, index: tuple[Path, dict[str, str]] | None, problems: Problems) -> list[Path]:
        """The files to read; a missing shard, a stray file or an unusable index is a problem."""
        found = sorted(self.folder.glob("*.safetensors"))
        if "*" in self._unread:
            return []
        if index is None:
            if not found:
                problems.append(f"{str(self.folder)!r} has no .safetensors weights")
            elif len(found) > 1:
                problems.append(
                    f"{str(self.folder)!r} holds {len(found)} .safetensors files ({', '.join(f.name for f in found)}) "
                    "and no shard index; keep the model's one file or add its *.safetensors.index.json"
                )
            else:
                return found
            self._unread.add("*")
            return []
        index_file, weight_map = index
        named = sorted(set(weight_map.values()))
        for name in named:
            if Path(name).name != name or not (self.folder / name).is_file():
                problems.append(f"shard {name!r} named by {index_file.name} is missing from {str(self.folder)!r}")
                self._unread.add(name)
        stray = sorted(f.name for f in found if f.name not in set(named))
        if stray:
            problems.append(
                f"{str(self.folder)!r} holds weight file(s) its index {index_file.name} does not name: "
                f"{', '.join(stray)}; remove them"
            )
        return [self.folder / name for name in named if name not in self._unread]

    def _dtype_problems(self) -> list[str]:
        """Weights that are not floating point (they would be cast silently into their homes), and FP8."""
        odd = [(k, s) for k, s in self.tensors.items() if s.dtype not in FLOAT_DTYPES and not is_fp8(s.dtype)]
        fp8 = [(k, s) for k, s in self.tensors.items() if is_fp8(s.dtype)]
        problems = []
        if odd:
            key, stored = odd[0]
            problems.append(
                f"{stored.file.name} in {str(self.folder)!r} stores {key!r} as {stored.dtype}, which is no weight's "
                f"dtype; weights are floating point{_more(odd)}"
            )
        if fp8:
            key, stored = fp8[0]
            problems.append(
                f"{stored.file.name} in {str(self.folder)!r} stores {key!r} as {dtype_name(stored.dtype)}"
                f"{_more(fp8)}; use a bf16 checkpoint"
            )
        return problems

    def _index_problems(self, index_file: Path, weight_map: dict[str, str]) -> list[str]:
        problems = []
        misplaced = [(k, s) for k, s in self.tensors.items() if weight_map.get(k) != s.file.name]
        if misplaced:
            key, stored = misplaced[0]
            problems.append(
                f"{stored.file.name} holds {key!r}, which {index_file.name} puts elsewhere{_more(misplaced)}"
            )
        absent = sorted(k for k, name in weight_map.items() if k not in self.tensors and name not in self._unread)
        if absent:
            problems.append(
                f"{index_file.name} in {str(self.folder)!r} puts {absent[0]!r} in {weight_map[absent[0]]}, "
                f"which does not hold it ({len(absent)} such weight(s))"
            )
        return problems

    def check_against(
        self, expected: list[tuple[tuple[str, ...], tuple[int, ...]]], skip: Callable[[str], bool]
    ) -> None:
        """Every expected tensor (its names: tied weights have several, one stored is enough) present
        with its shape; no stored weight the model lacks, unless `skip` says the model ignores it."""
        problems = self.problems_against(expected, skip)
        if problems:
            raise InputError(problems[0])

    def problems_against(
        self, expected: list[tuple[tuple[str, ...], tuple[int, ...]]], skip: Callable[[str], bool]
    ) -> list[str]:
        """What `check_against` would refuse, every kind once (wrong shapes, weights the model lacks,
        weights it needs), in the order met; missing weights only when every file could be read."""
        shapes = {name: shape for names, shape in expected for name in names}
        config = str(self.folder / "config.json")
        found: dict[str, list[str]] = {}  # kind -> keys, kinds in the order first met
        for key, stored in self.tensors.items():
            if key in shapes:
                if tuple(stored.shape) != tuple(shapes[key]):
                    found.setdefault("shape", []).append(key)
            elif not _skipped(skip, key):
                found.setdefault("extra", []).append(key)
        problems = []
        for kind, keys in found.items():
            stored = self.tensors[keys[0]]
            if kind == "shape":
                problems.append(
                    f"{stored.file.name}: {keys[0]!r} has shape {list(stored.shape)} but the config {config!r} "
                    f"implies {list(shapes[keys[0]])}{_more(keys)}; the config does not match the weights"
                )
            else:
                problems.append(
                    f"{stored.file.name} in {str(self.folder)!r} holds {keys[0]!r}{_more(keys)}, which the model of "
                    f"the config {config!r} does not have; the config does not match the weights"
                )
        missing = [names[0] for names, _ in expected if not any(n in self.tensors for n in names)]
        if missing and self.complete:
            problems.append(
                f"{str(self.folder)!r} lacks {len(missing)} weight(s) that its config {config!r} implies, "
                f"e.g. {missing[0]!r}"
            )
        return problems


def is_fp8(dtype: str) -> bool:
    return dtype.startswith("F8_")


def dtype_name(dtype: str) -> str:
    """How a report names a safetensors dtype: bf16, fp32, ..., FP8 flagged as not loadable yet."""
    if is_fp8(dtype):
        return f"FP8 ({dtype}, not loadable yet)"
    return {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}.get(dtype, dtype)


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _skipped(skip: Callable[[str], bool], key: str) -> bool:
    """`skip(key)`, false for a name the rule cannot even place (it raises for names unknown to the model)."""
    try:
        return skip(key)
    except (ValueError, KeyError):
        return False


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) from a safetensors header; damaged or truncated files are refused."""
    try:
        with safe_open(file, framework="pt") as weights:
            slices = {key: weights.get_slice(key) for key in weights.keys()}
            return {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in slices.items()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise InputError(
            f"{file.name} in {str(file.parent)!r} is not a whole safetensors file: {first_line(error)}"
        ) from None


# --- The whole check, every problem collected --------------------------------------------------------


@dataclass
class CheckpointContents:
    """What `inspect_checkpoint` found: every problem, and what it could read of each model folder."""

    problems: list[str]
    pipeline: bool = False  # the folder is a Cosmos3 pipeline, so its parts were checked
    configs: dict[str, dict] = field(default_factory=dict)  # model folder -> config that builds its class
    weights: dict[str, CheckpointWeights] = field(default_factory=dict)  # model folder -> its indexed weights


def inspect_checkpoint(path: Path) -> CheckpointContents:
    """The loader's validation of every model folder (`sound_tokenizer/` too, when there), collecting
    every problem instead of stopping at the first; reads JSON and safetensors headers only."""
    problems = Problems(_pipeline_problems(path))
    if problems:
        return CheckpointContents(problems)
    problems.extend(_part_problems(path))
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
        layouts = group_layouts(build_on_meta(cls, config), group_of, lambda name: torch.float32)
        expected = [(e.names, e.shape) for group, layout in layouts.items() if group != UNUSED for e in layout.entries]
        problems.extend(weights.problems_against(expected, unused_rule(group_of)))
    contents.problems = list(dict.fromkeys(problems))  # a config read twice is one problem
    return contents


def unused_rule(group_of: Callable[[str], str]) -> Callable[[str], bool]:
    """Stored weights the model has but generation never reads: not checked, not read."""
    return lambda key: group_of(key) == UNUSED


def group_rule(part: str, config: dict) -> Callable[[str], str]:
    """The weight groups of one model folder (what generation never reads is `unused`)."""
    if part == "transformer":
        return functools.partial(transformer_group_of, num_layers=config["num_hidden_layers"])
    return {"vae": vae_group_of, "sound_tokenizer": sound_group_of}[part]
