"""The validated request on this machine, and where to run it (device, dtype, kernels).

The request's fields and their checks are declared once in request/spec.py; `GenerationConfig` adds
what looks at this machine: the conditioning files exist, the output can be written and is none of
them, the schedule runs. Every check happens before anything is loaded, with a message that says how
to fix it; the CLI turns an InputError into a one-line error and exit status 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..kernels.attention import available_attention
from ..kernels.probe import AUTO, DIFFUSERS, check_attention_choice
from ..model.actions import canvas_aspect
from ..request.checks import InputFiles, check_input_file, shown
from ..request.spec import RequestSpec
from .inputs import input_frame_size
from .outputs import OutputFailed, check_output
from .schedule import check_schedule

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
MIN_H2D_GBPS, MAX_H2D_GBPS = 0.1, 10_000.0  # --h2d-gbps: below PCIe 1.0 x1, ten times NVLink-C2C


def resolve_device(name: str | None) -> torch.device:
    """`None` picks CUDA when present, else the CPU; anything else must name a usable device."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cpu" and device.index not in (None, 0):
        raise InputError(f"device {name!r}: the CPU takes no index; use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} requested but this torch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`None` picks bfloat16 on a GPU and float32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


COMPILE_CHOICES = ("auto", "on", "off")  # --compile: auto is on for a GPU, off on the CPU


@dataclass(frozen=True, kw_only=True)
class KernelOptions:
    """Which kernels a run may use: `attention` is "auto" (the probe's fastest exact one on a GPU,
    diffusers' dispatcher on the CPU), "diffusers" or a registered implementation; `compile` fuses
    the layers' norms, rotary, gating and residual adds with torch.compile ("auto": on a GPU)."""

    attention: str = "auto"
    compile: str = "auto"

    def __post_init__(self) -> None:
        check_attention_choice(self.attention)
        if self.compile not in COMPILE_CHOICES:
            raise InputError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {shown(self.compile)}")

    def check_available(self, device: torch.device, dtype: torch.dtype) -> None:
        """A named attention must run on `device` in `dtype`: refused before anything is measured or loaded."""
        if self.attention not in (AUTO, DIFFUSERS):
            available_attention(self.attention, device, dtype)

    def fused(self, device: torch.device) -> bool:
        return self.compile == "on" or (self.compile == "auto" and device.type == "cuda")


DEFAULT_KERNELS = KernelOptions()


@dataclass(frozen=True, kw_only=True)
class GenerationConfig(RequestSpec):
    """A request (see request/spec.py) checked against this machine too: its image or video exists, its
    output can be written and is not its image or video (by any path, link or hard link), and UniPC can
    run its (steps, shift) schedule."""

    def __post_init__(self) -> None:
        super().__post_init__()
        inputs = (("image", self.image), ("video", self.video), ("actions file", self.actions))
        for kind, path in inputs:
            if path is not None:
                check_input_file(kind, path)
        if self.action is not None:
            object.__setattr__(self, "aspect_ratio", action_aspect(self))
        InputFiles(inputs).refuse_output(self.output)
        check_schedule(self.steps, self.flow_shift)
        try:
            check_output(self.output, self.frames, actions=self.action in ("inverse_dynamics", "policy"))
        except (InputError, OutputFailed):  # bad input, or a disk with no room even for the probe (exit 1)
            raise
        except ValueError:  # a NUL byte, which only the Python API can pass
            raise InputError(f"output {str(self.output)!r} is not a usable path (it holds a NUL byte)") from None
        except OSError as error:  # too long, a symlink loop, a folder we may not enter
            raise InputError(
                f"output {str(self.output)!r} cannot be used: {error.strerror}; choose another --output"
            ) from None


def action_aspect(request: RequestSpec) -> str:
    """An action run's aspect ratio: the canvas of its tier nearest its input's shape (read from the file's
    header), as diffusers picks it; one typed must be that one."""
    kind, path = ("image", request.image) if request.image is not None else ("video", request.video)
    height, width = input_frame_size(kind, path)
    aspect = canvas_aspect(height, width, request.resolution)
    if request.aspect_ratio is not None and request.aspect_ratio != aspect:
        raise InputError(
            f"--aspect-ratio does not go with --action: the {kind}'s shape ({width}x{height}) picks the "
            f"canvas, {aspect}; drop --aspect-ratio"
        )
    return aspect


def check_output_spares_checkpoint(output: Path, checkpoint: Path | None) -> None:
    """Refuse an output that would replace one of the checkpoint's files (a symlink to it, a hard link,
    a file inside its folder), which the request alone does not know."""
    if checkpoint is not None and os.path.lexists(output):  # a new file replaces nothing
        files = InputFiles()
        files.add_folder("checkpoint", checkpoint)
        files.refuse_output(output)
