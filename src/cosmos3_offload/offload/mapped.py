"""Mapped streaming: a tower's layers read from memory-mapped weight files, through a pinned bounce ring.

A `Mapped` placement is a `Streamed` one whose streamed layers have no host slab of their own: each
weight's master copy is a view into a memory-mapped file (the page cache; `MappedLayer.sources`).
Copying a layer takes two hops. The host copies each weight from the file into a slot of a small
pinned bounce ring (a plain memcpy, casting to the run's dtype where the file stores another);
then the copy stream moves the slot into the layer's arena slot, as `Streamed` does from a slab.
Before the host overwrites a bounce slot it waits for the copy that last read it (the only host
wait; that copy waits only for compute queued already), so filling one slot overlaps the other's
copy to the device. Host memory: the bounce ring (pinned) and file pages the kernel can drop.

`ReadInPlace` is the host-only counterpart: weights read on the host straight from the mapped
files (an embedding table whose few rows are gathered there), never copied at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .placements import _Unmoved, bind_views
from .slabs import HostSlab, SlabEntry, SlabLayout, tensor_view
from .streaming import Streamed
from .streams import CopyRecord


@dataclass(frozen=True)
class MappedLayer:
    """One layer's weights: their layout in the run's dtype, and for each entry the stored tensor
    (a view into a mapped file, of the entry's shape, in the file's dtype)."""

    layout: SlabLayout
    sources: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        assert len(self.sources) == len(self.layout.entries), (len(self.sources), len(self.layout.entries))
        for entry, source in zip(self.layout.entries, self.sources):
            assert tuple(source.shape) == entry.shape, (entry.names, tuple(source.shape), entry.shape)

    @property
    def file_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.sources)

    def source_of(self) -> dict[SlabEntry, torch.Tensor]:
        return dict(zip(self.layout.entries, self.sources))


@dataclass
class ReadInPlace(_Unmoved):
    """Weights read on the host where they lie in mapped files; never copied, never in private memory."""

    name: str
    stored: MappedLayer
    copies: list[CopyRecord] = field(default_factory=list)

    where = "mapped"
    resident_bytes = 0
    host_slabs = ()

    def __post_init__(self) -> None:
        for entry, source in zip(self.stored.layout.entries, self.stored.sources):
            assert source.dtype == entry.dtype, (entry.names, source.dtype, entry.dtype)  # read as they are

    @property
    def payload_bytes(self) -> int:
        return self.stored.layout.payload_bytes

    @property
    def mapped_bytes(self) -> int:
        return self.stored.file_bytes


class Mapped(Streamed):
    """Head + resident layers on the device; the other layers read from mapped files into `ring`
    arena slots through `bounce` pinned host slots."""

    where = "mapped"

    def __init__(
        self,
        name: str,
        root: nn.Module,
        layers: nn.ModuleList,
        mapped: dict[int, MappedLayer],
        resident: SlabLayout,
        *,
        ring: int,
        prefetch: int,
        bounce: int,
    ):
        assert bounce >= 1, bounce
        self.mapped = mapped
        self._init_ring(name, root, layers, {i: m.layout for i, m in mapped.items()}, resident, ring, prefetch)
        self.bounce = HostSlab(SlabLayout.pack([(((name, "bounce"),), (bounce * self.slot_bytes,), torch.uint8)]))
        self._bounce_readers: list[CopyRecord | None] = [None] * bounce  # last copy out of each bounce slot
        self._bounce_next = 0

    @property
    def host_slabs(self) -> tuple[HostSlab, ...]:
        return (self.bounce,)

    @property
    def mapped_bytes(self) -> int:
        return sum(m.file_bytes for m in self.mapped.values())

    def _copy_layer(self, index: int, destination: torch.Tensor, last_reader: torch.cuda.Event | None) -> CopyRecord:
        """File -> bounce slot on the host (after the slot's last copy out), bounce slot -> arena slot on
        the copy stream (after `last_reader`)."""
        slot = self._bounce_next
        self._bounce_next = (slot + 1) % len(self._bounce_readers)
        previous = self._bounce_readers[slot]
        if previous is not None:
            self._copier.host_waits_for(previous)  # the pinned slot is still being read by the device copy
        layer = self.mapped[index]
        start = slot * self.slot_bytes
        staging = self.bounce.buffer[start : start + layer.layout.nbytes]
        for entry, source in zip(layer.layout.entries, layer.sources):
            tensor_view(staging, entry).copy_(source)  # page cache -> pinned, cast to the run's dtype
        record = self._copier.copy_after_event(destination, staging, last_reader)
        self._bounce_readers[slot] = record
        return record

    def _bind_home(self, index: int) -> None:
        layer = self.mapped[index]
        bind_views(self.root, layer.layout, layer.source_of().__getitem__)
