"""What the planner plans for: the request's shape, the device's rates and the memory budget."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import InputError
from ..model.geometry import generator_tokens
from ..units import GIB, KIB, MIB, PIB, TIB
from .parallel import SINGLE, ParallelLayout


@dataclass(frozen=True, kw_only=True)
class Request:
    """The shape of one generation: latent tokens per branch, prompt tokens, branches, video size, and
    how it spreads over GPUs (`parallel`; `branches` stays the request's total, see `rank_branches`)."""

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
    # Latent frames an exact preview decodes, one at a time, after denoising steps (0: none, or fast previews
    # only): the VAE then stays on the device and one decode's working set joins the denoise.
    preview_frames: int = 0
    parallel: ParallelLayout = SINGLE

    def __post_init__(self) -> None:
        for name in ("tokens", "prompt_tokens", "branches", "frames", "height", "width", "steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("encode_frames", "sound_samples", "cached_hiddens", "preview_frames"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.parallel, ParallelLayout):
            raise InputError(f"parallel must be a ParallelLayout (planning/parallel.py), got {self.parallel!r}")
        if self.parallel.cfg == 2 and self.branches != 2:
            raise InputError(
                f"CFG-parallel runs the two CFG branches side by side, but this request has {self.branches}; "
                "use guidance > 1 or --cfg-parallel off"
            )
        self.parallel.check_tokens(self.tokens)

    @property
    def rank_branches(self) -> int:
        """CFG branches each GPU runs: all of them, or one each with CFG-parallel."""
        return self.branches // self.parallel.cfg

    @property
    def rank_tokens(self) -> int:
        """Generator tokens each GPU holds for its per-token work (norms, projections, MLP)."""
        return self.tokens // self.parallel.sequence

    @classmethod
    def for_video(
        cls,
        frames: int,
        height: int,
        width: int,
        *,
        guidance: bool = True,
        steps: int = 35,
        action_tokens: int = 0,
        **kw,
    ) -> Request:
        """A video of `frames` x `height` x `width` (and `action_tokens` more tokens: an action run's chunk)."""
        return cls(
            tokens=generator_tokens(frames, height, width) + action_tokens,
            branches=2 if guidance else 1,  # with guidance: the conditional and the unconditional branch
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
    # Per-GPU all-to-all bandwidth between the GPUs of a multi-GPU run, one direction. 300 stands for
    # H100/H200 NVLink and is an assumption until measured; GPUs that talk over PCIe get about 25.
    interconnect_GBps: float = 300.0
    # Host memory read bandwidth shared by every GPU of one host (they all read the same host slabs):
    # each of n GPUs copying at once gets min(h2d_GBps, host_read_GBps / n). A typical two-socket
    # server's order of magnitude, not measured here.
    host_read_GBps: float = 200.0
    headroom: float = 0.9  # share of a budget (device or host) a plan may fill (allocator rounding and fragmentation)
    source: str = "built-in H200 rates (2026-11-26)"

    def __post_init__(self) -> None:
        rates = (
            "h2d_GBps",
            "linear_TFLOPs",
            "attention_TFLOPs",
            "host_copy_GBps",
            "interconnect_GBps",
            "host_read_GBps",
        )
        for name in rates:
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= MAX_RATE):
                raise InputError(
                    f"{name} must be a finite number in (0, {MAX_RATE:g}], got {value}; e.g. --h2d-gbps 25"
                )
        if not 0 < self.headroom <= 1:
            raise InputError(f"headroom must be in (0, 1], got {self.headroom}")


MAX_RATE = 1e6  # GB/s or TFLOP/s: far above any device, low enough that the arithmetic stays finite
MAX_BUDGET = PIB  # a budget past this is a typo
# Budget units, as the user may write them (any case); a plain number is GiB.
BUDGET_UNITS = {
    "": GIB, "b": 1,
    "k": KIB, "kib": KIB, "kb": 10**3,
    "m": MIB, "mib": MIB, "mb": 10**6,
    "g": GIB, "gib": GIB, "gb": 10**9,
    "t": TIB, "tib": TIB, "tb": 10**12,
    "p": PIB, "pib": PIB, "pb": 10**15,
}  # fmt: skip
_BUDGET_TEXT = re.compile(r"\s*([-+]?[\d.]+(?:e[-+]?\d+)?|[-+]?(?:nan|inf))\s*([a-z]*)\s*")
BUDGET_FORMS = "a number and one of B, KiB, MiB, GiB, TiB, PiB (KB to PB are powers of 1000; no unit is GiB)"


def parse_budget(text: str) -> int:
    """'8GiB', '8G', '7.5GB', '8192MiB', '1PiB' or a plain number of GiB -> bytes (1 MiB to 1 PiB)."""
    match = _BUDGET_TEXT.fullmatch(text.lower())
    try:
        amount = float(match.group(1)) if match else math.nan
    except ValueError:
        amount = math.nan
    if match is None or match.group(2) not in BUDGET_UNITS or not math.isfinite(amount):
        raise InputError(f"cannot read the budget {text!r}; write it like 8GiB or 7500MiB: {BUDGET_FORMS}")
    nbytes = amount * BUDGET_UNITS[match.group(2)]
    if not MIB <= nbytes <= MAX_BUDGET:
        raise InputError(f"the budget {text!r} is out of range; give between 1 MiB and 1 PiB")
    return int(nbytes)
