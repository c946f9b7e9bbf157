"""A checkpoint folder's files, checked without torch: the layout, the JSON files, the shard indexes
and every safetensors header.

This is the part of the checkpoint checks that reads no weight and builds no model, so it runs
before torch or diffusers are even imported (the CLI refuses a damaged folder from here in a
fraction of a second): the pipeline index names a Cosmos3 pipeline, the parts' folders and JSON
files are there and parse, every shard the index names exists and has a whole header (parsed
here, byte for byte as safetensors lays it out), no stray weight file sits beside the shards, no
weight appears twice, every weight is floating point (FP8 as e4m3 only: loading/quantization.py
checks its scales), and each
index agrees with what the shards hold. Every file is read only if it is a regular file
(file_kinds.py: a link to /dev/zero or a FIFO is named for what it is, never opened for reading),
and a JSON file only up to MAX_JSON_BYTES. `checkpoint.py` adds the checks that need the model
classes (configs that build, weights of the right shapes).

Every check can collect its problems (`folder_problems`, `CheckpointWeights(strict=False)`) or raise
the first as an InputError that names the file (`check_checkpoint`, the loader).
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from ..errors import InputError
from .file_kinds import file_problem, open_regular, present

PIPELINE_CLASS = "Cosmos3OmniPipeline"
MODULAR_INDEX = "modular_model_index.json"  # the distilled repos' index; its class names vary by pipeline
REQUIRED_PARTS = ("transformer", "vae", "text_tokenizer")
SCHEDULER_CLASSES = ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler")
# Bytes per element of each safetensors dtype; F8_* are FP8 (F8_E4M3 loads, see quantization.py).
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
LOADABLE_FP8 = "F8_E4M3"

T = TypeVar("T")


HEADER_LENGTH_BYTES = 8  # a safetensors file starts with its header's length, little-endian
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit: a longer header is a damaged file
MAX_JSON_BYTES = 256 * 2**20  # far above any config, index or tokenizer file: a larger one is no such file


class Problems(list[str]):
    """Problems found so far, in the order they were met; `attempt` records a check's InputError."""

    def attempt(self, check: Callable[[], T]) -> T | None:
        try:
            return check()
        except InputError as error:
            self.append(str(error))
            return None


def read_json(path: Path, what: str, *, object_only: bool = True) -> dict:
    """The JSON object (or, without `object_only`, any value) of a checkpoint's file; an InputError naming
    `what` for a file that is missing, not a regular file, too large for JSON or not JSON."""
    with open_regular(path, what) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise InputError(f"{what} {str(path)!r} holds {size} bytes, too many for a JSON file of a checkpoint")
        try:
            value = json.loads(handle.read(MAX_JSON_BYTES + 1).decode("utf-8"))
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
    return pipeline_problems(path) or part_problems(path)


def pipeline_problems(path: Path) -> list[str]:
    """Why `path` is not a Cosmos3 pipeline folder at all ([]: it is one)."""
    if not path.is_dir():
        return [f"checkpoint {str(path)!r} is not a folder; pass a diffusers-layout Cosmos3 folder"]
    indexes = [name for name in ("model_index.json", MODULAR_INDEX) if present(path / name)]
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


def part_problems(path: Path) -> list[str]:
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
    if present(scheduler_file):
        scheduler = problems.attempt(lambda: read_json(scheduler_file, "scheduler config"))
        name = None if scheduler is None else scheduler.get("_class_name", SCHEDULER_CLASSES[0])
        if scheduler is not None and name not in SCHEDULER_CLASSES:
            problems.append(
                f"scheduler config {str(scheduler_file)!r} names a {name!r}; "
                f"Cosmos3 uses {' or '.join(SCHEDULER_CLASSES)}"
            )
    for file in sorted((path / "text_tokenizer").glob("*.json")):
        problems.attempt(functools.partial(read_json, file, "tokenizer file", object_only=False))
    problems.extend(_tokenizer_file_problems(path / "text_tokenizer"))
    return problems


def _tokenizer_file_problems(folder: Path) -> list[str]:
    """The tokenizer's loader opens whatever files it finds: each must be a regular file (or a folder)."""
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    problems = {entry: file_problem(entry) for entry in entries if not entry.is_dir()}
    return [f"tokenizer file {str(entry)!r} {problem}" for entry, problem in problems.items() if problem is not None]


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: str = "F32"  # the safetensors name: F32, BF16, F8_E4M3, ...

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES.get(self.dtype, 0)


class CheckpointWeights:
    """The weights of one diffusers model folder (e.g. `transformer/`), indexed from the file headers.

    `strict` (the loader) raises the first problem of the files as an InputError; otherwise
    `problems` lists every one, and the weights that could be read are indexed all the same."""

    def __init__(self, folder: Path, *, strict: bool = True):
        self.folder = folder
        self.tensors: dict[str, StoredTensor] = {}
        self.indexed: frozenset[str] = frozenset()  # the names the shard index lists, read or not
        self._unread: set[str] = set()  # weight files missing or unreadable: what they hold is unknown
        self.problems: list[str] = self._scan()
        if strict and self.problems:
            raise InputError(self.problems[0])

    @property
    def names(self) -> frozenset[str]:
        """Every weight name known: those of the headers read and those the shard index lists."""
        return self.indexed | self.tensors.keys()

    @property
    def complete(self) -> bool:
        """Every weight file was read, so a weight not in `tensors` is truly absent."""
        return not self._unread

    def _scan(self) -> list[str]:
        problems = Problems()
        index = problems.attempt(self._index)
        if problems:  # an index that cannot be used: which files count is unknown
            self._unread.add("*")
        if index is not None:
            self.indexed = frozenset(index[1])
        files = self._weight_files(index, problems)
        twice: list[str] = []
        for file in files:
            header = problems.attempt(functools.partial(read_header, file))
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
            problem = "is missing" if Path(name).name != name else file_problem(self.folder / name)
            if problem == "is missing":
                problems.append(f"shard {name!r} named by {index_file.name} is missing from {str(self.folder)!r}")
            elif problem is not None:  # never opened: a device or a FIFO could be read forever or block
                problems.append(f"shard {name!r} named by {index_file.name} in {str(self.folder)!r} {problem}")
            if problem is not None:
                self._unread.add(name)
        stray = sorted(f.name for f in found if f.name not in set(named))
        if stray:
            problems.append(
                f"{str(self.folder)!r} holds weight file(s) its index {index_file.name} does not name: "
                f"{', '.join(stray)}; remove them"
            )
        return [self.folder / name for name in named if name not in self._unread]

    def _dtype_problems(self) -> list[str]:
        """Weights that are not floating point (they would be cast silently into their homes), and FP8
        other than e4m3 (the only FP8 that NVIDIA's checkpoints store and that runs here)."""
        odd = [(k, s) for k, s in self.tensors.items() if s.dtype not in FLOAT_DTYPES and s.dtype != LOADABLE_FP8]
        if not odd:
            return []
        key, stored = odd[0]
        kind = (
            "an FP8 format that does not run here (only F8_E4M3 does)"
            if is_fp8(stored.dtype)
            else ("no weight's dtype; weights are floating point")
        )
        return [f"{stored.file.name} in {str(self.folder)!r} stores {key!r} as {stored.dtype}, {kind}{_more(odd)}"]

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
    """How a report names a safetensors dtype: bf16, fp32, fp8 (e4m3), ..."""
    if is_fp8(dtype):
        return f"fp8 ({dtype})"
    return {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}.get(dtype, dtype)


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _skipped(skip: Callable[[str], bool], key: str) -> bool:
    """`skip(key)`, false for a name the rule cannot even place (it raises for names unknown to the model)."""
    try:
        return skip(key)
    except (ValueError, KeyError):
        return False


def read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) from a safetensors header; a damaged or truncated file is refused.

    The layout: an 8-byte little-endian length, that many bytes of JSON (per tensor: `dtype`,
    `shape`, `data_offsets` [begin, end) counted from the end of the header; an optional
    `__metadata__`), then the tensors' bytes, back to back, to the end of the file.
    """
    with open_regular(file, "weight file") as handle:
        return _read_header(file, handle)


def _read_header(file: Path, handle: BinaryIO) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(HEADER_LENGTH_BYTES)
        if len(head) < HEADER_LENGTH_BYTES:
            raise ValueError("header too small")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + length > size:
            raise ValueError(f"a header of {length} bytes does not fit a file of {size}")
        header = json.loads(handle.read(length))
        return _tensors_of(header, size - HEADER_LENGTH_BYTES - length)
    except (OSError, ValueError, RecursionError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        raise InputError(f"{file.name} in {str(file.parent)!r} is not a whole safetensors file: {reason}") from None


def _tensors_of(header: object, data_bytes: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The header's tensors, checked to tile the data exactly, each of its dtype's and shape's size."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    tensors, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731 - names the rule
        if (
            dtype not in DTYPE_BYTES
            or not isinstance(shape, list)
            or not all(whole(n) for n in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(whole(n) for n in offsets)
        ):
            raise ValueError(f"the entry of {name!r} is not a dtype, a shape and two offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise ValueError(f"{name!r} does not fit its offsets")
        tensors[name] = (tuple(shape), dtype)
        spans.append(tuple(offsets))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise ValueError("the tensors' bytes overlap or leave a gap")
        end = stop
    if end != data_bytes:
        raise ValueError(f"the header describes {end} bytes of data but the file holds {data_bytes}")
    return tensors
