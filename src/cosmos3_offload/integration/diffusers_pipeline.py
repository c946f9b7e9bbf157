"""`cosmos3_offload.enable(pipe, vram_budget="8GiB")`: our split and placement inside a diffusers pipeline.

For diffusers users: load `Cosmos3OmniPipeline` as usual, call `enable` once, then call the pipeline
as before. Its `__call__` then runs the reasoner once per prompt (prefill) and the denoising loop on
the generator alone (denoise), with each group of weights where a plan puts it, and returns what the
unpatched pipeline returns for the same arguments (see integration/generation.py for the two
differences in form: frames rounded to 8 bits, and "np"/"pt" videos on the host).

The pipeline's own modules become the placed ones (see pipeline_weights.py): no second copy of the
weights stays in memory, the old tensors are freed as they are copied, and weights generation never
reads (lm_head, the sound tokenizer's encoder) are released; the action heads, when the transformer
has them, are placed with the generator, so `pipe(..., action=CosmosActionCondition(...))` runs the
action modes too. The weights keep the dtypes the pipeline was loaded with. `enable` is one-way: to place
a pipeline differently, load it again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from diffusers import Cosmos3OmniPipeline
from torch import nn

from ..app.config import KernelOptions, resolve_device
from ..app.device_profile import probe_shape
from ..errors import InputError
from ..kernels.probe import choose_attention, kernel_rates
from ..loading.mapped_reasoner import check_mapped_reasoner
from ..loading.quantization import NONE, Fp8Options
from ..planning.plan import Plan
from ..request.spec import check_cache
from .budget import LargestCall, choose_pipeline_plan, measure_device, read_budget
from .fp8 import fp8_linears
from .offloaded_pipeline import OffloadedCosmos3OmniPipeline
from .pipeline_weights import place_pipeline
from .state import OffloadState

logger = logging.getLogger(__name__)

__all__ = ["OffloadedCosmos3OmniPipeline", "enable"]


def enable(
    pipe: Cosmos3OmniPipeline,
    *,
    vram_budget: str | int | None = None,
    host_budget: str | int | None = None,
    offload_stages: Sequence[str] = (),
    plan: Plan | None = None,
    device: str | torch.device | None = None,
    max_frames: int = LargestCall.frames,
    max_height: int = LargestCall.height,
    max_width: int = LargestCall.width,
    quantize: str | None = None,
    fp8_mode: str = "auto",
    fp8_scales: str = "channel",
    attention: str = "auto",
    compile: str = "auto",
    h2d_gbps: float | None = None,
    cache: str = "none",
    cache_threshold: float | None = None,
) -> Cosmos3OmniPipeline:
    """Place `pipe`'s weights and make `pipe(...)` run our prefill/denoise split; returns `pipe` itself.

    Where the weights go, one of (default: everything resident on the device):
    - `vram_budget` ('8GiB', '7500MiB' or bytes): the planner's fastest plan whose predicted peak fits it
      (and, with `host_budget`, whose pinned and private host memory fits that). A plan depends on the
      request's shape and the pipeline is placed once, so the plan is chosen for the largest call,
      `max_frames` x `max_height` x `max_width` (default the pipeline's own default, 189 frames at
      1280x720), with guidance and, when the pipeline makes sound, a sound track. Each call is then
      predicted under that plan before it runs, and refused with an InputError if it would not fit;
    - `offload_stages`: the named groups (reasoner, generator, vae) staged from host memory, as the
      CLI's --offload-stages;
    - `plan`: an explicit `Plan` (streamed towers, MLP chunks, decode tiles). A plan that maps the
      reasoner from checkpoint files cannot be followed: the weights come from the pipeline.

    `quantize="fp8"`: the transformer's decoder-layer linears are rounded to FP8 as they are placed
    (a byte a weight; the output is then the CLI's --quantize fp8 output, not the bf16 pipeline's);
    `fp8_mode` and `fp8_scales` are the CLI's --fp8-mode and --fp8-scales (see integration/fp8.py).

    `device`: where the work runs (default CUDA when present, else the CPU). `attention` and
    `compile` choose the kernels as the CLI's --attention and --compile do; `h2d_gbps` is the
    host-to-device bandwidth the planner assumes (default: measured). The pipeline's scheduler,
    prompt templates and safety checker are used as configured, at every call.

    `cache="seacache"` skips the generator's layers on steps whose latents barely moved, as the CLI's
    --cache seacache; `cache_threshold` is its --cache-threshold (None: SeaCache's default, 0.25).
    `pipe.offload.summary()` says which steps the last call computed and reused.
    """
    check_cache(cache, cache_threshold)
    _check_pipeline(pipe)
    target = _resolved(device)
    options = KernelOptions(attention=attention, compile=compile)
    options.check_available(target, pipe.transformer.dtype)
    fp8_options = Fp8Options(quantize=quantize, mode=fp8_mode, scales=fp8_scales)
    fp8 = fp8_linears(dict(pipe.transformer.config), fp8_options, target)
    if vram_budget is None:
        plan, budget = _plan_without_budget(plan, offload_stages, host_budget), None
        rates = kernel_rates(target, probe_shape(pipe.transformer.config))
        kernels = choose_attention(target, attention, dtype=pipe.transformer.dtype, rates=rates)
    else:
        if offload_stages or plan is not None:
            raise InputError("pass one of vram_budget, offload_stages and plan, not several")
        largest = LargestCall(frames=max_frames, height=max_height, width=max_width)
        host = None if host_budget is None else read_budget("host_budget", host_budget)
        setup = measure_device(pipe, target, attention=attention, h2d_GBps=h2d_gbps)
        quantization = NONE if fp8 is None else fp8.quantization
        vram = read_budget("vram_budget", vram_budget)
        budget = choose_pipeline_plan(
            pipe,
            setup,
            budget=vram,
            host_budget=host,
            largest=largest,
            quantization=quantization,
            cache=cache,
            cache_threshold=cache_threshold,
        )
        plan, kernels = budget.choice.plan, setup.kernels
    check_mapped_reasoner(
        plan,
        has_files=False,
        rewrites_weights=False,
        source="a loaded pipeline's weights",
        remedy="stream or stage the reasoner instead",
    )
    kernels = dataclasses.replace(kernels, fused=options.fused(target))
    engine = place_pipeline(pipe, plan, target, fp8)
    modules = (pipe.transformer, pipe.vae, pipe.sound_tokenizer)
    state = OffloadState(
        plan=plan,
        engine=engine,
        kernels=kernels,
        budget=budget,
        fp8=fp8,
        modules=modules,
        cache=cache,
        cache_threshold=cache_threshold,
    )
    # The same object, now of the subclass whose __call__ runs the split (nothing else of it changes).
    pipe.__class__ = OffloadedCosmos3OmniPipeline
    pipe.offload = state
    logger.info("cosmos3_offload.enable: %s", state.summary())
    return pipe


def _plan_without_budget(plan: Plan | None, offload_stages: Sequence[str], host_budget: object) -> Plan:
    """The plan given, or the one of `offload_stages` (none: everything resident)."""
    if host_budget is not None:
        raise InputError("host_budget goes with vram_budget: the planner fits both; pass vram_budget too")
    if plan is not None and offload_stages:
        raise InputError("pass one of vram_budget, offload_stages and plan, not several")
    if isinstance(offload_stages, str):
        raise InputError(f"offload_stages is a list of group names, e.g. [{offload_stages!r}], not text")
    return Plan.from_offload(list(offload_stages)) if plan is None else plan


def _check_pipeline(pipe: object) -> None:
    """Refuse what enable() cannot place: not a plain Cosmos3OmniPipeline, already enabled, weights
    already managed by diffusers' offloading or quantization, or not all loaded."""
    if isinstance(pipe, OffloadedCosmos3OmniPipeline):
        raise InputError("this pipeline is enabled already; load it again to place it differently")
    if type(pipe) is not Cosmos3OmniPipeline:
        raise InputError(f"enable() takes a diffusers Cosmos3OmniPipeline, got {type(pipe).__name__}")
    modules: list[nn.Module] = [pipe.transformer, pipe.vae]
    if pipe.sound_tokenizer is not None:
        modules.append(pipe.sound_tokenizer)
    for root in modules:
        name = type(root).__name__
        if any(_has_hooks(m) for m in root.modules()):
            raise InputError(
                f"the pipeline's {name} has offloading hooks (enable_model_cpu_offload, enable_group_offload, "
                "device_map...): enable() places the weights itself; load the pipeline without them"
            )
        if getattr(root, "hf_quantizer", None) is not None:
            raise InputError(f"the pipeline's {name} is quantized by diffusers; enable() takes unquantized weights")
        for param_name, param in root.named_parameters():
            if param.is_meta:
                raise InputError(f"the pipeline's {name} has weights that were never loaded ({param_name} on meta)")
            if not param.dtype.is_floating_point or param.dtype.itemsize == 1:
                raise InputError(f"the pipeline's {name} stores {param_name} as {param.dtype}; load it in bf16/fp32")


def _has_hooks(module: nn.Module) -> bool:
    """accelerate's hooks (enable_model_cpu_offload, device_map) or diffusers' (group offloading, caches).
    Calling the pipeline leaves an empty diffusers registry on the transformer: that one does not count."""
    registry = getattr(module, "_diffusers_hook", None)
    return hasattr(module, "_hf_hook") or (registry is not None and bool(registry.hooks))


def _resolved(device: str | torch.device | None) -> torch.device:
    """The device the work runs on; a GPU gets its index, so a weight already there is recognised."""
    resolved = resolve_device(None if device is None else str(device))
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved
