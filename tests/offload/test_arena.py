"""The arena is allocated once, reused while big enough, and released on request."""

from __future__ import annotations

import torch

from cosmos3_offload.offload.arena import DeviceArena


def test_reserve_reuses_grows_and_releases():
    """A smaller request keeps the same buffer, a larger one replaces it, release drops it."""
    arena = DeviceArena(torch.device("cpu"))
    first = arena.reserve(1000)
    assert arena.reserve(10).data_ptr() == first.data_ptr()
    assert arena.reserve(5000).numel() == 5000 == arena.nbytes
    arena.release()
    assert arena.nbytes == 0 and arena.peak_bytes == 5000
