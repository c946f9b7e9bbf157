"""Host slabs: a group's tensors packed at aligned offsets into one exact-size host buffer.

A `SlabLayout` is computed from names, shapes and dtypes alone (no memory touched). A `HostSlab`
allocates exactly `layout.nbytes` and, where CUDA is present, page-locks that allocation in place
with `cudaHostRegister`: `pin_memory()` per tensor would go through PyTorch's caching host
allocator, which rounds every request up to a power of two. Tied tensors (one tensor bound under
several names) get one entry. The slab is the master copy of its weights: staging only ever
copies host -> device. A slab may instead live in a file mapped by every process of the host
(see shared.py); each process then page-locks its own mapping of the same pages.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

ALIGNMENT = 256  # bytes; every entry starts on this boundary (DMA- and vector-friendly)


@dataclass(frozen=True)
class SlabEntry:
    """One stored tensor: where it sits in the slab and every (module path, attribute) bound to it."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    bindings: tuple[tuple[str, str], ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * _element_size(self.dtype)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{path}.{attr}" if path else attr for path, attr in self.bindings)


@dataclass(frozen=True)
class SlabLayout:
    """Aligned offsets for a list of tensors; `nbytes` is the exact buffer size."""

    entries: tuple[SlabEntry, ...]
    nbytes: int

    @classmethod
    def pack(cls, tensors: list[tuple[tuple[tuple[str, str], ...], tuple[int, ...], torch.dtype]]) -> SlabLayout:
        """tensors: (bindings, shape, dtype) in storage order."""
        entries = []
        offset = 0
        for bindings, shape, dtype in tensors:
            offset = align(offset)
            entry = SlabEntry(offset=offset, shape=tuple(shape), dtype=dtype, bindings=tuple(bindings))
            entries.append(entry)
            offset += entry.nbytes
        return cls(entries=tuple(entries), nbytes=offset)

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data, without alignment padding."""
        return sum(e.nbytes for e in self.entries)


def tensor_view(buffer: torch.Tensor, entry: SlabEntry) -> torch.Tensor:
    """The typed, shaped view of `entry` inside a uint8 `buffer` (host slab or device arena)."""
    return buffer[entry.offset : entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)


class HostSlab:
    """An exact-size host buffer holding one layout; `pin()` page-locks it in place.

    `shared_buffer`: exactly `layout.nbytes` of uint8 mapped from a file the host's processes share
    (`shared.SharedFiles.map`), to hold the layout instead of this process's own allocation."""

    def __init__(self, layout: SlabLayout, *, shared_buffer: torch.Tensor | None = None):
        self.layout = layout
        if shared_buffer is None:
            self.buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
        else:
            assert shared_buffer.dtype == torch.uint8 and shared_buffer.shape == (layout.nbytes,), shared_buffer.shape
            self.buffer = shared_buffer
        self.shared = shared_buffer is not None
        self.pinned = False

    def pin(self) -> None:
        """Page-lock the buffer in place. Cheapest once it is filled: the pages then already exist."""
        if not self.pinned and self.layout.nbytes > 0:
            self.pinned = _register_pinned(self.buffer)

    def view(self, entry: SlabEntry) -> torch.Tensor:
        return tensor_view(self.buffer, entry)


def _register_pinned(buffer: torch.Tensor) -> bool:
    """Page-lock `buffer` where it is (no rounding); unregistered when the buffer's storage is freed."""
    cudart = torch.cuda.cudart()
    result = cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    if int(result) != 0:
        logger.warning("cudaHostRegister failed (%s); copies from this slab will be pageable", result)
        return False
    pointer = buffer.data_ptr()
    # The storage outlives the slab while parameters still view it; unpin when the storage goes.
    weakref.finalize(buffer.untyped_storage(), cudart.cudaHostUnregister, pointer)
    return True


def align(offset: int) -> int:
    """`offset` rounded up to the next multiple of ALIGNMENT."""
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
