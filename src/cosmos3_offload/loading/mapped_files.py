"""A checkpoint's stored tensors as zero-copy views into its memory-mapped safetensors files.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: `dtype`,
`shape`, `data_offsets` [begin, end) counted from the end of the header), then the data. Each
file is mapped once, read-only, and a view's bytes come from the page cache when first read: the
weights of a mapped group are never copied into the process's own memory (`offload/mapped.py`
copies them, a layer at a time, into a pinned bounce slot). `CheckpointWeights` (checkpoint.py)
has already checked that the files are whole and hold the names and shapes the model needs.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..offload.slabs import SlabEntry
from .file_kinds import open_regular
from .files import CheckpointWeights

# safetensors dtype names of floating-point tensors (checkpoint.py refuses any other kind).
FILE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
HEADER_LENGTH_BYTES = 8
FILL_THREADS = min(8, os.cpu_count() or 1)  # memcpy from the page cache scales to a few threads
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit: a longer header is a damaged file


@dataclass(frozen=True)
class _MappedFile:
    mapping: mmap.mmap
    data_start: int  # offset of the data, right after the header
    header: dict


class MappedFiles:
    """Views of the tensors of one model folder (e.g. `transformer/`), each of its files mapped once."""

    def __init__(self, weights: CheckpointWeights):
        self.weights = weights
        self._files: dict[Path, _MappedFile] = {}

    def view(self, entry: SlabEntry) -> torch.Tensor:
        """The stored tensor of `entry` (any of its tied names), in the file's dtype, without a copy."""
        name = next(n for n in entry.names if n in self.weights.tensors)
        file = self.weights.tensors[name].file
        mapped = self._open(file)
        info = mapped.header.get(name)
        dtype = FILE_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        if dtype is None:
            raise InputError(f"{file.name} stores {name!r} in a form that cannot be mapped: {info!r}")
        begin, end = info["data_offsets"]
        count = torch.Size(info["shape"]).numel()
        if end - begin != count * dtype.itemsize or mapped.data_start + end > len(mapped.mapping):
            raise InputError(f"{file.name} in {str(file.parent)!r} is damaged: {name!r} does not fit its offsets")
        if count == 0:
            return torch.empty(info["shape"], dtype=dtype)
        with warnings.catch_warnings():
            # The mapping is read-only on purpose: nothing writes weights, and a stray write faults
            # instead of quietly turning file pages into private memory.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(mapped.mapping, dtype=dtype, count=count, offset=mapped.data_start + begin)
        return flat.view(info["shape"])

    def fill(self, targets: list[tuple[SlabEntry, torch.Tensor]]) -> None:
        """Copy each stored tensor into its home (casting to the home's dtype), a few at a time: the bytes
        go from the page cache straight into the home, through no buffer of ours."""
        pairs = [(home, self.view(entry)) for entry, home in targets]  # every file mapped here, in order
        with ThreadPoolExecutor(FILL_THREADS) as pool:  # copy_ releases the GIL
            for _ in pool.map(lambda pair: pair[0].copy_(pair[1]), pairs):
                pass

    def _open(self, file: Path) -> _MappedFile:
        if file not in self._files:
            try:
                with open_regular(file, "weight file") as handle:
                    (length,) = struct.unpack("<Q", handle.read(HEADER_LENGTH_BYTES))
                    if length > MAX_HEADER_BYTES:
                        raise ValueError(f"a header of {length} bytes")
                    header = json.loads(handle.read(length))
                    mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except InputError:  # not a regular file: its own line says what it is
                raise
            except (OSError, ValueError, struct.error) as error:
                raise InputError(f"{file.name} in {str(file.parent)!r} cannot be mapped: {error}") from None
            self._files[file] = _MappedFile(mapping, HEADER_LENGTH_BYTES + length, header)
        return self._files[file]
