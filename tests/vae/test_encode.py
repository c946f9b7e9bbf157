"""Image- and video-to-video equal diffusers' pipeline; the encoder runs under staging.

(Reading the conditioning files, and refusing bad ones, is tested in tests/app/test_inputs.py.)"""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import diffusers_latents, relative_error, tiny_pipeline

from cosmos3_offload.app.cli import main
from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.generate import Latents, denoise_latents, initial_noise, prefill_branches, prepare_branches
from cosmos3_offload.app.inputs import read_frames
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.model.geometry import frames_to_encode
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.vae.encode import condition_pixels, conditioned_noise

CPU = torch.device("cpu")


@pytest.fixture
def picture(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (150, 260, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def clip(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "in.mp4"
    iio.imwrite(path, rng.integers(0, 256, (7, 96, 160, 3), dtype=np.uint8), fps=24, macro_block_size=1)
    return path


def ours(pipe, config):
    conditioning = read_frames(config.image, config.video, config.condition_frames)
    latents = initial_noise(pipe, config, CPU)
    pixels = condition_pixels(
        pipe,
        image=conditioning.image,
        video=conditioning.video,
        condition_frames=conditioning.indexes,
        height=config.height,
        width=config.width,
        device=CPU,
    )
    latents = conditioned_noise(pipe, pixels, conditioning.indexes, latents)
    branches = prepare_branches(pipe, config, latents, conditioning.indexes)
    return denoise_latents(
        pipe, config, branches, prefill_branches(pipe, branches), Latents(latents), progress=False
    ).vision


@pytest.mark.parametrize("mode", ["image", "video"])
def test_conditioned_generation_equals_diffusers_pipeline(tmp_path, picture, clip, mode):
    """i2v and v2v latents after the loop match Cosmos3OmniPipeline.__call__ within 1e-4."""
    config = GenerationConfig(
        prompt="a fox",
        frames=13,
        resolution=256,
        steps=3,
        seed=5,
        output=tmp_path / "o.mp4",
        **{mode: picture if mode == "image" else clip},
    )
    conditioning = read_frames(config.image, config.video, config.condition_frames)
    expected = diffusers_latents(
        tiny_pipeline(shift=config.flow_shift), config, image=conditioning.image, video=conditioning.video
    )
    actual = ours(tiny_pipeline(shift=config.flow_shift), config)
    assert relative_error(actual, expected) <= 1e-4


def test_image_frame_stays_clean_and_staged_encode_equals_resident(tmp_path, picture):
    """Latent frame 0 ends as the encoded image (to rounding); with the VAE staged the run is bit-identical."""
    config = GenerationConfig(
        prompt="a fox", frames=9, resolution=256, steps=2, image=picture, output=tmp_path / "o.mp4"
    )
    conditioning = read_frames(config.image, None, config.condition_frames)
    runs = []
    for plan in (Plan(), Plan.from_offload(("vae", "reasoner"))):
        components = load_components(None, CPU, torch.float32, plan)
        runs.append(generate_video(config, components, PhaseTimer(CPU), progress=False, conditioning=conditioning))
    assert torch.equal(runs[0].latents, runs[1].latents)
    pipe = tiny_pipeline()
    pixels = condition_pixels(
        pipe, image=conditioning.image, video=None, condition_frames=(0,), height=192, width=320, device=CPU
    )
    with torch.no_grad():
        encoded = pipe._encode_video(pixels).float()
    # Zero velocity there; UniPC's multistep weights only add float rounding.
    assert relative_error(runs[0].latents[:, :, :1], encoded) <= 1e-5
    assert runs[0].frames.shape == (9, 192, 320, 3)


def test_encoding_only_the_conditioning_frames_is_exact(picture):
    """The causal encoder gives latent frame 0 of a 1-frame clip equal to that of the full repeated clip."""
    pipe = tiny_pipeline()
    image = read_frames(picture, None, (0,)).image
    one = condition_pixels(pipe, image=image, video=None, condition_frames=(0,), height=192, width=320, device=CPU)
    full = one.expand(-1, -1, 9, -1, -1).contiguous()
    assert relative_error(pipe._encode_video(one)[:, :, :1], pipe._encode_video(full)[:, :, :1]) <= 1e-6


def test_image_to_video_from_the_command_line(capsys, tmp_path, picture):
    """--image writes a video of the requested size whose first frame resembles the image's crop."""
    out = tmp_path / "i2v.mp4"
    assert (
        main(
            [
                "generate",
                "--prompt",
                "a fox",
                "--image",
                str(picture),
                "--frames",
                "9",
                "--steps",
                "2",
                "--no-progress",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert iio.imread(out).shape == (9, 192, 320, 3)
    assert "\nencode " in capsys.readouterr().out


@pytest.mark.parametrize("indexes", [(0,), (0, 1), (0, 2)])
def test_frames_to_encode_matches_the_pixels_encoded(pipeline, indexes):
    """What the planner is told the encode takes is what condition_pixels hands the encoder."""
    clip = [Image.new("RGB", (64, 48), (i * 20, 0, 0)) for i in range(3)]
    pixels = condition_pixels(
        pipeline, image=None, video=clip, condition_frames=indexes, height=256, width=256, device=torch.device("cpu")
    )
    assert pixels.shape[2] == frames_to_encode(image=False, video=True, condition_frames=indexes)
    assert frames_to_encode(image=True, video=False, condition_frames=indexes) == 1
    assert frames_to_encode(image=False, video=False, condition_frames=indexes) == 0
