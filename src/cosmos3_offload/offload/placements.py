"""Where one group of weights lives, as small strategies behind one interface (`Placement`).

A group is a root module plus a `SlabLayout` of some of its weights. Its placement says how its
weights reach the device for the part of the request that uses them:

- `Resident`: on the device for good; using it does nothing.
- `HostOnly`: in an unpinned host slab, never copied (read on the host by the math, e.g. an
  embedding table whose few rows are gathered there).
- `Staged`: the master copy is a pinned `HostSlab`. Entering copies the slab into the shared
  `DeviceArena` (one bulk copy on the copy stream) and rebinds every parameter to a view of the
  arena; leaving rebinds them to their host views. Nothing is ever copied back to the host.
- `Streamed` (streaming.py): layers flow through a ring of arena slots while the group is in use.
- `Mapped` (mapped.py): streamed too, each layer read from memory-mapped files through a small
  pinned bounce ring instead of a pinned slab of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .arena import DeviceArena
from .slabs import HostSlab, SlabEntry, SlabLayout, tensor_view
from .streams import CopyEngine, CopyRecord


class Placement(Protocol):
    """What the engine needs of every placement."""

    name: str
    where: str  # "device", "host", "staged" or "streamed", for the run summary
    copies: list[CopyRecord]  # every host-to-device copy it made

    @property
    def arena_bytes(self) -> int: ...  # arena bytes it needs while in use

    @property
    def resident_bytes(self) -> int: ...  # device bytes it holds for the whole run

    @property
    def payload_bytes(self) -> int: ...  # its tensors' bytes, wherever they are

    @property
    def host_slabs(self) -> tuple[HostSlab, ...]: ...

    @property
    def mapped_bytes(self) -> int: ...  # file bytes it reads from mapped files (page cache)

    def enter(self, arena: DeviceArena, copier: CopyEngine) -> None: ...

    def exit(self) -> None: ...

    def layers_ready(self) -> Iterator[nn.Module] | None:
        """The layers in order, each usable when yielded (streamed placements); None: use them as they are."""


def bind_views(root: nn.Module, layout: SlabLayout, view: Callable[[SlabEntry], torch.Tensor]) -> None:
    """Point every binding of every entry at `view(entry)`; tied names share one Parameter."""
    for entry in layout.entries:
        param = nn.Parameter(view(entry), requires_grad=False)
        for path, attr in entry.bindings:
            root.get_submodule(path)._parameters[attr] = param


class _Unmoved:
    """Weights that never move: using the group does nothing."""

    arena_bytes = 0
    mapped_bytes = 0

    def enter(self, arena: DeviceArena, copier: CopyEngine) -> None:
        pass

    def exit(self) -> None:
        pass

    def layers_ready(self) -> None:
        return None


@dataclass
class Resident(_Unmoved):
    """Weights materialized on the device for the whole run."""

    name: str
    layout: SlabLayout
    copies: list[CopyRecord] = field(default_factory=list)

    where = "device"
    host_slabs = ()

    @property
    def payload_bytes(self) -> int:
        return self.layout.payload_bytes

    @property
    def resident_bytes(self) -> int:
        return self.layout.payload_bytes


@dataclass
class HostOnly(_Unmoved):
    """Weights that stay in a host slab and are read there; never copied, so never pinned."""

    name: str
    slab: HostSlab
    copies: list[CopyRecord] = field(default_factory=list)

    where = "host"
    resident_bytes = 0

    @property
    def payload_bytes(self) -> int:
        return self.slab.layout.payload_bytes

    @property
    def host_slabs(self) -> tuple[HostSlab, ...]:
        return (self.slab,)


@dataclass
class Staged:
    """Weights whose master copy is a host slab, copied into the arena for their part of the request."""

    name: str
    root: nn.Module
    slab: HostSlab
    copies: list[CopyRecord] = field(default_factory=list)

    where = "staged"
    resident_bytes = 0
    mapped_bytes = 0

    @property
    def layout(self) -> SlabLayout:
        return self.slab.layout

    @property
    def arena_bytes(self) -> int:
        return self.layout.nbytes

    @property
    def payload_bytes(self) -> int:
        return self.layout.payload_bytes

    @property
    def host_slabs(self) -> tuple[HostSlab, ...]:
        return (self.slab,)

    def enter(self, arena: DeviceArena, copier: CopyEngine) -> None:
        buffer = arena.reserve(self.layout.nbytes)
        self.copies.append(copier.copy_after_compute(buffer[: self.layout.nbytes], self.slab.buffer))
        bind_views(self.root, self.layout, lambda entry: tensor_view(buffer, entry))

    def exit(self) -> None:
        bind_views(self.root, self.layout, self.slab.view)

    def layers_ready(self) -> None:
        return None
