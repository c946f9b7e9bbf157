"""Layerwise streaming: a tower's layers flow through a small ring of device slots.

A `Streamed` placement keeps its head weights and its resident layers on the device and each streamed
layer in its own pinned host slab. While the group is in use, `layers_ready()` yields the decoder
layers in order; before yielding a streamed layer it makes the compute stream wait for that
layer's copy and issues the copies of the next `prefetch` streamed layers into free slots; after
the caller has queued the layer's compute, the slot is released with an event, and the next copy
into it waits for that event. The copy order wraps from the last streamed layer to the first, so
at the end of a denoising step the next step's first layers are already on their way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch
from torch import nn

from .arena import DeviceArena
from .placements import bind_views
from .slabs import HostSlab, SlabLayout, align, tensor_view
from .streams import CopyEngine, CopyRecord


class Streamed:
    """Head + resident layers on the device; the other layers streamed through `ring` arena slots.

    Where a streamed layer's master copy lives is left to two methods, `_copy_layer` and
    `_bind_home`: here a pinned host slab per layer; `mapped.Mapped` reads the checkpoint's files.
    """

    where = "streamed"
    mapped_bytes = 0  # nothing is read from mapped files

    def __init__(
        self,
        name: str,
        root: nn.Module,
        layers: nn.ModuleList,
        streamed: dict[int, HostSlab],
        resident: SlabLayout,
        *,
        ring: int,
        prefetch: int,
    ):
        self.streamed = streamed
        self._init_ring(name, root, layers, {i: s.layout for i, s in streamed.items()}, resident, ring, prefetch)

    def _init_ring(
        self,
        name: str,
        root: nn.Module,
        layers: nn.ModuleList,
        layouts: dict[int, SlabLayout],
        resident: SlabLayout,
        ring: int,
        prefetch: int,
    ) -> None:
        assert ring >= 2 and 1 <= prefetch < ring, (ring, prefetch)
        self.name, self.root, self.layers, self.layouts = name, root, layers, layouts
        self.resident = resident
        self.ring, self.prefetch = ring, prefetch
        self.order = sorted(layouts)
        self.slot_bytes = align(max(layout.nbytes for layout in layouts.values()))
        self.copies: list[CopyRecord] = []
        self.copied_layers: list[int] = []  # every streamed copy's layer index, in issue order
        self._buffer: torch.Tensor | None = None

    @property
    def arena_bytes(self) -> int:
        return self.ring * self.slot_bytes

    @property
    def payload_bytes(self) -> int:
        return self.resident.payload_bytes + sum(layout.payload_bytes for layout in self.layouts.values())

    @property
    def resident_bytes(self) -> int:
        return self.resident.payload_bytes

    @property
    def host_slabs(self) -> tuple[HostSlab, ...]:
        return tuple(self.streamed[i] for i in self.order)

    def enter(self, arena: DeviceArena, copier: CopyEngine) -> None:
        self._buffer = arena.reserve(self.arena_bytes)
        self._copier = copier
        # The arena may still be read by kernels of the group used before: first copies wait for them.
        queued = copier.record_compute()
        self._free: deque[tuple[int, torch.cuda.Event | None]] = deque((slot, queued) for slot in range(self.ring))
        self._loaded: deque[tuple[int, int, CopyRecord]] = deque()  # (layer, slot, copy) in copy order
        self._next = 0  # position in the cyclic copy order

    def exit(self) -> None:
        # Prefetched copies for a step that will not come: let compute wait for them, so the arena
        # can be reused or released safely, and point those layers back at their homes.
        for layer, _, record in self._loaded:
            self._copier.compute_waits_for(record)
            self._bind_home(layer)
        self._loaded.clear()
        self._buffer = None

    def layers_ready(self) -> Iterator[nn.Module]:
        """The decoder layers in order, each one's weights usable by kernels queued after the yield."""
        for index, layer in enumerate(self.layers):
            if index in self.layouts:
                while not any(loaded == index for loaded, _, _ in self._loaded):
                    self._issue_next()
                self._copier.compute_waits_for(next(r for loaded, _, r in self._loaded if loaded == index))
                while self._free and len(self._loaded) <= self.prefetch:
                    self._issue_next()
            yield layer
            if index in self.layouts:
                self._release(index)

    def _issue_next(self) -> None:
        assert self._free, "no free slot: the ring is smaller than the prefetch depth"
        slot, last_reader = self._free.popleft()
        index = self.order[self._next % len(self.order)]
        self._next += 1
        layout = self.layouts[index]
        start = slot * self.slot_bytes
        destination = self._buffer[start : start + layout.nbytes]
        record = self._copy_layer(index, destination, last_reader)
        bind_views(self.root, layout, lambda entry: tensor_view(destination, entry))
        self._loaded.append((index, slot, record))
        self.copies.append(record)
        self.copied_layers.append(index)

    def _copy_layer(self, index: int, destination: torch.Tensor, last_reader: torch.cuda.Event | None) -> CopyRecord:
        """Copy layer `index` into its arena slot `destination` once `last_reader` has passed."""
        return self._copier.copy_after_event(destination, self.streamed[index].buffer, last_reader)

    def _bind_home(self, index: int) -> None:
        """Point layer `index`'s weights back at their master copy."""
        bind_views(self.root, self.streamed[index].layout, self.streamed[index].view)

    def _release(self, index: int) -> None:
        layer, slot, _ = self._loaded.popleft()
        assert layer == index, (layer, index)
        # Kernels already queued keep their pointers; the next copy into the slot waits for them.
        self._free.append((slot, self._copier.record_compute()))
        self._bind_home(index)
