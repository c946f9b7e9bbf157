"""Cosmos3's weight groups mapped onto the offload engine's placements, as a plan says.

`weight_grouping` names the group of every transformer weight (a streamed tower's non-resident
layers get a group each: "<tower>@<layer>"); `Placer` gives each group its home (device tensors,
a pinned host slab, or an unpinned host slab) and builds the engine's placements.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from ..model.groups import EMBEDDING, GENERATOR, REASONER, SOUND, UNUSED, VAE, VAE_ENCODER, transformer_group_of
from ..offload.materialize import allocate_on_device
from ..offload.placements import HostOnly, Placement, Resident, Staged, bind_views
from ..offload.slabs import HostSlab, SlabEntry, SlabLayout
from ..offload.streaming import Streamed
from ..planning.plan import Mode, Plan

_LAYER = re.compile(r"^layers\.(\d+)\.")
LAYER_MARK = "@"  # group name of a streamed layer: "<tower>@<index>"


def weight_grouping(plan: Plan, layers: int) -> Callable[[str], str]:
    """Group names for the transformer's weights; a streamed tower's non-resident layers get one group each."""

    def group_of(name: str) -> str:
        group = transformer_group_of(name, layers)
        match = _LAYER.match(name)
        if group in (REASONER, GENERATOR) and plan.group(group).mode is Mode.STREAMED and match:
            if int(match.group(1)) not in plan.group(group).resident_layers:
                return f"{group}{LAYER_MARK}{match.group(1)}"
        return group

    return group_of


class Placer:
    """Gives each group its home and returns (entry, home) pairs for the values to be written into."""

    def __init__(self, device: torch.device, plan: Plan):
        self.device = device
        self.plan = plan
        self.placements: dict[str, Placement] = {}
        # Slabs that are copied to the device are pinned after they are filled (faulting pages in
        # from many threads is faster than pinning untouched memory).
        self.slabs_to_pin: list[HostSlab] = []

    def place(self, root: nn.Module, layouts: dict[str, SlabLayout]) -> list[tuple[SlabEntry, torch.Tensor]]:
        targets: list[tuple[SlabEntry, torch.Tensor]] = []
        streamed: dict[str, dict[int, HostSlab]] = {REASONER: {}, GENERATOR: {}}
        on_device: dict[str, SlabLayout] = {}
        for group, layout in layouts.items():
            if group == UNUSED:
                continue  # never read by the split: left on meta, never allocated
            tower, _, index = group.partition(LAYER_MARK)
            if index:
                slab = self._host_slab(layout, pin=True)
                streamed[tower][int(index)] = slab
                view = slab.view
            elif group == EMBEDDING and self.plan.reasoner.moves_weights:
                # Read row by row on the host (see prefill); never copied, so never pinned.
                slab = self._host_slab(layout, pin=False)
                self.placements[group] = HostOnly(group, slab)
                view = slab.view
            elif group != EMBEDDING and self.plan.group(group).mode is Mode.STAGED:
                slab = self._host_slab(layout, pin=True)
                self.placements[group] = Staged(group, root, slab)
                view = slab.view
            else:
                view = self._device_homes(layout)
                on_device[group] = layout
            bind_views(root, layout, view)
            targets += [(entry, view(entry)) for entry in layout.entries]
        for group in (EMBEDDING, REASONER, GENERATOR, VAE, VAE_ENCODER, SOUND):
            if group in self.placements or (group not in on_device and not streamed.get(group)):
                continue  # placed above, or a group of another root
            head = on_device.get(group, SlabLayout.pack([]))
            if streamed.get(group):
                how = self.plan.group(group)
                self.placements[group] = Streamed(
                    group, root, root.layers, streamed[group], head, ring=how.ring, prefetch=how.prefetch
                )
            else:
                self.placements[group] = Resident(group, head)
        return targets

    def _host_slab(self, layout: SlabLayout, *, pin: bool) -> HostSlab:
        slab = HostSlab(layout)
        if pin and self.device.type == "cuda":
            self.slabs_to_pin.append(slab)
        return slab

    def _device_homes(self, layout: SlabLayout) -> Callable[[SlabEntry], torch.Tensor]:
        homes = {entry: allocate_on_device(entry, self.device) for entry in layout.entries}
        return homes.__getitem__
