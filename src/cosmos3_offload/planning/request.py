"""What the planner plans for: the request's shape, the device's rates and the memory budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError
from ..model.geometry import generator_tokens
from ..units import GIB, MIB


@dataclass(frozen=True, kw_only=True)
class Request:
    """The shape of one generation: latent tokens per branch, prompt tokens, branches, video size."""

    tokens: int
    prompt_tokens: int = 512
    branches: int = 2
    frames: int = 189
    height: int = 720
    width: int = 1280
    steps: int = 35
    encode_frames: int = 0  # pixel frames the VAE encodes for conditioning (0: text to video)
    sound_samples: int = 0  # audio samples per channel the sound decoder writes (0: no sound)
    # [tokens, hidden] tensors a step cache keeps per branch while the decoder stack runs (0: no cache)
    cached_hiddens: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "prompt_tokens", "branches", "frames", "height", "width", "steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("encode_frames", "sound_samples", "cached_hiddens"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def for_video(cls, frames: int, height: int, width: int, *, cfg: bool = True, steps: int = 35, **kw) -> Request:
        return cls(
            tokens=generator_tokens(frames, height, width),
            branches=2 if cfg else 1,
            frames=frames,
            height=height,
            width=width,
            steps=steps,
            **kw,
        )


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """Rates of the target GPU. Defaults: measured on an H200 (2026-11-26); an H100 PCIe is close on H2D.
    `source` says where the rates came from (app/device_profile.py measures them on the GPU at hand)."""

    h2d_GBps: float = 55.0
    linear_TFLOPs: float = 450.0
    attention_TFLOPs: float = 570.0
    # One host thread's memcpy from cached file pages into a pinned buffer (a mapped layer's first
    # hop); a typical server core, not measured here.
    host_copy_GBps: float = 8.0
    headroom: float = 0.9  # share of a budget (device or host) a plan may fill (allocator rounding and fragmentation)
    source: str = "built-in H200 rates (2026-11-26)"

    def __post_init__(self) -> None:
        for name in ("h2d_GBps", "linear_TFLOPs", "attention_TFLOPs", "host_copy_GBps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= MAX_RATE):
                raise InputError(
                    f"{name} must be a finite number in (0, {MAX_RATE:g}], got {value}; e.g. --h2d-gbps 25"
                )
        if not 0 < self.headroom <= 1:
            raise InputError(f"headroom must be in (0, 1], got {self.headroom}")


MAX_RATE = 1e6  # GB/s or TFLOP/s: far above any device, low enough that the arithmetic stays finite
MAX_BUDGET = 1 << 50  # 1 PiB: a budget past this is a typo
_BUDGET_UNITS = {"gib": GIB, "gb": 10**9, "g": GIB, "mib": MIB, "mb": 10**6, "m": MIB, "": GIB}


def parse_budget(text: str) -> int:
    """'8GiB', '8G', '7.5GB', '8192MiB' or a plain number of GiB -> bytes (at least 1 MiB)."""
    value = text.strip().lower()
    number = value.rstrip("gibm")
    unit = value[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        amount = math.nan
    if unit not in _BUDGET_UNITS or not math.isfinite(amount):
        raise InputError(f"cannot read the budget {text!r}; write it like 8GiB or 7500MiB")
    nbytes = amount * _BUDGET_UNITS[unit]
    if not MIB <= nbytes <= MAX_BUDGET:
        raise InputError(f"the budget {text!r} is out of range; give between 1MiB and {MAX_BUDGET // GIB}GiB")
    return int(nbytes)
