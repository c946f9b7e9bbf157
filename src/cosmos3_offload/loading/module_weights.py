"""The weights a live module holds now, as the source a two-phase load writes homes from.

`cosmos3_offload.enable(pipe)` places an already-loaded diffusers pipeline: its own modules are laid
out and placed as a checkpoint's meta-built ones are (components.py), but each home is written from
the tensor the module held before instead of from a file. Every value is given up as soon as it has
been written (`fill`), so the module's old copy is freed as its new homes fill up; a tensor already
in its home's form (device, dtype, shape, sole owner of its storage) can stay where it is
(`reusable`), so nothing is allocated or copied for it.

Only a tensor aligned as torch's allocator aligns its own (`REUSE_ALIGNMENT`) is kept: CPU matmul
kernels may round differently on less-aligned data, and a plan's output must not depend on where
its weights happen to lie (diffusers' `from_pretrained` leaves CPU weights at the byte offsets of the
file they were mapped from; those are copied into aligned homes).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from ..offload.slabs import SlabEntry
from .mapped_files import FILL_THREADS

REUSE_ALIGNMENT = 64  # bytes: torch's CPU allocator's alignment (a GPU allocation's is larger)


class ModuleWeights:
    """The current tensor of every parameter of `root` (each tied name too), until it is written or dropped."""

    def __init__(self, root: nn.Module):
        self._values: dict[str, torch.Tensor] = dict(root.named_parameters(remove_duplicate=False))

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype a weight has now: its home keeps it (the pipeline's dtypes are the user's choice)."""
        return self._values[name].dtype

    def reusable(self, device: torch.device) -> Callable[[SlabEntry], torch.Tensor | None]:
        """For `Placer(reuse=...)`: the tensor itself where it can be the home of a weight kept on `device`."""

        def reuse(entry: SlabEntry) -> torch.Tensor | None:
            value = self._values.get(entry.names[0])  # None: a tensor the module did not have (an FP8 scale)
            if value is None:
                return None
            fits = value.device == device and value.dtype == entry.dtype and tuple(value.shape) == entry.shape
            # Only a tensor that owns its storage exactly: keeping a view would keep its neighbours alive.
            owns = value.is_contiguous() and value.storage_offset() == 0
            owns = owns and value.untyped_storage().nbytes() == entry.nbytes
            aligned = value.data_ptr() % REUSE_ALIGNMENT == 0
            return value.detach() if fits and owns and aligned else None

        return reuse

    def fill(self, targets: list[tuple[SlabEntry, torch.Tensor]]) -> None:
        """Copy each value into its home (a reused one is its home already) and let the old tensor go."""
        pairs = []
        for entry, home in targets:
            value = self.take(entry)
            if value.data_ptr() != home.data_ptr():
                pairs.append((home, value))
        with torch.no_grad(), ThreadPoolExecutor(FILL_THREADS) as pool:  # copy_ releases the GIL
            for _ in pool.map(lambda pair: pair[0].copy_(pair[1]), pairs):
                pass

    def take(self, entry: SlabEntry) -> torch.Tensor:
        """The value of `entry`, given up (a `QuantizingFill` rounds it to FP8 and lets it go)."""
        value = self._values[entry.names[0]]
        for name in entry.names:
            del self._values[name]
        return value

    def drop(self, entries: tuple[SlabEntry, ...]) -> None:
        """Forget the values of weights nobody reads, where the module had them (a scale FP8 adds it had not)."""
        for entry in entries:
            for name in entry.names:
                self._values.pop(name, None)

    @property
    def remaining(self) -> tuple[str, ...]:
        """Names whose values were neither written nor dropped (none, after a complete load)."""
        return tuple(self._values)
