"""The VRAM-budget planner: predict memory and time of candidate plans, pick the fastest that fits.

A pure function of the model's sizes, the request's shape, the budget and a device profile.
Candidates run from all resident to everything streamed, with MLP token chunks and decode tile
grids; the fastest whose predicted peak fits the usable share of the budget wins, ties going to
the plan that moves fewer bytes, then to the one that holds less memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import InputError
from ..units import GIB
from .memory import DECODE_FRAME_SLOWDOWN, Peaks, peaks
from .plan import GroupPlan, Mode, Plan
from .request import DeviceProfile, Request
from .sizes import ModelSizes
from .tiles import TileGrid
from .timing import Times, moved_bytes, times

MLP_CHUNKS = (None, 8192, 2048)
DECODE_GRIDS = tuple(
    TileGrid(rows=r, cols=c, frames=f)
    for r, c in ((1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 4), (4, 6), (6, 8))
    for f in DECODE_FRAME_SLOWDOWN
)
# Predicted times closer than this (relative) are equal: they differ by float rounding, not by plan.
TIME_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Prediction:
    peaks: Peaks
    times: Times

    @property
    def peak(self) -> int:
        return self.peaks.peak


def predict(plan: Plan, sizes: ModelSizes, request: Request, profile: DeviceProfile) -> Prediction:
    """Peak device bytes of each part of the request and the time of a step, the prefill and the decode."""
    return Prediction(peaks(plan, sizes, request), times(plan, sizes, request, profile))


def spread(layers: int, count: int) -> tuple[int, ...]:
    """`count` layer indexes spread evenly through `layers` (centers of equal bins), never a prefix."""
    return tuple(int((i + 0.5) * layers / count) for i in range(count)) if count else ()


def candidates(sizes: ModelSizes) -> list[Plan]:
    """Every plan the planner considers, from all resident to everything streamed."""
    plans = []
    for reasoner in Mode:
        for generator in (Mode.RESIDENT, Mode.STAGED):
            for vae in (Mode.RESIDENT, Mode.STAGED):
                plans.append(
                    Plan(reasoner=GroupPlan(mode=reasoner), generator=GroupPlan(mode=generator), vae=GroupPlan(mode=vae))
                )
    for reasoner in Mode:
        for count in range(sizes.layers):
            for ring in (2, 3):
                generator = GroupPlan(
                    mode=Mode.STREAMED, resident_layers=spread(sizes.layers, count), ring=ring, prefetch=ring - 1
                )
                plans.append(
                    Plan(reasoner=GroupPlan(mode=reasoner), generator=generator, vae=GroupPlan(mode=Mode.STAGED))
                )
    return [replace(p, mlp_chunk=c, decode_grid=g) for p in plans for c in MLP_CHUNKS for g in DECODE_GRIDS]


@dataclass(frozen=True)
class Choice:
    plan: Plan
    prediction: Prediction


def choose_plan(sizes: ModelSizes, request: Request, budget_bytes: int, profile: DeviceProfile) -> Choice:
    """The fastest predicted plan whose peak fits the budget; among equally fast ones the one that
    moves the fewest bytes, then the one with the lowest peak. An InputError with the least budget
    that works when nothing fits."""
    scored = [Choice(p, predict(p, sizes, request, profile)) for p in candidates(sizes)]
    usable = budget_bytes * profile.headroom
    fitting = [c for c in scored if c.prediction.peak <= usable]
    if not fitting:
        least = min(c.prediction.peak for c in scored) / profile.headroom
        raise InputError(
            f"nothing fits a {budget_bytes / GIB:.1f} GiB budget for this request; it needs at least "
            f"{math.ceil(least / GIB * 10) / 10:.1f} GiB (or fewer frames or a lower resolution)"
        )
    fastest = min(c.prediction.times.total for c in fitting)
    tied = [c for c in fitting if c.prediction.times.total <= fastest * (1 + TIME_TOLERANCE)]
    return min(tied, key=lambda c: (moved_bytes(c.plan, sizes, request), c.prediction.peak))


def least_budget(sizes: ModelSizes, request: Request, profile: DeviceProfile) -> int:
    """The smallest budget any candidate fits (bytes), headroom included."""
    return math.ceil(min(predict(p, sizes, request, profile).peak for p in candidates(sizes)) / profile.headroom)


def describe_choice(choice: Choice, budget_bytes: int) -> str:
    """The plan and its predictions, for `cosmos3-offload plan` and the run summary."""
    p, t = choice.prediction.peaks, choice.prediction.times
    return "\n".join(
        [
            f"plan for a {budget_bytes / GIB:.1f} GiB budget: {choice.plan.describe()}",
            "predicted peak: "
            + (f"encode {p.encode / GIB:.2f} GiB, " if p.encode else "")
            + f"prefill {p.prefill / GIB:.2f} GiB, denoise {p.denoise / GIB:.2f} GiB, decode {p.decode / GIB:.2f} GiB",
            f"predicted time: prefill {t.prefill:.2f} s, {t.step:.3f} s per step, decode {t.decode:.1f} s, "
            f"total {t.total:.1f} s",
        ]
    )
