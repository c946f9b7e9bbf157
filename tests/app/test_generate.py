"""A whole generation equals `Cosmos3OmniPipeline.__call__` with the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import diffusers_latents, relative_error, tiny_pipeline

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.generate import (
    Latents,
    decode_frames,
    denoise_latents,
    initial_noise,
    prefill_branches,
    prepare_branches,
)

TOLERANCE = 1e-4


def our_latents(pipe, config):
    latents = initial_noise(pipe, config, torch.device("cpu"))
    branches = prepare_branches(pipe, config, latents)
    return denoise_latents(
        pipe, config, branches, prefill_branches(pipe, branches), Latents(latents), progress=False
    ).vision


@pytest.mark.parametrize(
    "frames, guidance, negative",
    [(9, 6.0, "blurry, low quality"), (1, 4.0, None), (5, 1.0, None)],
    ids=["t2v-cfg", "t2i-cfg", "t2v-no-cfg"],
)
def test_generation_equals_diffusers_pipeline(tmp_path, frames, guidance, negative):
    """Latents after the whole loop match diffusers' pipeline within 1e-4."""
    config = GenerationConfig(
        prompt="a red fox in the snow",
        negative_prompt=negative,
        frames=frames,
        resolution=256,
        steps=4,
        guidance=guidance,
        seed=7,
        output=tmp_path / ("out.jpg" if frames == 1 else "out.mp4"),
    )
    ours = our_latents(tiny_pipeline(shift=config.flow_shift), config)
    theirs = diffusers_latents(tiny_pipeline(shift=config.flow_shift), config)
    assert ours.shape == theirs.shape
    assert relative_error(ours, theirs) <= TOLERANCE


def test_guidance_one_runs_the_conditional_branch_only(pipeline, tmp_path):
    """guidance 1 packs a single branch, so the unconditional prompt is never prefilled."""
    config = GenerationConfig(prompt="a fox", frames=5, resolution=256, guidance=1.0, output=tmp_path / "o.mp4")
    latents = initial_noise(pipeline, config, torch.device("cpu"))
    assert len(prepare_branches(pipeline, config, latents)) == 1
    assert len(prepare_branches(pipeline, GenerationConfig(**{**config.__dict__, "guidance": 2.0}), latents)) == 2


def test_noise_has_the_latent_geometry_and_follows_the_seed(pipeline, tmp_path):
    """[1, 48, (F-1)/4+1, H/16, W/16]; the same seed gives the same noise, another seed other noise."""
    config = GenerationConfig(prompt="a fox", frames=17, resolution=256, seed=3, output=tmp_path / "o.mp4")
    noise = initial_noise(pipeline, config, torch.device("cpu"))
    assert noise.shape == (1, 48, 5, 12, 20) and noise.dtype == torch.float32
    assert torch.equal(noise, initial_noise(pipeline, config, torch.device("cpu")))
    other = GenerationConfig(**{**config.__dict__, "seed": 4})
    assert not torch.equal(noise, initial_noise(pipeline, other, torch.device("cpu")))


def test_decode_gives_uint8_frames_of_the_requested_size(pipeline, tmp_path):
    """Latents for 9 frames at 320x192 decode to uint8 [9, 192, 320, 3]."""
    latents = torch.randn(1, 48, 3, 12, 20, generator=torch.Generator().manual_seed(0))
    frames = decode_frames(pipeline, latents)
    assert frames.shape == (9, 192, 320, 3) and frames.dtype == np.uint8


def test_frame_conversion_matches_diffusers_postprocessing(pipeline):
    """Chunked uint8 conversion gives the bytes of diffusers' VideoProcessor on the whole float32 video."""
    latents = torch.randn(1, 48, 5, 12, 20, generator=torch.Generator().manual_seed(1))
    ours = decode_frames(pipeline, latents)  # 17 frames: more than one conversion chunk
    vae = pipeline.vae
    mean = pipeline._vae_latents_mean.view(1, -1, 1, 1, 1)
    inv_std = pipeline._vae_latents_inv_std.view(1, -1, 1, 1, 1)
    with torch.no_grad():
        decoded = vae.decode(latents / inv_std + mean).sample.float()
    theirs = (pipeline.video_processor.postprocess_video(decoded, output_type="np")[0] * 255).round().astype(np.uint8)
    assert ours.shape == theirs.shape == (17, 192, 320, 3)
    assert np.array_equal(ours, theirs)


def test_the_requests_system_prompt_switch_reaches_the_prompt_template(tmp_path, monkeypatch):
    """Fails when `system_prompt` (None: the checkpoint's choice) is not what the path tokenizes with."""
    from diffusers import Cosmos3OmniPipeline

    from cosmos3_offload.app.runner import run

    seen = []
    tokenize = Cosmos3OmniPipeline.tokenize_prompt

    def spy(self, *args, **kwargs):
        seen.append(kwargs["use_system_prompt"])
        return tokenize(self, *args, **kwargs)

    monkeypatch.setattr(Cosmos3OmniPipeline, "tokenize_prompt", spy)
    for value in (None, True, False):
        config = GenerationConfig(
            prompt="a fox", frames=1, resolution=256, steps=1, system_prompt=value, output=tmp_path / f"{value}.png"
        )
        run(config, device="cpu", progress=False)
    assert seen == [None, True, False]
    assert (tmp_path / "True.png").read_bytes() != (tmp_path / "False.png").read_bytes(), "the template changed nothing"
