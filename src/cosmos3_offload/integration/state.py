"""What `enable()` set up for a pipeline's calls, kept on the pipeline as `pipe.offload`."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..kernels.choice import Kernels
from ..offload.engine import OffloadEngine
from ..planning.plan import Plan
from ..stepcache.seacache import SeaCache
from .budget import BudgetPlan
from .fp8 import Fp8Linears


@dataclass
class LastCall:
    """What the pipeline's last call did: its step cache's decisions (None: it ran without one)."""

    step_cache: SeaCache | None = None


@dataclass(frozen=True)
class OffloadState:
    """What `enable()` set up: the plan, the engine that follows it, the kernels, the budget's plan if
    one was given, the FP8 linears if any, the modules it placed (a call refuses a pipeline whose
    modules were swapped since), and the step cache every call runs with (the CLI's --cache and
    --cache-threshold)."""

    plan: Plan
    engine: OffloadEngine
    kernels: Kernels
    budget: BudgetPlan | None
    fp8: Fp8Linears | None
    modules: tuple[nn.Module | None, ...]
    cache: str = "none"
    cache_threshold: float | None = None
    last_call: LastCall = field(default_factory=LastCall)

    def summary(self) -> str:
        """The plan (with its predictions, under a budget), the FP8 precisions and the step cache's decisions of
        the last call, and where every group's weights live."""
        plan = self.plan.describe() if self.budget is None else self.budget.describe()
        fp8 = "" if self.fp8 is None else f"fp8: {self.fp8.switches.describe()}\n"
        cache = self.last_call.step_cache
        step_cache = "" if cache is None else f"{cache.summary()}\n"
        return f"plan: {plan}\n{fp8}{step_cache}{self.engine.summary()}"
