"""Two-phase load, the generic half: build a model on `meta`, lay its weights out in groups, give
each weight its home.

Homes are decided per group before any weight memory exists: a device tensor for resident
groups, a view of an exact-size host slab for offloaded ones, nothing at all for weights nobody
reads (they stay on `meta`). The loader then writes each value once, into its home, so an
offloaded group never passes through the GPU and the host never holds two copies. Buffers that
are not weights (rotary frequencies) are built on the CPU by the constructor and moved to the
device at the end.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
from accelerate import init_empty_weights
from torch import nn

from .slabs import SlabEntry, SlabLayout

TensorSpec = tuple[tuple[tuple[str, str], ...], tuple[int, ...], torch.dtype]

# accelerate's init_empty_weights swaps nn.Module.register_parameter for the whole process and puts back what it
# found: two threads inside it at once (a server's job measuring its decode while a request is checked) could leave
# the swapped one in place for good, and every model built after with its weights on meta. One at a time.
_EMPTY_WEIGHTS = threading.Lock()


def build_on_meta(model_cls: type, config: dict) -> nn.Module:
    """The model with every parameter on `meta` (buffers are real, on the CPU). Thread-safe among its callers."""
    with _EMPTY_WEIGHTS, init_empty_weights(include_buffers=False), warnings.catch_warnings():
        # Some diffusers models (Cosmos3's sound tokenizer) still call torch's old weight_norm; its
        # deprecation notice is addressed to diffusers, not to whoever runs a generation.
        warnings.filterwarnings("ignore", message=r".*weight_norm.* is deprecated", category=FutureWarning)
        return model_cls.from_config(config).eval()


def group_layouts(
    root: nn.Module, group_of: Callable[[str], str], dtype_of: Callable[[str], torch.dtype]
) -> dict[str, SlabLayout]:
    """One SlabLayout per group over `root`'s parameters; a tied parameter is one entry with several bindings."""
    bindings: dict[int, list[tuple[str, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for module_path, module in root.named_modules():
        for attr, param in module._parameters.items():
            if param is not None:
                bindings.setdefault(id(param), []).append((module_path, attr))
                params[id(param)] = param
    specs: dict[str, list[TensorSpec]] = {}
    for key, binds in bindings.items():
        names = [f"{path}.{attr}" if path else attr for path, attr in binds]
        groups = {group_of(name) for name in names}
        assert len(groups) == 1, f"tied weights {names} span groups {groups}"
        specs.setdefault(groups.pop(), []).append((tuple(binds), tuple(params[key].shape), dtype_of(names[0])))
    return {group: SlabLayout.pack(spec) for group, spec in specs.items()}


def keep_fp32_dtype(model_cls: type, dtype: torch.dtype) -> Callable[[str], torch.dtype]:
    """dtype for every weight, float32 for modules the class keeps in float32 (as from_pretrained does)."""
    keep = tuple(getattr(model_cls, "_keep_in_fp32_modules", None) or ())

    def dtype_of(name: str) -> torch.dtype:
        return torch.float32 if any(part in keep for part in name.split(".")) else dtype

    return dtype_of


def allocate_on_device(entry: SlabEntry, device: torch.device) -> torch.Tensor:
    """The only place a weight is allocated on the device outside the arena (resident groups)."""
    return torch.empty(entry.shape, dtype=entry.dtype, device=device)


def move_buffers(root: nn.Module, device: torch.device) -> None:
    """Move non-weight buffers (built on the CPU by the constructor) to the device."""
    for module in root.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
