"""Registry of exact attention implementations, each honouring `AttentionFn`'s contract.

q: [q_tokens, heads, head_dim], k/v: [kv_tokens, kv_heads, head_dim] (GQA) -> [q_tokens, heads, head_dim].
`causal` aligns the diagonal at the top left (SDPA's `is_causal`): query i sees keys 0..i.

- "sdpa": torch's scaled_dot_product_attention, torch picking the kernel; the same call, on the
  same [1, heads, tokens, head_dim] views, as diffusers' default ("native") backend makes.
- "cudnn", "flash", "efficient", "math": that call restricted to one SDPA kernel (torch raises
  when that kernel cannot take the inputs; the probe then drops it).
- "flash-attn-4": `flash_attn.cute.flash_attn_func` of the `flash-attn-4` package (CuTe DSL,
  Hopper and Blackwell; GQA native). Its causal mask is aligned at the bottom right, which equals
  the top left only when q_tokens == kv_tokens: the only causal attention we run (the prefill).

Which of them is fastest (and exact) on a GPU is measured by `probe.py`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import InputError, first_line
from .choice import AttentionFn

HALF = frozenset({torch.float16, torch.bfloat16})
ANY_FLOAT = HALF | {torch.float32, torch.float64}
FLASH_ATTN_4_MODULE = "flash_attn.cute"
FLASH_ATTN_4_PACKAGE = "flash-attn-4"
ANY_CAPABILITY = ((0, 0), (99, 99))


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, backend: SDPBackend | None = None
) -> torch.Tensor:
    """SDPA with GQA, on any kernel torch allows (`backend` None) or on that one kernel only."""
    # [1, heads, tokens, head_dim] views of the [tokens, heads, head_dim] inputs, as diffusers passes them
    q4, k4, v4 = (x.unsqueeze(0).permute(0, 2, 1, 3) for x in (q, k, v))
    with nullcontext() if backend is None else sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, enable_gqa=True)
    return out.permute(0, 2, 1, 3).squeeze(0)  # [q_tokens, heads, head_dim]


def flash_attn_4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """flash-attn-4's forward; [1, tokens, heads, head_dim] is its own layout, so no copies."""
    assert not causal or q.shape[0] == k.shape[0], (
        "flash-attn-4 aligns a causal mask at the bottom right: it equals SDPA's only when q_tokens == kv_tokens"
    )
    out, _ = _flash_attn_4_func()(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal=causal)  # (out, lse)
    return out.squeeze(0)  # [q_tokens, heads, head_dim]


@functools.cache
def _flash_attn_4_func() -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    return importlib.import_module(FLASH_ATTN_4_MODULE).flash_attn_func


@functools.cache
def flash_attn_4_problem() -> str | None:
    """Why `flash_attn.cute` cannot be imported here (None: it can). Imported once per process."""
    try:
        importlib.import_module(FLASH_ATTN_4_MODULE)
    except Exception as error:  # a missing package, or one of its native libraries failing to load
        return f"{type(error).__name__}: {first_line(error)}"
    return None


def flash_attn_4_version() -> str | None:
    """The installed flash-attn-4 version, None when it is not installed or cannot be imported."""
    if flash_attn_4_problem() is not None:
        return None
    try:
        return importlib.metadata.version(FLASH_ATTN_4_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """One attention implementation: how to call it and where it can run.

    dtypes: what it computes in; cpu: whether it runs on the CPU too; capabilities: the lowest and
    highest CUDA compute capability it supports; built: whether this torch build has its kernel;
    module_problem: why the package it needs cannot be imported (None: it can).
    """

    name: str
    run: AttentionFn
    dtypes: frozenset[torch.dtype]
    cpu: bool = False
    capabilities: tuple[tuple[int, int], tuple[int, int]] = ANY_CAPABILITY
    built: Callable[[], bool] = lambda: True
    module_problem: Callable[[], str | None] = lambda: None
    # Materializes the [heads, q_tokens, kv_tokens] scores: timed at a smaller shape by the probe.
    quadratic_memory: bool = False

    def __post_init__(self) -> None:
        assert self.dtypes and self.capabilities[0] <= self.capabilities[1], self.name

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this implementation cannot run on `device` in `dtype`, in a phrase; None when it can."""
        if dtype not in self.dtypes:
            names = "/".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            return f"it runs in {names} only, not {str(dtype).removeprefix('torch.')}"
        if device.type != "cuda":
            return None if self.cpu else f"it runs on CUDA GPUs only and this run is on {device.type}"
        if not self.built():
            return f"this torch build ({torch.__version__}) was compiled without it"
        capability = torch.cuda.get_device_capability(device)
        low, high = self.capabilities
        if not low <= capability <= high:
            return (
                f"it needs a GPU of compute capability {_version(low)} to {_version(high)} "
                f"and {torch.cuda.get_device_name(device)} is {_version(capability)}"
            )
        return self.module_problem()


def _version(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def _missing_package(module: str, package: str, problem: str | None) -> str | None:
    return None if problem is None else f"{module} cannot be imported ({problem}); install it: pip install {package}"


def _cudnn_built() -> bool:
    return torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000


_SM80_TO_SM121 = ((8, 0), (12, 1))  # SDPA's flash and cuDNN kernels (torch's sdp_utils.cpp)

ATTENTION_BACKENDS: dict[str, AttentionSpec] = {
    spec.name: spec
    for spec in (
        AttentionSpec(name="sdpa", run=sdpa_attention, dtypes=ANY_FLOAT, cpu=True),
        AttentionSpec(
            name="cudnn",
            run=functools.partial(sdpa_attention, backend=SDPBackend.CUDNN_ATTENTION),
            dtypes=HALF,
            capabilities=_SM80_TO_SM121,
            built=_cudnn_built,
        ),
        AttentionSpec(
            name="flash",
            run=functools.partial(sdpa_attention, backend=SDPBackend.FLASH_ATTENTION),
            dtypes=HALF,
            capabilities=_SM80_TO_SM121,
            built=torch.backends.cuda.is_flash_attention_available,
        ),
        AttentionSpec(
            name="efficient",
            run=functools.partial(sdpa_attention, backend=SDPBackend.EFFICIENT_ATTENTION),
            dtypes=ANY_FLOAT - {torch.float64},
            capabilities=((5, 0), (12, 1)),
        ),
        AttentionSpec(
            name="math",
            run=functools.partial(sdpa_attention, backend=SDPBackend.MATH),
            dtypes=ANY_FLOAT,
            cpu=True,
            quadratic_memory=True,
        ),
        AttentionSpec(
            name="flash-attn-4",
            run=flash_attn_4_attention,
            dtypes=HALF,
            capabilities=((9, 0), (12, 9)),  # Hopper and Blackwell, as its README says
            module_problem=lambda: _missing_package(FLASH_ATTN_4_MODULE, FLASH_ATTN_4_PACKAGE, flash_attn_4_problem()),
        ),
    )
}
REFERENCE = "math"  # upcasts half inputs to float32 and rounds only its result: the yardstick of exactness


def attention_spec(name: str) -> AttentionSpec:
    """The registered implementation called `name`; an unknown name raises InputError listing them."""
    if name not in ATTENTION_BACKENDS:
        raise InputError(f"unknown attention {name!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]


def available_attention(name: str, device: torch.device, dtype: torch.dtype) -> AttentionSpec:
    """`attention_spec(name)`, checked to run on `device` in `dtype` (else InputError saying why)."""
    spec = attention_spec(name)
    reason = spec.unavailable_reason(device, dtype)
    if reason is not None:
        raise InputError(f"attention {name!r} cannot run here: {reason}; pick another with --attention, or auto")
    return spec
