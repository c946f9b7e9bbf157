"""The stage recorder times each stage and reports host memory."""

from __future__ import annotations

import time

import torch

from cosmos3_offload.stages import StageRecorder


def test_each_stage_is_recorded_in_order():
    """Stages keep their order and measure their own time; the CPU has no device peak."""
    recorder = StageRecorder(torch.device("cpu"))
    with recorder.stage("a"):
        time.sleep(0.05)
    with recorder.stage("b"):
        pass
    assert [s.name for s in recorder.stages] == ["a", "b"]
    assert recorder.stages[0].seconds >= 0.05 > recorder.stages[1].seconds
    assert recorder.stages[0].device_peak_bytes is None
    assert recorder.stages[0].host_peak_bytes > 0
    assert recorder.summary().splitlines()[-1].startswith("total")


def test_host_peak_sees_a_large_allocation():
    """A 512 MiB buffer touched inside a stage shows in that stage's host peak."""
    recorder = StageRecorder(torch.device("cpu"))
    with recorder.stage("big"):
        buffer = torch.ones(128 * 1024 * 1024)  # 512 MiB of float32
        del buffer
    assert recorder.stages[0].host_peak_bytes >= 512 * 1024**2
