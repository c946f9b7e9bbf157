"""A distilled (4-step) checkpoint samples as diffusers' `Cosmos3DistilledModularPipeline` does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer, FlowMatchEulerDiscreteScheduler
from diffusers.modular_pipelines.cosmos import Cosmos3DistilledBlocks
from PIL import Image
from published_layout import DISTILLED_SIGMAS, write_published_checkpoint
from tiny_models import relative_error
from transformers import AutoTokenizer

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.inputs import read_frames
from cosmos3_offload.app.runner import LoadedModel, generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import InputError

CPU = torch.device("cpu")
TOLERANCE = 1e-4
STEPS = len(DISTILLED_SIGMAS)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return write_published_checkpoint(tmp_path_factory.mktemp("hub") / "Cosmos3-Super-4Step", distilled=True)


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 260, 3), dtype=np.uint8)).save(path)
    return path


def modular_latents(folder, config, image=None):
    """diffusers' distilled modular pipeline over the folder's own components."""
    pipe = Cosmos3DistilledBlocks().init_pipeline()
    pipe.update_components(
        transformer=Cosmos3OmniTransformer.from_pretrained(folder / "transformer").eval(),
        vae=AutoencoderKLWan.from_pretrained(folder / "vae").eval(),
        text_tokenizer=AutoTokenizer.from_pretrained(folder / "text_tokenizer"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
    )
    pipe.register_to_config(distilled_sigmas=DISTILLED_SIGMAS, enable_safety_checker=False)
    extra = {} if image is None else {"image": image}
    out = pipe(
        prompt=config.prompt,
        num_frames=config.frames,
        height=config.height,
        width=config.width,
        fps=config.fps,
        generator=torch.Generator("cpu").manual_seed(config.seed),
        output=["latents"],
        **extra,
    )
    return out["latents"] if isinstance(out, dict) else out


def request(tmp_path, **extra) -> GenerationConfig:
    fields = {"prompt": "a red fox in snow", "frames": 9, "resolution": 256, "steps": STEPS, "guidance": 1.0}
    return GenerationConfig(**fields, seed=5, output=tmp_path / "o.mp4", **extra)


@pytest.mark.parametrize("mode", ["text", "image"])
def test_distilled_sampling_equals_the_modular_pipeline(student, tmp_path, picture, mode):
    """Fixed sigmas, stochastic Euler steps from the request's generator and (image-to-video) the
    conditioned frame put back after every step: latents within 1e-4 of diffusers'."""
    config = request(tmp_path, **({"image": picture} if mode == "image" else {}))
    loaded = LoadedModel.open(checkpoint=student, device="cpu")
    config = loaded.check(config)
    conditioning = read_frames(config.image, None, config.condition_frames)
    components = loaded.load(PhaseTimer(CPU))
    ours = generate_video(config, components, PhaseTimer(CPU), progress=False, conditioning=conditioning).latents
    theirs = modular_latents(student, config, None if conditioning is None else conditioning.image)
    assert ours.shape == theirs.shape
    assert relative_error(ours, theirs) <= TOLERANCE


def test_distilled_runs_only_its_own_schedule(student, tmp_path):
    """Another step count or a guidance scale is refused before loading, naming the fix."""
    loaded = LoadedModel.open(checkpoint=student, device="cpu")
    for bad in ({"steps": 35}, {"guidance": 6.0}):
        config = GenerationConfig(**{**request(tmp_path).__dict__, **bad})
        with pytest.raises(InputError, match=f"--steps {STEPS} --guidance 1"):
            loaded.check(config)
