"""Flags into what the library takes: the request (its defaults applied once, from the declaration),
and the options of the model, its placement and kernels, each checked before anything is measured or
loaded: a flag that is read is checked, and one that would be ignored is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ...errors import InputError
from ...loading.files import check_checkpoint
from ...loading.hub import HubRepo, resolve_checkpoint
from ...loading.layout import has_sound_tokenizer, pipeline_options, sound_config
from ...loading.quantization import Fp8Options
from ...model.specs import embedded_tiny, model_spec
from ...parallel.mesh import Environment
from ...planning.parallel import MAX_GPUS
from ...planning.request import parse_budget
from ...request.checks import check_input_file, check_input_folder, check_number
from ...request.spec import RequestSpec, request_defaults
from ..config import (
    MAX_H2D_GBPS,
    MIN_H2D_GBPS,
    GenerationConfig,
    KernelOptions,
    action_aspect,
    resolve_device,
    resolve_dtype,
)
from .flags import COMMAND_FIELDS

PLANNED_PROMPT = "(the request planned)"  # `plan` and `serve` shape a request without a prompt


def resolve_hub_checkpoint(args: argparse.Namespace, *, sound: bool) -> HubRepo | None:
    """Put the snapshot folder of a --checkpoint repo id in its place, so that everything after reads a
    folder: the Hugging Face cache's, with the files a run reads (`sound`: the sound tokenizer's too)
    downloaded first where missing and allowed. Returns the repo as typed (None: a folder, or no --checkpoint)."""
    repo = args.checkpoint
    if not isinstance(repo, HubRepo):
        return None
    args.checkpoint = resolve_checkpoint(repo, sound=sound, progress=not getattr(args, "no_progress", False))
    return repo


def typed_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields typed on the command line (a flag left out is None)."""
    return {name: getattr(args, name) for name in COMMAND_FIELDS[args.command] if getattr(args, name) is not None}


def defaults_for(args: argparse.Namespace) -> dict[str, Any]:
    """The request's defaults for this model: Cosmos3's, the tiny model's smaller shape, or a distilled
    checkpoint's step count and guidance."""
    tiny = embedded_tiny(args.checkpoint, args.model)
    sigmas = _distilled_sigmas(args.checkpoint)
    action = getattr(args, "action", None) is not None
    return request_defaults(tiny=tiny, distilled_steps=None if sigmas is None else len(sigmas), action=action)


def request_from_args(args: argparse.Namespace) -> GenerationConfig:
    """`generate`'s request: the defaults, then the typed flags."""
    return GenerationConfig(**defaults_for(args) | typed_fields(args))


def shape_from_args(args: argparse.Namespace, **planned: Any) -> RequestSpec:
    """The request `plan` and `serve` plan for (no prompt, nothing written); `planned` overrides fields."""
    values = defaults_for(args) | typed_fields(args) | planned
    shape = RequestSpec(**values | {"prompt": PLANNED_PROMPT})
    for kind in ("image", "video"):
        if kind not in planned and getattr(shape, kind) is not None:
            check_input_file(kind, getattr(shape, kind))
    if shape.action is not None:  # planned at the input's canvas
        shape = dataclasses.replace(shape, aspect_ratio=action_aspect(shape))
    return shape


def _distilled_sigmas(checkpoint: Path | None) -> tuple[float, ...] | None:
    """A distilled checkpoint's fixed schedule (its defaults: that many steps, guidance 1), else None.
    A --checkpoint that is no folder gives None here: `check_flags` refuses it with its reason."""
    if checkpoint is None:
        return None
    try:
        check_input_folder("checkpoint", checkpoint, "")
    except InputError:
        return None
    return pipeline_options(checkpoint).distilled_sigmas


def check_flags(args: argparse.Namespace) -> None:
    """The model, placement and kernel flags every command shares."""
    resolve_dtype(args.dtype, resolve_device(args.device))
    model_spec(args.model)  # --checkpoint overrides it, but a name that means nothing is still a typo
    if args.checkpoint is not None:
        check_input_folder("checkpoint", args.checkpoint, "pass a diffusers-layout Cosmos3 folder")
        try:
            check_checkpoint(args.checkpoint)
        except OSError as error:  # a file inside it we may not read, a name too long
            raise InputError(f"checkpoint {str(args.checkpoint)!r} cannot be read: {error.strerror}") from None
    if args.vram_budget is not None:
        parse_budget(args.vram_budget)
        if getattr(args, "offload_stages", None):
            raise InputError("pass either --vram-budget or --offload-stages, not both")
    if args.host_budget is not None:
        if args.vram_budget is None:
            raise InputError("--host-budget is planned together with a device budget; pass --vram-budget too")
        parse_budget(args.host_budget)
    if args.h2d_gbps is not None:
        check_number("h2d-gbps", args.h2d_gbps, MIN_H2D_GBPS, MAX_H2D_GBPS)
    if args.gpus is not None and not 1 <= args.gpus <= MAX_GPUS:
        raise InputError(f"--gpus must be 1 to {MAX_GPUS}, got {args.gpus}")
    if args.cfg_parallel != "auto" and args.gpus is None and not Environment.read().distributed:
        raise InputError(f"--cfg-parallel {args.cfg_parallel} applies to several GPUs; add --gpus N, or drop it")
    kernel_options(args)
    if args.sound and not has_sound_tokenizer(args.checkpoint):
        raise InputError("--sound needs a --checkpoint with a sound_tokenizer/ folder (Nano, Super)")
    if args.sound:
        sound_config(args.checkpoint)  # builds, with a usable sampling rate
    if args.condition_frames is not None and getattr(args, "action", None) is not None:
        raise InputError("--condition-frames does not go with --action: the mode says which frames are clean; drop it")
    if args.condition_frames is not None and args.video is None:
        raise InputError("--condition-frames picks latent frames of a --video clip; pass --video too, or drop it")


def kernel_options(args: argparse.Namespace) -> KernelOptions:
    options = KernelOptions(attention=args.attention, compile=args.compile)
    device = resolve_device(args.device)
    options.check_available(device, resolve_dtype(args.dtype, device))
    return options


def fp8_options(args: argparse.Namespace) -> Fp8Options:
    return Fp8Options(quantize=args.quantize, mode=args.fp8_mode, scales=args.fp8_scales)


def host_budget(args: argparse.Namespace) -> int | None:
    return None if args.host_budget is None else parse_budget(args.host_budget)
