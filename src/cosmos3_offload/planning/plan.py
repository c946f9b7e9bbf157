"""The memory plan: where each group lives and how activations are bounded. A value, not a process.

`Plan` is what the loader and the runner follow. It comes from `--offload-stages` (`from_offload`)
or from the budget planner (`planning.search.choose_plan`); either way it is fixed before anything
runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..errors import InputError
from ..model.groups import GENERATOR, PLACED_LIKE, PLANNED_GROUPS, REASONER, VAE, check_offload_groups
from .tiles import TileGrid

# Pinned host slots a mapped tower's layers pass through on their way from the page cache to the
# device: one is filled by the host while the other's copy to the device runs.
BOUNCE_SLOTS = 2


class Mode(str, Enum):
    """How a group's weights reach the device."""

    RESIDENT = "resident"  # on the device for the whole run
    STAGED = "staged"  # the whole group copied into the arena for its part of the request
    STREAMED = "streamed"  # layer by layer through a ring of arena slots
    # Streamed straight from the memory-mapped checkpoint (page cache), each layer through a small
    # pinned bounce ring into the arena's ring: no host copy of its own. Only for a group used once
    # per request (the reasoner), and only with a checkpoint (random weights have no file).
    MAPPED = "mapped"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, kw_only=True)
class GroupPlan:
    """One group's placement. Streamed or mapped: `resident_layers` stay on the device, the other
    layers flow through `ring` slots, with copies issued `prefetch` layers ahead."""

    mode: Mode = Mode.RESIDENT
    resident_layers: tuple[int, ...] = ()
    ring: int = 2
    prefetch: int = 1

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            choices = ", ".join(m.value for m in Mode)
            raise InputError(f"unknown placement {self.mode!r}; choose one of {choices}") from None
        if self.ring < 2:
            raise InputError(f"a streaming ring needs at least 2 slots, got {self.ring}")
        if not 1 <= self.prefetch < self.ring:
            raise InputError(f"prefetch depth must be between 1 and ring-1 ({self.ring - 1}), got {self.prefetch}")
        if any(i < 0 for i in self.resident_layers) or len(set(self.resident_layers)) != len(self.resident_layers):
            raise InputError(f"resident layers must be distinct layer indexes, got {self.resident_layers}")

    @property
    def moves_weights(self) -> bool:
        return self.mode is not Mode.RESIDENT

    @property
    def streams_layers(self) -> bool:
        """Layer by layer through a ring of arena slots (streamed from pinned slabs, or mapped)."""
        return self.mode in (Mode.STREAMED, Mode.MAPPED)

    def describe(self) -> str:
        if not self.streams_layers:
            return self.mode.value
        return f"{self.mode.value} ({len(self.resident_layers)} resident layers, ring of {self.ring})"


@dataclass(frozen=True, kw_only=True)
class Plan:
    """One placement per group, the MLP token chunk (None: whole) and the VAE decode's tile grid."""

    reasoner: GroupPlan = field(default_factory=GroupPlan)
    generator: GroupPlan = field(default_factory=GroupPlan)
    vae: GroupPlan = field(default_factory=GroupPlan)
    mlp_chunk: int | None = None
    decode_grid: TileGrid = field(default_factory=TileGrid)

    def __post_init__(self) -> None:
        if self.vae.mode in (Mode.STREAMED, Mode.MAPPED):
            raise InputError(f"the VAE can be resident or staged, not {self.vae.mode.value}")
        if self.generator.mode is Mode.MAPPED:
            raise InputError("only the reasoner (used once per request) can be mapped; stream the generator instead")
        if self.mlp_chunk is not None and self.mlp_chunk < 1:
            raise InputError(f"the MLP chunk must be a positive token count, got {self.mlp_chunk}")

    @classmethod
    def from_offload(cls, groups: tuple[str, ...] | list[str] | frozenset[str]) -> Plan:
        """The plan of `--offload-stages`: the named groups staged, the rest resident."""
        staged = check_offload_groups(groups)
        return cls(**{g: GroupPlan(mode=Mode.STAGED if g in staged else Mode.RESIDENT) for g in PLANNED_GROUPS})

    def group(self, name: str) -> GroupPlan:
        """The placement of a group by name (`vae_encoder` is placed as `vae`)."""
        return {REASONER: self.reasoner, GENERATOR: self.generator, VAE: self.vae}[PLACED_LIKE.get(name, name)]

    @property
    def moves_weights(self) -> bool:
        return any(self.group(g).moves_weights for g in PLANNED_GROUPS)

    @property
    def maps_checkpoint(self) -> bool:
        """Some weights are read from the checkpoint's files while the request runs (needs a checkpoint)."""
        return any(self.group(g).mode is Mode.MAPPED for g in PLANNED_GROUPS)

    def describe(self) -> str:
        parts = [f"{g} {self.group(g).describe()}" for g in PLANNED_GROUPS]
        if self.mlp_chunk:
            parts.append(f"MLP in chunks of {self.mlp_chunk} tokens")
        grid = self.decode_grid
        if grid != TileGrid():
            parts.append(f"decode in {grid.rows}x{grid.cols} tiles, {grid.frames} frame(s) a pass")
        return "; ".join(parts)
