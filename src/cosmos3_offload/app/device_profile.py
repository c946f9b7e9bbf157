"""The planner's `DeviceProfile` and the run's attention, for the device at hand.

On a GPU the compute rates are measured there (kernels/probe.py: a bf16 GEMM at the model's MLP
shape and every exact attention implementation at its head layout, cached per GPU), the attention
rate being that of the implementation the run will use; the host-to-device bandwidth is measured
unless given. On a CPU the built-in rates stand. The profile's `source` says which, for `plan`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..kernels.choice import Kernels
from ..kernels.probe import (
    DIFFUSERS,
    KernelRates,
    ProbeShape,
    check_attention_choice,
    choose_attention,
    kernel_rates,
)
from ..offload.streams import measure_h2d_GBps
from ..planning.request import DeviceProfile, Request

BUILT_IN = DeviceProfile()
SDPA = "sdpa"  # the kernel diffusers' default ("native") dispatcher backend runs
# The probe's timed queries and GEMM rows at most: a longer request is timed there (keeping its prompt's
# keys), so the probe stays a few seconds (each call grows with the square of the tokens).
MAX_PROBE_TOKENS = 65536
KEY_TILE = 64  # the smallest key tile of the attention kernels we run (cuDNN's on Hopper: 64 x 128)


def probe_shape(transformer_config: Mapping[str, Any], request: Request | None = None) -> ProbeShape:
    """The probe's layout for a Cosmos3 transformer config: its attention heads and its MLP's up projection;
    with a `request`, timed at that request's attention (its generator tokens against those and the
    prompt's: the shape each generator layer runs; one key more where that count would fill whole
    tiles) and its GEMM rows, each at most `MAX_PROBE_TOKENS`, so the planner's rates are the step's."""
    shape = ProbeShape(
        heads=transformer_config["num_attention_heads"],
        kv_heads=transformer_config["num_key_value_heads"],
        head_dim=transformer_config["head_dim"],
        gemm_in=transformer_config["hidden_size"],
        gemm_out=transformer_config["intermediate_size"],
    )
    if request is None:
        return shape
    queries = min(request.tokens, MAX_PROBE_TOKENS)
    keys = queries + request.prompt_tokens
    if keys % KEY_TILE == 0:  # a real prompt almost never fills the kernels' last key tile, so neither does the probe
        keys += 1
    return dataclasses.replace(
        shape, queries=queries, keys=keys, gemm_tokens=min(request.rank_tokens, MAX_PROBE_TOKENS)
    )


@dataclass(frozen=True, kw_only=True)
class DeviceSetup:
    """What a run learns about its device before it loads anything."""

    kernels: Kernels  # the attention to run (fused: False; set it with dataclasses.replace)
    profile: DeviceProfile
    rates: KernelRates | None  # None on a CPU


def device_setup(
    device: torch.device,
    *,
    attention: str,
    shape: ProbeShape,
    dtype: torch.dtype,
    h2d_GBps: float | None = None,
    folder: Path | None = None,
) -> DeviceSetup:
    """Probe `device` (from the cache after the first run), choose the attention (`auto`, `diffusers`
    or a registered name) and build the planner's profile from the rates of that choice. Blocks
    the host for the probe and the host-to-device copies; nothing runs on a CPU."""
    check_attention_choice(attention)
    rates = kernel_rates(device, shape, folder=folder)
    kernels = choose_attention(device, attention, dtype=dtype, rates=rates)
    profile = device_profile(device, rates=rates, attention=kernels.attention_name, h2d_GBps=h2d_GBps)
    return DeviceSetup(kernels=kernels, profile=profile, rates=rates)


def device_profile(
    device: torch.device, *, rates: KernelRates | None, attention: str, h2d_GBps: float | None = None
) -> DeviceProfile:
    """The profile of `device`: measured `rates` (None: the built-in ones) with the rate of the
    attention implementation called `attention`, and `h2d_GBps` (None: measured, on a GPU)."""
    measured = None if h2d_GBps is not None else measure_h2d_GBps(device)
    if h2d_GBps is not None:
        h2d, copies = h2d_GBps, "host-to-device given"
    elif measured is not None:
        h2d, copies = measured, "host-to-device measured now"
    else:
        h2d, copies = BUILT_IN.h2d_GBps, "host-to-device built-in"
    if rates is None:
        return DeviceProfile(h2d_GBps=h2d, source=f"{BUILT_IN.source}: no GPU here to measure; {copies}")
    name = SDPA if attention == DIFFUSERS else attention
    attention_rate = rates.measured.attention_TFLOPs.get(name)
    if attention_rate is None:  # only diffusers' SDPA can be in use unmeasured: choose_attention refuses the rest
        attention_rate, how = BUILT_IN.attention_TFLOPs, f"attention {attention} built-in {BUILT_IN.attention_TFLOPs:g}"
    else:
        how = f"attention {attention} {attention_rate:.0f}"
    linear = rates.measured.linear_TFLOPs
    return DeviceProfile(
        h2d_GBps=h2d,
        linear_TFLOPs=linear,
        attention_TFLOPs=attention_rate,
        source=f"{_provenance(rates)}: linear {linear:.0f}, {how} TFLOP/s; {copies}",
    )


def _provenance(rates: KernelRates) -> str:
    """'NVIDIA H200 (compute 9.0), measured now, saved to PATH' and the like."""
    major, minor = rates.key.capability
    gpu = f"{rates.key.gpu} (compute {major}.{minor})"
    if rates.from_cache:
        return f"{gpu}, measured {rates.date}, read from {rates.cache_path}"
    if rates.cache_path is None:
        return f"{gpu}, measured now (not cached: the cache could not be written, see the warning)"
    return f"{gpu}, measured now, saved to {rates.cache_path}"
