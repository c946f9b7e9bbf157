"""What `enable()` set up for a pipeline's calls, kept on the pipeline as `pipe.offload`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..kernels.choice import Kernels
from ..offload.engine import OffloadEngine
from ..planning.plan import Plan
from .budget import BudgetPlan
from .fp8 import Fp8Linears


@dataclass(frozen=True)
class OffloadState:
    """What `enable()` set up: the plan, the engine that follows it, the kernels, the budget's plan if
    one was given, the FP8 linears if any, and the modules it placed (a call refuses a pipeline whose
    modules were swapped since)."""

    plan: Plan
    engine: OffloadEngine
    kernels: Kernels
    budget: BudgetPlan | None
    fp8: Fp8Linears | None
    modules: tuple[nn.Module | None, ...]

    def summary(self) -> str:
        """The plan (with its predictions, under a budget), the FP8 precisions of the last call, and where every
        group's weights live."""
        plan = self.plan.describe() if self.budget is None else self.budget.describe()
        fp8 = "" if self.fp8 is None else f"fp8: {self.fp8.switches.describe()}\n"
        return f"plan: {plan}\n{fp8}{self.engine.summary()}"
