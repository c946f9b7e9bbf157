"""build_on_meta from several threads at once (a server measures a job's decode while it checks a request)."""

from __future__ import annotations

import threading

import torch
from diffusers import AutoencoderKLWan

from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.offload.materialize import build_on_meta


def test_meta_builds_on_several_threads_leave_later_models_real():
    """Each build has its weights on meta, and a model built after them all has real ones: accelerate's
    process-wide swap of register_parameter is never left in place by two builds overlapping."""
    config = model_spec("tiny").vae
    devices: set[str] = set()

    def build() -> None:
        for _ in range(15):
            devices.update(p.device.type for p in build_on_meta(AutoencoderKLWan, config).parameters())

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert devices == {"meta"}
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
