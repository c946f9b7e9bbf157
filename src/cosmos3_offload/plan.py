"""The memory plan: where each group lives and how activations are bounded. A value, not a process.

`Plan` is what the loader and the runner follow. It comes from `--offload-stages` (`from_stages`)
or from the budget planner (`planner.choose_plan`); either way it is fixed before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .decode import TileGrid
from .errors import InputError
from .groups import PHASES, PLACED_LIKE, check_offload_groups

MODES = ("resident", "staged", "streamed")


@dataclass(frozen=True, kw_only=True)
class GroupPlan:
    """resident: on the device for good; staged: whole group into the arena for its phase;
    streamed: `resident_layers` stay on the device, the other layers flow through `ring` slots,
    with copies issued `prefetch` layers ahead."""

    mode: str = "resident"
    resident_layers: tuple[int, ...] = ()
    ring: int = 2
    prefetch: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown placement {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.ring < 2:
            raise InputError(f"a streaming ring needs at least 2 slots, got {self.ring}")
        if not 1 <= self.prefetch < self.ring:
            raise InputError(f"prefetch depth must be between 1 and ring-1 ({self.ring - 1}), got {self.prefetch}")

    def describe(self) -> str:
        if self.mode != "streamed":
            return self.mode
        return f"streamed ({len(self.resident_layers)} resident layers, ring of {self.ring})"


@dataclass(frozen=True, kw_only=True)
class Plan:
    """One placement per group, the MLP token chunk (None: whole) and the VAE decode's tile grid."""

    reasoner: GroupPlan = field(default_factory=GroupPlan)
    generator: GroupPlan = field(default_factory=GroupPlan)
    vae: GroupPlan = field(default_factory=GroupPlan)
    mlp_chunk: int | None = None
    decode_grid: TileGrid = field(default_factory=TileGrid)

    def __post_init__(self) -> None:
        if self.vae.mode == "streamed":
            raise InputError("the VAE can be resident or staged, not streamed")
        if self.mlp_chunk is not None and self.mlp_chunk < 1:
            raise InputError(f"the MLP chunk must be a positive token count, got {self.mlp_chunk}")

    @classmethod
    def from_stages(cls, stages: tuple[str, ...] | list[str] | frozenset[str]) -> Plan:
        """The stage-offload plan of `--offload-stages`: named groups staged, the rest resident."""
        staged = check_offload_groups(stages)
        return cls(**{g: GroupPlan(mode="staged" if g in staged else "resident") for g in PHASES})

    def group(self, name: str) -> GroupPlan:
        return getattr(self, PLACED_LIKE.get(name, name))

    @property
    def moves_weights(self) -> bool:
        return any(self.group(g).mode != "resident" for g in PHASES)

    def describe(self) -> str:
        parts = [f"{g} {self.group(g).describe()}" for g in PHASES]
        if self.mlp_chunk:
            parts.append(f"MLP in chunks of {self.mlp_chunk} tokens")
        grid = self.decode_grid
        if (grid.rows, grid.cols, grid.frames) != (1, 1, TileGrid().frames):
            parts.append(f"decode in {grid.rows}x{grid.cols} tiles, {grid.frames} frame(s) a pass")
        return "; ".join(parts)
