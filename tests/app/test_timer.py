"""The stage recorder times each stage and reports host memory."""

from __future__ import annotations

import time

import torch

from cosmos3_offload.app.timer import PhaseTimer


def test_each_phase_is_recorded_in_order():
    """Phases keep their order and measure their own time; the CPU has no device peak."""
    timer = PhaseTimer(torch.device("cpu"))
    with timer.phase("a"):
        time.sleep(0.05)
    with timer.phase("b"):
        pass
    assert [s.name for s in timer.phases] == ["a", "b"]
    assert timer.phases[0].seconds >= 0.05 > timer.phases[1].seconds
    assert timer.phases[0].device_peak_bytes is None
    assert timer.phases[0].host_peak_bytes > 0
    assert timer.summary().splitlines()[-1].startswith("total")


def test_host_peak_sees_a_large_allocation():
    """A 512 MiB buffer touched inside a phase shows in that phase's host peak."""
    timer = PhaseTimer(torch.device("cpu"))
    with timer.phase("big"):
        buffer = torch.ones(128 * 1024 * 1024)  # 512 MiB of float32
        del buffer
    assert timer.phases[0].host_peak_bytes >= 512 * 1024**2
