"""Cosmos3's weight groups mapped onto the offload engine's placements, as a plan says.

`weight_grouping` names the group of every transformer weight (a streamed or mapped tower's
non-resident layers get a group each: "<tower>@<layer>"); `Placer` gives each group its home
(device tensors, a pinned host slab, an unpinned host slab, or, for a mapped tower's layers, the
checkpoint's memory-mapped files) and builds the engine's placements. With shared files (a `HostShare`'s
or a `NodeShare`'s, see offload/shared.py and offload/node_share.py), every host slab is a file the
host's processes share, written by the owner alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from ..model.groups import EMBEDDING, GENERATOR, REASONER, SOUND, UNUSED, VAE, VAE_ENCODER, transformer_group_of
from ..offload.mapped import Mapped, MappedLayer, ReadInPlace
from ..offload.materialize import allocate_on_device
from ..offload.placements import HostOnly, Placement, Resident, Staged, bind_views
from ..offload.shared import SlabFiles
from ..offload.slabs import HostSlab, SlabEntry, SlabLayout
from ..offload.streaming import Streamed
from ..planning.plan import BOUNCE_SLOTS, Mode, Plan
from .files import CheckpointWeights
from .mapped_files import MappedFiles
from .mapped_reasoner import check_mapped_reasoner

_LAYER = re.compile(r"^layers\.(\d+)\.")
LAYER_MARK = "@"  # group name of a streamed layer: "<tower>@<index>"


def weight_grouping(plan: Plan, layers: int, actions: bool = False) -> Callable[[str], str]:
    """Group names for the transformer's weights; a streamed or mapped tower's non-resident layers get
    one group each. `actions`: the action heads are the generator's (else unused: never loaded)."""

    def group_of(name: str) -> str:
        group = transformer_group_of(name, layers, actions)
        match = _LAYER.match(name)
        if group in (REASONER, GENERATOR) and plan.group(group).streams_layers and match:
            if int(match.group(1)) not in plan.group(group).resident_layers:
                return f"{group}{LAYER_MARK}{match.group(1)}"
        return group

    return group_of


class Placer:
    """Gives each group its home and returns (entry, home) pairs for the values this process writes.

    `stored`: the transformer's checkpoint weights, which a mapped tower's layers are read from, in
    place (so they get no (entry, home) pair: nothing is written into them). `shared_files`: every host
    slab is mapped from a file shared by the host's processes; only its owner gets their pairs (the load
    runs the files' protocol around placing and filling, see offload/shared.py). `reuse(entry)`: a
    tensor already on the device to keep as the home of a weight kept there (a live module's own, see
    module_weights.py), or None to allocate one."""

    def __init__(
        self,
        device: torch.device,
        plan: Plan,
        stored: CheckpointWeights | None = None,
        shared_files: SlabFiles | None = None,
        reuse: Callable[[SlabEntry], torch.Tensor | None] | None = None,
    ):
        check_mapped_reasoner(plan, has_files=stored is not None, rewrites_weights=False)
        self.device = device
        self.plan = plan
        self.files = None if stored is None else MappedFiles(stored)
        self.shared_files = shared_files
        self.reuse = reuse
        self.placements: dict[str, Placement] = {}
        # Slabs that are copied to the device are pinned after they are filled (faulting pages in
        # from many threads is faster than pinning untouched memory).
        self.slabs_to_pin: list[HostSlab] = []

    def place(self, root: nn.Module, layouts: dict[str, SlabLayout]) -> list[tuple[SlabEntry, torch.Tensor]]:
        targets: list[tuple[SlabEntry, torch.Tensor]] = []
        streamed: dict[str, dict[int, HostSlab]] = {REASONER: {}, GENERATOR: {}}
        mapped: dict[str, dict[int, MappedLayer]] = {REASONER: {}, GENERATOR: {}}
        on_device: dict[str, SlabLayout] = {}
        for group, layout in layouts.items():
            if group == UNUSED:
                continue  # never read by the split: left on meta, never allocated
            tower, _, index = group.partition(LAYER_MARK)
            stored = self._stored(group, layout)
            if stored is not None:
                # Its home is the file: nothing allocated, nothing to write.
                if index:
                    mapped[tower][int(index)] = stored
                else:
                    self.placements[group] = ReadInPlace(group, stored)
                bind_views(root, layout, stored.source_of().__getitem__)
                continue
            slab = self._host_home(group, layout, root, streamed)
            if slab is None:
                view = self._device_homes(layout)
                on_device[group] = layout
            else:
                view = slab.view
            bind_views(root, layout, view)
            if slab is None or self._writes(slab):
                targets += [(entry, view(entry)) for entry in layout.entries]
        for group in (EMBEDDING, REASONER, GENERATOR, VAE, VAE_ENCODER, SOUND):
            if group in self.placements or (group not in on_device and not (streamed.get(group) or mapped.get(group))):
                continue  # placed above, or a group of another root
            head = on_device.get(group, SlabLayout.pack([]))
            self.placements[group] = self._tower(group, root, head, streamed.get(group), mapped.get(group))
        return targets

    def _host_home(
        self, group: str, layout: SlabLayout, root: nn.Module, streamed: dict[str, dict[int, HostSlab]]
    ) -> HostSlab | None:
        """The host slab of an offloaded group (and its placement, but for a streamed layer's, which its
        tower's takes); None for a group kept on the device."""
        tower, _, index = group.partition(LAYER_MARK)
        if index:
            slab = self._host_slab(group, layout, pin=True)
            streamed[tower][int(index)] = slab
        elif group == EMBEDDING and self.plan.reasoner.moves_weights:
            # Read row by row on the host (see prefill); never copied, so never pinned.
            slab = self._host_slab(group, layout, pin=False)
            self.placements[group] = HostOnly(group, slab)
        elif group != EMBEDDING and self.plan.group(group).mode is Mode.STAGED:
            slab = self._host_slab(group, layout, pin=True)
            self.placements[group] = Staged(group, root, slab)
        else:
            return None
        return slab

    def _writes(self, slab: HostSlab) -> bool:
        """Whether this process writes `slab`'s values: its own slab, or a shared one it owns."""
        return not slab.shared or self.shared_files.owner

    def _stored(self, group: str, layout: SlabLayout) -> MappedLayer | None:
        """The file views of a group read from the checkpoint in place: a mapped tower's streamed layers,
        and, with the reasoner mapped, the embedding table where the file stores the run's dtype
        (it is read on the host as it lies; stored in another dtype, it gets a private host slab)."""
        tower, _, index = group.partition(LAYER_MARK)
        if index and self.plan.group(tower).mode is Mode.MAPPED:
            return MappedLayer(layout, tuple(self.files.view(entry) for entry in layout.entries))
        if group == EMBEDDING and self.plan.reasoner.mode is Mode.MAPPED:
            views = tuple(self.files.view(entry) for entry in layout.entries)
            if all(v.dtype == e.dtype for v, e in zip(views, layout.entries)):
                return MappedLayer(layout, views)
        return None

    def _tower(
        self,
        group: str,
        root: nn.Module,
        head: SlabLayout,
        streamed: dict[int, HostSlab] | None,
        mapped: dict[int, MappedLayer] | None,
    ) -> Placement:
        """A group kept on the device (`head`), with its other layers streamed or mapped, if any."""
        if mapped:
            how = self.plan.group(group)
            placement = Mapped(
                group, root, root.layers, mapped, head, ring=how.ring, prefetch=how.prefetch, bounce=BOUNCE_SLOTS
            )
            if self.device.type == "cuda":
                self.slabs_to_pin.append(placement.bounce)
            return placement
        if streamed:
            how = self.plan.group(group)
            return Streamed(group, root, root.layers, streamed, head, ring=how.ring, prefetch=how.prefetch)
        return Resident(group, head)

    def _host_slab(self, group: str, layout: SlabLayout, *, pin: bool) -> HostSlab:
        if self.shared_files is None:
            slab = HostSlab(layout)
        else:
            slab = HostSlab(layout, shared_buffer=self.shared_files.map(group, layout.nbytes))
        if pin and self.device.type == "cuda":
            self.slabs_to_pin.append(slab)
        return slab

    def _device_homes(self, layout: SlabLayout) -> Callable[[SlabEntry], torch.Tensor]:
        homes = {entry: self._device_home(entry) for entry in layout.entries}
        return homes.__getitem__

    def _device_home(self, entry: SlabEntry) -> torch.Tensor:
        kept = None if self.reuse is None else self.reuse(entry)
        return allocate_on_device(entry, self.device) if kept is None else kept
