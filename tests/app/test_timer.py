"""The phase timer times each phase of a run and reports host memory."""

from __future__ import annotations

import torch

from cosmos3_offload.app import timer as timer_module
from cosmos3_offload.app.timer import PhaseTimer


def test_each_phase_is_recorded_in_order(monkeypatch):
    """Phases keep their order and each measures the clock between its own start and end; the CPU has no device peak."""
    readings = iter([10.0, 12.5, 20.0, 20.25])  # start and end of "a", then of "b"
    monkeypatch.setattr(timer_module.time, "perf_counter", lambda: next(readings))
    timer = PhaseTimer(torch.device("cpu"))
    with timer.phase("a"):
        pass
    with timer.phase("b"):
        pass
    assert [(s.name, s.seconds) for s in timer.phases] == [("a", 2.5), ("b", 0.25)]
    assert timer.phases[0].device_peak_bytes is None
    assert timer.phases[0].host_peak_bytes > 0
    assert timer.summary().splitlines()[-1].split() == ["total", "2.75s"]


def test_host_peak_sees_a_large_allocation():
    """A 512 MiB buffer touched inside a phase shows in that phase's host peak."""
    timer = PhaseTimer(torch.device("cpu"))
    with timer.phase("big"):
        buffer = torch.ones(128 * 1024 * 1024)  # 512 MiB of float32
        del buffer
    assert timer.phases[0].host_peak_bytes >= 512 * 1024**2
