"""The budget planner: predict memory and time of candidate plans, pick the fastest that fits.

A pure function of the model's sizes, the request's shape, the budgets (device, and optionally
host) and a device profile. Candidates run from all resident to everything streamed (with a
checkpoint, the reasoner also mapped from its files), with MLP token chunks and decode tile grids;
the fastest whose predicted device peak fits the usable share of the device budget, and whose
pinned + private host memory fits the usable share of the host budget, wins, ties going to the plan
that moves fewer bytes, then to the one that holds less memory. A request with exact previews
(`Request.preview_frames`) decodes while the generator runs, so its plans keep the VAE resident.

A parallel request (`Request.parallel`) is planned per GPU: every GPU places its own copy of the
weights by the same plan, the budget is each GPU's, and the predicted memory and times are one
GPU's (host memory is one host's: the GPUs share its slabs).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from ..errors import InputError
from ..units import GIB, format_budget
from .memory import DECODE_FRAME_SLOWDOWN, HostMemory, Peaks, host_memory, peaks
from .parallel import SINGLE, ParallelLayout
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
    host: HostMemory

    @property
    def peak(self) -> int:
        return self.peaks.peak


def predict(
    plan: Plan, sizes: ModelSizes, request: Request, profile: DeviceProfile, search: dict | None = None
) -> Prediction:
    """Peak device bytes of each part of the request, the time of a step, the prefill and the decode,
    and the host memory of the weights (per GPU, and per host, for a parallel request). `search`: see
    timing.times (the planner's parts shared by its candidates)."""
    request.parallel.check_model(heads=sizes.heads, kv_heads=sizes.kv_heads)
    return Prediction(
        peaks(plan, sizes, request, search), times(plan, sizes, request, profile, search), host_memory(plan, sizes)
    )


def spread(layers: int, count: int) -> tuple[int, ...]:
    """`count` layer indexes spread evenly through `layers` (centers of equal bins), never a prefix."""
    return tuple(int((i + 0.5) * layers / count) for i in range(count)) if count else ()


def candidates(sizes: ModelSizes, *, mapped: bool = False, keep_vae: bool = False) -> list[Plan]:
    """Every plan the planner considers, from all resident to everything streamed; with `mapped`
    (there is a checkpoint to map), the reasoner mapped from its files too; with `keep_vae` (exact
    previews decode during the denoise) only plans whose VAE is resident."""
    reasoners = [Mode.RESIDENT, Mode.STAGED, Mode.STREAMED] + ([Mode.MAPPED] if mapped else [])
    vaes = (Mode.RESIDENT,) if keep_vae else (Mode.RESIDENT, Mode.STAGED)
    streamed_vae = Mode.RESIDENT if keep_vae else Mode.STAGED  # a streamed generator is for the least memory
    plans = []
    for reasoner in reasoners:
        for generator in (Mode.RESIDENT, Mode.STAGED):
            for vae in vaes:
                plans.append(
                    Plan(
                        reasoner=GroupPlan(mode=reasoner), generator=GroupPlan(mode=generator), vae=GroupPlan(mode=vae)
                    )
                )
    for reasoner in reasoners:
        for count in range(sizes.layers):
            for ring in (2, 3):
                generator = GroupPlan(
                    mode=Mode.STREAMED, resident_layers=spread(sizes.layers, count), ring=ring, prefetch=ring - 1
                )
                plans.append(
                    Plan(reasoner=GroupPlan(mode=reasoner), generator=generator, vae=GroupPlan(mode=streamed_vae))
                )
    return [replace(p, mlp_chunk=c, decode_grid=g) for p in plans for c in MLP_CHUNKS for g in DECODE_GRIDS]


@dataclass(frozen=True)
class Choice:
    plan: Plan
    prediction: Prediction
    layout: ParallelLayout = SINGLE  # the request's GPUs: the plan is each one's, the prediction one's


def choose_plan(
    sizes: ModelSizes,
    request: Request,
    budget_bytes: int,
    profile: DeviceProfile,
    *,
    host_budget: int | None = None,
    mapped: bool = False,
) -> Choice:
    """The fastest predicted plan whose peak fits the budget (and whose pinned + private host memory
    fits `host_budget`, when given); among equally fast ones the one that moves the fewest bytes,
    then the one with the lowest peak. `mapped`: a checkpoint exists, so the reasoner may be mapped
    from its files. An InputError with the least budget that works when nothing fits. With a parallel
    request the budget is each GPU's and every GPU follows the plan."""
    layout = request.parallel
    with _collector_paused():
        plans = candidates(sizes, mapped=mapped, keep_vae=request.preview_frames > 0)
        search: dict = {}  # parts the candidates share, for this search only (see timing.times)
        scored = [Choice(p, predict(p, sizes, request, profile, search), layout) for p in plans]
    usable = budget_bytes * profile.headroom
    fitting = [c for c in scored if c.prediction.peak <= usable]
    if not fitting:
        least = min(c.prediction.peak for c in scored) / profile.headroom
        per_gpu = f" per GPU over {layout.describe()}" if layout.parallel else ""
        previews = ", or fast previews instead of exact ones" if request.preview_frames else ""
        raise InputError(
            f"nothing fits a {format_budget(budget_bytes)} budget{per_gpu} for this request; it needs at least "
            f"{_gib_up(least)} GiB (or fewer frames or a lower resolution{previews})"
        )
    if host_budget is not None:
        fitting = _fitting_host(fitting, host_budget, profile, mapped=mapped)
    fastest = min(c.prediction.times.total for c in fitting)
    tied = [c for c in fitting if c.prediction.times.total <= fastest * (1 + TIME_TOLERANCE)]
    return min(tied, key=lambda c: (moved_bytes(c.plan, sizes, request), c.prediction.peak))


def _fitting_host(fitting: list[Choice], host_budget: int, profile: DeviceProfile, *, mapped: bool) -> list[Choice]:
    """The choices whose held host memory fits the usable share of `host_budget`; an InputError with
    the least host budget that works beside the device budget when none does."""
    usable = host_budget * profile.headroom
    within = [c for c in fitting if c.prediction.host.held <= usable]
    if within:
        return within
    least = min(c.prediction.host.held for c in fitting) / profile.headroom
    hint = "" if mapped else "; with --checkpoint the reasoner can be mapped from its files, which needs less"
    raise InputError(
        f"no plan that fits the device budget fits a {format_budget(host_budget)} host budget; it needs at least "
        f"{_gib_up(least)} GiB of host memory (or a larger device budget){hint}"
    )


def _gib_up(nbytes: float) -> str:
    """Bytes in GiB rounded up to a tenth, as a user would pass them back."""
    return f"{math.ceil(nbytes / GIB * 10) / 10:.1f}"


def least_budget(sizes: ModelSizes, request: Request, profile: DeviceProfile) -> int:
    """The smallest budget any candidate fits (bytes), headroom included."""
    with _collector_paused():
        plans = candidates(sizes, keep_vae=request.preview_frames > 0)
        search: dict = {}
        least = min(predict(p, sizes, request, profile, search).peak for p in plans)
    return math.ceil(least / profile.headroom)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the body. A search makes some 100k short-lived objects, none in
    a cycle; with torch loaded the collector would scan its ~400k objects several times over for nothing to
    collect, most of the search's time (0.6 s of a Nano search against 0.2 s without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def describe_choice(choice: Choice, budget_bytes: int, host_budget: int | None = None) -> str:
    """The plan and its predictions, for `cosmos3-offload plan` and the run summary; with several GPUs
    the layout first, and the budget, memory and times are each GPU's."""
    p, t, h = choice.prediction.peaks, choice.prediction.times, choice.prediction.host
    host = "" if host_budget is None else f" and a {format_budget(host_budget)} host budget"
    layout = choice.layout
    per_gpu = " per GPU" if layout.parallel else ""
    parallel = (
        f"parallel: {layout.describe()}; every GPU follows the plan; "
        "device memory and times are per GPU, host memory per host"
    )
    return "\n".join(
        ([parallel] if layout.parallel else [])
        + [
            f"plan for a {format_budget(budget_bytes)} budget{per_gpu}{host}: {choice.plan.describe()}",
            "predicted peak: "
            + (f"encode {p.encode / GIB:.2f} GiB, " if p.encode else "")
            + f"prefill {p.prefill / GIB:.2f} GiB, denoise {p.denoise / GIB:.2f} GiB, decode {p.decode / GIB:.2f} GiB",
            f"predicted time: prefill {t.prefill:.2f} s, {t.step:.3f} s per step, decode {t.decode:.1f} s, "
            f"total {t.total:.1f} s",
            f"host memory for weights: pinned {h.pinned / GIB:.2f} GiB, page cache {h.page_cache / GIB:.2f} GiB, "
            f"private {h.private / GIB:.2f} GiB",
        ]
    )
