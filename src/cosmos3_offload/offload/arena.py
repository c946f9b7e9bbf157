"""The device arena: one reusable device buffer that holds whichever staged group is running."""

from __future__ import annotations

import logging

import torch

from ..units import format_bytes

logger = logging.getLogger(__name__)


class DeviceArena:
    """A uint8 device buffer, allocated on first use and reused by every staged group.

    `reserve(n)` keeps the buffer when it already holds n bytes; `release()` hands the memory
    back to PyTorch's allocator (used once the rest of the request needs less than the buffer holds).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer: torch.Tensor | None = None
        self.peak_bytes = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def reserve(self, nbytes: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.release()
            logger.info("allocating a %s device arena", format_bytes(nbytes))
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self.peak_bytes = max(self.peak_bytes, nbytes)
        return self.buffer

    def release(self) -> None:
        # Dropping the only reference returns the block to the caching allocator; kernels still
        # queued on it are safe because the allocator defers reuse until the stream passes them.
        self.buffer = None
