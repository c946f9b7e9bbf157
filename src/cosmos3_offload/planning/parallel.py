"""How a request spreads over several processes (one GPU each): CFG-parallel times sequence-parallel.

Pure arithmetic. Rank r runs CFG branch `r // sequence` (0: conditional, 1: unconditional) and holds
the `r % sequence`-th of `sequence` equal row blocks of that branch's generator tokens; attention
exchanges heads for tokens (Ulysses), so every head count the model has must divide by `sequence`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

CFG_PARALLEL_CHOICES = ("auto", "on", "off")
MAX_GPUS = 64  # past this, a typo


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """`cfg` (1 or 2) CFG branches side by side, each over `sequence` ranks; `on_cpu`: the ranks are CPU
    processes (gloo, `--device cpu`), which the messages count as such rather than as GPUs."""

    cfg: int = 1
    sequence: int = 1
    on_cpu: bool = False

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise InputError(f"CFG-parallel runs 1 or 2 branches side by side, got {self.cfg}")
        if self.sequence < 1:
            raise InputError(f"the sequence-parallel degree must be at least 1, got {self.sequence}")

    @property
    def world_size(self) -> int:
        return self.cfg * self.sequence

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def branch_of(self, rank: int) -> int:
        """The CFG branch rank `rank` runs: 0 (conditional) or, with CFG-parallel, 1 (unconditional)."""
        return rank // self.sequence

    def sequence_rank_of(self, rank: int) -> int:
        """Which row block of its branch's generator tokens rank `rank` holds."""
        return rank % self.sequence

    @classmethod
    def for_ranks(cls, ranks: int, *, guidance: bool, cfg_parallel: str = "auto") -> ParallelLayout:
        """The layout of `ranks` processes: with guidance and `cfg_parallel` 'auto', CFG-parallel when the
        count is even; 'on' demands it, 'off' refuses it; every other factor goes to the sequence."""
        if cfg_parallel not in CFG_PARALLEL_CHOICES:
            raise InputError(f"--cfg-parallel must be one of {', '.join(CFG_PARALLEL_CHOICES)}, got {cfg_parallel!r}")
        if not 1 <= ranks <= MAX_GPUS:
            raise InputError(f"the process count must be 1 to {MAX_GPUS}, got {ranks}")
        if cfg_parallel == "on":
            if not guidance:
                raise InputError(
                    "--cfg-parallel on needs guidance > 1 (two branches to split); drop it or raise --guidance"
                )
            if ranks % 2:
                raise InputError(
                    f"--cfg-parallel on splits the two CFG branches over an even number of GPUs, got {ranks}; "
                    "use an even count or --cfg-parallel off"
                )
        split = guidance and ranks % 2 == 0 and cfg_parallel != "off"
        return cls(cfg=2 if split else 1, sequence=ranks // 2 if split else ranks)

    def check_model(self, *, heads: int, kv_heads: int) -> None:
        """Ulysses gives each rank heads/sequence query heads and kv_heads/sequence key/value heads."""
        if heads % self.sequence or kv_heads % self.sequence:
            raise InputError(
                f"sequence-parallel over {self.ranks(self.sequence)} splits the attention heads, but this model has "
                f"{heads} query and {kv_heads} key/value heads; use a degree that divides {kv_heads} "
                f"(at most {self.ranks(kv_heads)} per CFG branch)"
            )

    def check_tokens(self, tokens: int) -> None:
        """Each rank holds tokens/sequence of its branch's generator tokens."""
        if tokens % self.sequence:
            raise InputError(
                f"sequence-parallel over {self.ranks(self.sequence)} splits the {tokens} generator tokens of this "
                f"request into equal blocks, and {self.sequence} does not divide {tokens}; change --frames or the "
                "resolution, or use fewer"
            )

    def ranks(self, count: int) -> str:
        """`count` ranks as a message names them: '2 GPUs', 'one GPU', '2 CPU processes'."""
        unit = ("CPU process", "CPU processes") if self.on_cpu else ("GPU", "GPUs")
        return f"one {unit[0]}" if count == 1 else f"{count} {unit[1]}"

    def describe(self) -> str:
        if not self.parallel:
            return self.ranks(1)
        parts = (["CFG-parallel 2"] if self.cfg == 2 else []) + (
            [f"sequence-parallel {self.sequence} (Ulysses)"] if self.sequence > 1 else []
        )
        return f"{self.ranks(self.world_size)}: {' x '.join(parts)}"


SINGLE = ParallelLayout()
