"""Which denoising steps run W8A8 and which W8A16: the checkpoint's step policy, or a forced mode.

NVIDIA's FP8 checkpoints carry `quantization_config.runtime.diffusion_step_policy` in
`transformer/config.json` (schema 1, type `first_last_n`): the generator runs W8A16 for the first
and last few denoising steps and W8A8 ("native") in between; the reasoner runs the policy's
`reasoner` mode throughout. The fields and their checks follow diffusers 0.42.1's
`pipelines/cosmos/mixed_precision.py`, which fails closed on anything it does not know; so do we.
A one-step request runs W8A8 throughout (as diffusers and vLLM-Omni do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from .linear import Precision, PrecisionSwitch

FP8_MODES = ("auto", "policy", "w8a8", "w8a16")  # what --fp8-mode takes
_FIELDS = ("schema_version", "type", "index_space", "scope", "default_mode", "first_steps", "last_steps", "overlap")
_PRECISION_OF_MODE = {"a16": Precision.W8A16, "native": Precision.W8A8}


@dataclass(frozen=True, kw_only=True)
class StepPolicy:
    """W8A16 for the first `first_steps` and last `last_steps` steps (W8A8 between); where the two
    windows overlap, `overlap` decides. The reasoner runs `reasoner` at every step."""

    first_steps: int = 3
    last_steps: int = 3
    overlap: Precision = Precision.W8A16
    reasoner: Precision = Precision.W8A16

    def __post_init__(self):
        if self.first_steps < 0 or self.last_steps < 0:
            raise InputError(f"a step policy's windows are step counts >= 0, got {self.first_steps}, {self.last_steps}")

    def generator_precision(self, step: int, steps: int) -> Precision:
        """The generator's precision at denoising step `step` (0-based) of `steps`."""
        assert 0 <= step < steps, (step, steps)
        if steps == 1:
            return Precision.W8A8
        first, last = step < self.first_steps, step >= steps - self.last_steps
        if first and last:
            return self.overlap
        return Precision.W8A16 if first or last else Precision.W8A8


# A checkpoint without a policy (the distilled FP8 repos) runs W8A8 throughout, as diffusers does.
NATIVE = StepPolicy(first_steps=0, last_steps=0, overlap=Precision.W8A8, reasoner=Precision.W8A8)


@dataclass(frozen=True)
class Uniform:
    """One precision for every linear at every step (`--fp8-mode w8a8` or `w8a16`)."""

    precision: Precision

    @property
    def reasoner(self) -> Precision:
        return self.precision

    def generator_precision(self, step: int, steps: int) -> Precision:
        return self.precision


def parse_step_policy(policy: Any) -> StepPolicy:
    """A validated `diffusion_step_policy` mapping; anything we would run differently is an InputError."""
    where = "transformer/config.json's quantization_config.runtime.diffusion_step_policy"
    if not isinstance(policy, dict):
        raise InputError(f"{where} must be a mapping, got {type(policy).__name__}")
    missing = [name for name in (*_FIELDS, "reasoner") if name not in policy]
    if missing:
        raise InputError(f"{where} lacks {', '.join(missing)}")
    expected = {
        "schema_version": 1,
        "type": "first_last_n",
        "index_space": "denoising_loop_iteration",
        "default_mode": "native",
    }
    for name, value in expected.items():
        if policy[name] != value:
            raise InputError(f"{where} has {name} {policy[name]!r}; this version runs only {value!r}")
    if policy["scope"] != ["transformer"]:
        raise InputError(f"{where} has scope {policy['scope']!r}; this version runs only ['transformer']")
    return StepPolicy(
        first_steps=_window(policy["first_steps"], f"{where}.first_steps"),
        last_steps=_window(policy["last_steps"], f"{where}.last_steps"),
        overlap=_precision(policy["overlap"], f"{where}.overlap"),
        reasoner=_precision(policy["reasoner"], f"{where}.reasoner"),
    )


def step_schedule(mode: str, policy: StepPolicy | None, *, fp8_cores: bool) -> StepPolicy | Uniform:
    """What `--fp8-mode` means here. `auto`: the checkpoint's policy where the device has FP8 tensor
    cores, W8A16 throughout elsewhere (emulated W8A8 would be slower and less exact); `policy`: the
    checkpoint's policy anywhere (W8A8 emulated without FP8 cores); `w8a8`/`w8a16`: forced."""
    if mode not in FP8_MODES:
        raise InputError(f"unknown FP8 mode {mode!r}; choose from {' '.join(FP8_MODES)}")
    if mode == "w8a8":
        return Uniform(Precision.W8A8)
    if mode == "w8a16" or (mode == "auto" and not fp8_cores):
        return Uniform(Precision.W8A16)
    return NATIVE if policy is None else policy


def _window(spec: Any, where: str) -> int:
    if not isinstance(spec, dict) or spec.get("mode") not in _PRECISION_OF_MODE:
        raise InputError(f"{where} must be a mapping with a count and a mode of 'a16' or 'native', got {spec!r}")
    count = spec.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise InputError(f"{where}.count must be an integer >= 0, got {count!r}")
    return count if spec["mode"] == "a16" else 0


def _precision(mode: Any, where: str) -> Precision:
    if mode not in _PRECISION_OF_MODE:
        raise InputError(f"{where} must be 'a16' or 'native', got {mode!r}")
    return _PRECISION_OF_MODE[mode]


@dataclass
class TowerSwitches:
    """The precision switches of the two towers' FP8 linears, set as a request goes."""

    reasoner: PrecisionSwitch = field(default_factory=PrecisionSwitch)
    generator: PrecisionSwitch = field(default_factory=PrecisionSwitch)
    trace: list[Precision] = field(default_factory=list)  # the generator's precision at each step of a request

    def before_prefill(self, schedule: StepPolicy | Uniform) -> None:
        """Start a request: the reasoner's precision for its prefill, and a fresh trace."""
        self.reasoner.precision = schedule.reasoner
        self.trace = []

    def before_step(self, schedule: StepPolicy | Uniform, step: int, steps: int) -> Precision:
        """Set the generator's precision for denoising step `step` of `steps`; returns it."""
        self.generator.precision = schedule.generator_precision(step, steps)
        self.trace.append(self.generator.precision)
        return self.generator.precision

    def describe(self) -> str:
        """The last request's precisions, e.g. `reasoner W8A16; generator W8A16 x6, W8A8 x29`."""
        counts = {p: self.trace.count(p) for p in dict.fromkeys(self.trace)}
        steps = ", ".join(f"{p.value} x{n}" for p, n in counts.items())
        return f"reasoner {self.reasoner.precision.value}; generator {steps or 'no steps'}"
