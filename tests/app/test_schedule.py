"""The schedule check refuses exactly the (steps, shift) pairs UniPC cannot run."""

from __future__ import annotations

import pytest
import torch

from cosmos3_offload.app.schedule import check_schedule
from cosmos3_offload.errors import InputError


@pytest.mark.parametrize(
    "steps, shift, accepted",
    [
        (35, 3.0, True),
        (35, 5.0, True),
        (35, 10.0, True),  # Cosmos3's defaults
        (35, 0.01, True),  # repeated timesteps at the bottom, which UniPC runs through
        (100, 10.0, True),
        (1000, 10.0, False),
        (35, 30.0, False),
        (8, 200.0, False),
        (2, 1000.0, False),
        (1, 1000.0, True),
    ],
)
def test_refused_where_unipc_fails(steps, shift, accepted):
    """Pairs whose UniPC loop fails (seen with diffusers 0.42.1) are refused with what to lower; the others pass."""
    if accepted:
        check_schedule(steps, shift)
    else:
        with pytest.raises(InputError, match="lower --shift or --steps"):
            check_schedule(steps, shift)


def test_an_accepted_schedule_gets_through_a_real_denoising_loop(tmp_path):
    """A high shift the check accepts runs the tiny model's whole loop to finite latents."""
    from tiny_models import tiny_pipeline

    from cosmos3_offload.app.config import GenerationConfig
    from cosmos3_offload.app.generate import Latents, denoise_latents, initial_noise, prefill_branches, prepare_branches

    config = GenerationConfig(prompt="a fox", frames=5, resolution=256, steps=5, shift=100.0, output=tmp_path / "o.mp4")
    pipe = tiny_pipeline(shift=config.flow_shift)
    latents = initial_noise(pipe, config, torch.device("cpu"))
    branches = prepare_branches(pipe, config, latents)
    out = denoise_latents(
        pipe, config, branches, prefill_branches(pipe, branches), Latents(latents), progress=False
    ).vision
    assert torch.isfinite(out).all()
