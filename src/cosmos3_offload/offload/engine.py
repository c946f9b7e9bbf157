"""The offload engine: every group's placement, and moving a group in for the part that uses it.

Generic over `nn.Module` groups (see placements.py). `OffloadEngine.use(name)` wraps the part of
a request that uses group `name`; groups are used in the engine's `use_order`. The arena holds what
the group in use needs and no more: a part never carries the arena of a larger group still to come
(the VAE's staged decoder is larger than a ring of FP8 generator layers, and the denoise loop's
activations are the request's largest). It is kept from one part to the next when the next needs
as much, and re-allocated otherwise once the part before has freed its activations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..units import format_bytes
from .arena import DeviceArena
from .placements import Placement
from .streams import CopyEngine

logger = logging.getLogger(__name__)


class OffloadEngine:
    """Runs each part of a request with its group's weights on the device."""

    def __init__(self, device: torch.device, placements: dict[str, Placement], use_order: tuple[str, ...]):
        assert set(use_order) <= set(placements), (use_order, list(placements))
        self.device = device
        self.placements = placements
        self.use_order = use_order
        self.arena = DeviceArena(device)
        self.copier = CopyEngine(device)

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Make group `name` usable on the device for the body of the `with`."""
        placement = self.placements[name]
        if placement.arena_bytes:
            self._fit_arena(placement.arena_bytes)
        placement.enter(self.arena, self.copier)
        try:
            yield
        finally:
            placement.exit()
            later = self.use_order[self.use_order.index(name) + 1 :]
            self._fit_arena(self.placements[later[0]].arena_bytes if later else 0, grow=False)

    def layers(self, name: str) -> Iterator[nn.Module] | None:
        """The layer sequence a part should run: streamed groups yield layers as they arrive."""
        return self.placements[name].layers_ready()

    def _fit_arena(self, needed: int, *, grow: bool = True) -> None:
        """Release the arena when it holds more than `needed`, then (re)reserve."""
        if self.arena.nbytes > needed:
            self.arena.release()
        if grow and needed:
            self.arena.reserve(needed)

    @property
    def resident_bytes(self) -> int:
        """Device bytes of weights held for the whole run."""
        return sum(p.resident_bytes for p in self.placements.values())

    @property
    def host_bytes(self) -> int:
        """Bytes of every host slab, pinned or not."""
        return sum(s.layout.nbytes for p in self.placements.values() for s in p.host_slabs)

    @property
    def shared_bytes(self) -> int:
        """Bytes of the host slabs shared with this host's other processes (held once per host, not per
        process; see shared.py), pinned or not; included in `host_bytes`."""
        return sum(s.layout.nbytes for p in self.placements.values() for s in p.host_slabs if s.shared)

    @property
    def pinned_bytes(self) -> int:
        return sum(s.layout.nbytes for p in self.placements.values() for s in p.host_slabs if s.pinned)

    @property
    def mapped_bytes(self) -> int:
        """File bytes read from mapped checkpoint files (page cache, not the process's own memory)."""
        return sum(p.mapped_bytes for p in self.placements.values())

    def summary(self) -> str:
        """One line per group and one for the arena: where weights live, sizes, copy throughput."""
        lines = []
        for p in self.placements.values():
            line = f"{p.name:<11} {p.where:<8} {format_bytes(p.payload_bytes):>10}"
            if p.copies:
                seconds = sum(c.seconds_blocking() for c in p.copies)
                moved = sum(c.nbytes for c in p.copies)
                rate = moved / max(seconds, 1e-9) / 1e9
                line += f"  {format_bytes(moved)} copied in {len(p.copies)} copies at {rate:.1f} GB/s"
            lines.append(line)
        line = f"arena       {format_bytes(self.arena.peak_bytes)}; pinned host {format_bytes(self.pinned_bytes)}"
        if self.shared_bytes:
            line += f"; host slabs shared by this host's processes {format_bytes(self.shared_bytes)}"
        if self.mapped_bytes:
            line += f"; mapped from files {format_bytes(self.mapped_bytes)}"
        lines.append(line)
        return "\n".join(lines)
