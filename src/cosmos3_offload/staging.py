"""The staging engine: where each group of weights lives, and moving it in for its phase.

Generic over `nn.Module` groups. A group is a root module plus a `SlabLayout` of some of its
weights; its placement is one of three small strategies behind the same interface (`enter`,
`exit`, `arena_bytes`, `payload_bytes`):

- `ResidentGroup`: the weights sit on the device for good; entering its phase does nothing.
- `StagedGroup`: the weights live in a pinned `HostSlab` (the master copy). Entering its phase
  copies the slab into the shared `DeviceArena` (one bulk copy on the copy stream) and rebinds
  every parameter to a view of the arena; leaving rebinds them to their host views. Nothing is
  ever copied back to the host.
- `StreamedGroup` (streaming.py): layers flow through a ring of arena slots during the phase.

`StagingEngine.phase(name)` wraps one phase of a request. Phases run in the engine's phase order;
the arena is sized for the largest need among the phases still to come, and released as soon as
the rest of the request needs less, so the transformer's arena is gone before the VAE decodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .arena import DeviceArena
from .slabs import HostSlab, SlabEntry, SlabLayout, tensor_view
from .stages import format_bytes
from .streams import CopyEngine, CopyRecord

logger = logging.getLogger(__name__)


def bind_views(root: nn.Module, layout: SlabLayout, view: Callable[[SlabEntry], torch.Tensor]) -> None:
    """Point every binding of every entry at `view(entry)`; tied names share one Parameter."""
    for entry in layout.entries:
        param = nn.Parameter(view(entry), requires_grad=False)
        for path, attr in entry.bindings:
            root.get_submodule(path)._parameters[attr] = param


@dataclass
class ResidentGroup:
    """Weights materialized on the device for the whole run."""

    name: str
    layout: SlabLayout

    where = "device"
    arena_bytes = 0

    @property
    def payload_bytes(self) -> int:
        return self.layout.payload_bytes

    def enter(self, arena: DeviceArena, copier: CopyEngine) -> None:
        pass

    def exit(self) -> None:
        pass


@dataclass
class StagedGroup:
    """Weights whose master copy is a host slab, copied into the arena for their phase."""

    name: str
    root: nn.Module
    slab: HostSlab
    copies: list[CopyRecord] = field(default_factory=list)

    where = "staged"

    @property
    def layout(self) -> SlabLayout:
        return self.slab.layout

    @property
    def arena_bytes(self) -> int:
        return self.layout.nbytes

    @property
    def payload_bytes(self) -> int:
        return self.layout.payload_bytes

    def enter(self, arena: DeviceArena, copier: CopyEngine) -> None:
        buffer = arena.reserve(self.layout.nbytes)
        self.copies.append(copier.copy_after_compute(buffer[: self.layout.nbytes], self.slab.buffer))
        bind_views(self.root, self.layout, lambda entry: tensor_view(buffer, entry))

    def exit(self) -> None:
        bind_views(self.root, self.layout, self.slab.view)


class StagingEngine:
    """Runs each phase with its group's weights on the device."""

    def __init__(self, device: torch.device, placements: dict, phase_order: tuple[str, ...]):
        self.device = device
        self.placements = placements  # name -> ResidentGroup | StagedGroup | StreamedGroup
        self.phase_order = phase_order
        self.arena = DeviceArena(device)
        self.copier = CopyEngine(device)

    def staged(self) -> list:
        """Placements that move weights (staged or streamed)."""
        return [p for p in self.placements.values() if p.arena_bytes > 0]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Make group `name` usable on the device for the body of the `with`."""
        placement = self.placements[name]
        if placement.arena_bytes:
            self._fit_arena(self._needed_from(name))
        placement.enter(self.arena, self.copier)
        try:
            yield
        finally:
            placement.exit()
            later = self.phase_order[self.phase_order.index(name) + 1 :]
            self._fit_arena(self._needed_from(later[0]) if later else 0, grow=False)

    def layers(self, name: str) -> Iterator[nn.Module] | None:
        """The layer sequence a phase should run: streamed groups yield layers as they arrive."""
        placement = self.placements[name]
        return placement.layers_ready() if hasattr(placement, "layers_ready") else None

    def _needed_from(self, name: str) -> int:
        remaining = self.phase_order[self.phase_order.index(name) :]
        return max([p.arena_bytes for n, p in self.placements.items() if n in remaining] + [0])

    def _fit_arena(self, needed: int, *, grow: bool = True) -> None:
        """Release the arena when it holds more than the rest of the request needs, then (re)reserve."""
        if self.arena.nbytes > needed:
            self.arena.release()
        if grow and needed:
            self.arena.reserve(needed)

    @property
    def pinned_bytes(self) -> int:
        slabs = [p.slab for p in self.placements.values() if isinstance(p, StagedGroup)]
        slabs += [s for p in self.placements.values() for s in getattr(p, "streamed", {}).values()]
        return sum(s.layout.nbytes for s in slabs if s.pinned)

    def summary(self) -> str:
        """One line per group and one for the arena: where weights live, sizes, copy throughput."""
        lines = []
        for p in self.placements.values():
            line = f"{p.name:<11} {p.where:<8} {format_bytes(p.payload_bytes):>10}"
            copies = getattr(p, "copies", [])
            if copies:
                seconds = sum(c.seconds_blocking() for c in copies)
                moved = sum(c.nbytes for c in copies)
                rate = moved / max(seconds, 1e-9) / 1e9
                line += f"  {format_bytes(moved)} copied in {len(copies)} copies at {rate:.1f} GB/s"
            lines.append(line)
        lines.append(
            f"arena       {format_bytes(self.arena.peak_bytes)}; pinned host {format_bytes(self.pinned_bytes)}"
        )
        return "\n".join(lines)
