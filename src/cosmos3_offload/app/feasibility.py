"""Can this request run here at all? The planner's prediction against the machine's memory.

Asked before anything loads when no `--vram-budget` is given (with a budget the planner has
already picked a plan that fits it): the plan's predicted device peak must fit the device's free
memory, and the host slabs (plus, on the CPU, everything) the host's available memory. Predictions
were fitted on a GPU, so on the CPU they are a bound on what is possible, not a promise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..loading.components import model_configs
from ..loading.layout import sound_config
from ..loading.quantization import NO_FP8_FLAGS, Fp8Options, quantization_for
from ..loading.sizes import model_sizes
from ..planning.memory import weight_bytes
from ..planning.parallel import SINGLE, ParallelLayout
from ..planning.plan import Plan
from ..planning.request import DeviceProfile
from ..planning.search import predict
from ..planning.sizes import ModelSizes
from ..units import GIB
from .config import GenerationConfig
from .planned_request import request_of


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (None for the CPU, whose memory is the host's)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def run_sizes(
    config: GenerationConfig, *, checkpoint: Path | None, model: str, dtype: torch.dtype, fp8: Fp8Options
) -> tuple[ModelSizes, dict | None]:
    """The model's sizes as a run of `config` loads it (its sound decoder and action heads when it asks for them),
    and the sound decoder's config (None without sound)."""
    sound = sound_config(checkpoint) if config.sound else None  # (check_sound has run: the folder has one)
    transformer_config, vae_config = model_configs(checkpoint, model)
    sizes = model_sizes(
        transformer_config,
        vae_config,
        dtype_bytes=4 if dtype == torch.float32 else 2,
        sound_config=sound,
        quantization=quantization_for(checkpoint, transformer_config, fp8),
        actions=config.action is not None,
    )
    return sizes, sound


def check_fits(
    config: GenerationConfig,
    plan: Plan,
    *,
    checkpoint: Path | None,
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    fp8: Fp8Options = NO_FP8_FLAGS,
    layout: ParallelLayout = SINGLE,
    preview_frames: int = 0,
    measured: tuple[ModelSizes, dict | None] | None = None,
) -> None:
    """An InputError, before anything loads, when the request cannot fit this machine's memory (one GPU's
    share of it under `layout`, with the latent frames an exact preview decodes: `preview_frames`). `measured`:
    `run_sizes` of this request, when the caller keeps it."""
    if measured is None:
        measured = run_sizes(config, checkpoint=checkpoint, model=model, dtype=dtype, fp8=fp8)
    sizes, sound = measured
    request = request_of(config, sound, layout, preview_frames=preview_frames)
    peak = predict(plan, sizes, request, DeviceProfile()).peak
    weights = weight_bytes(plan, sizes)
    host_need = weights.pinned + weights.host + (peak if device.type == "cpu" else 0)
    free = device_free_bytes(device)
    if free is not None and peak > free:
        raise InputError(
            f"this request needs about {peak / GIB:.1f} GiB on {device} with this placement, which has "
            f"{free / GIB:.1f} GiB free: pass --vram-budget {max(free / GIB, 0.1):.1f}GiB to let the planner fit it, "
            "or lower --frames or --resolution"
        )
    available = host_available_bytes()
    if available is not None and host_need > available:
        raise InputError(
            f"this request needs about {host_need / GIB:.1f} GiB of host memory, and {available / GIB:.1f} GiB "
            "is available: lower --frames or --resolution, or use a smaller model"
        )
