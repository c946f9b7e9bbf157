"""A generation that went wrong stops with one line and writes nothing; one that is cancelled during the
VAE decode stops there. Broken weights are simulated by filling one tensor of a loaded model with NaN."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import cosmos3_offload
from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.finite import check_finite
from cosmos3_offload.app.generate import Latents
from cosmos3_offload.app.runner import LoadedModel
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import InputError
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.planning.tiles import TileGrid

CPU = torch.device("cpu")
GRID = TileGrid(rows=2, cols=2)  # the decode in 4 tiles, as a tight budget's plan decodes


@pytest.fixture(scope="module")
def loaded(published_checkpoint) -> LoadedModel:
    """The tiny checkpoint with sound, loaded once on the CPU in float32, decoding in GRID's tiles."""
    model = LoadedModel.open(checkpoint=published_checkpoint, device="cpu", sound=True, plan=Plan(decode_grid=GRID))
    model.load(PhaseTimer(CPU))
    return model


@contextmanager
def poisoned(weight: torch.Tensor):
    """`weight` filled with NaN for the block, then restored (the model is shared by the module's tests)."""
    kept = weight.detach().clone()
    weight.data.fill_(float("nan"))
    try:
        yield
    finally:
        weight.data.copy_(kept)


def request(tmp_path, **fields) -> GenerationConfig:
    """A cheap request (an image; 5 frames with sound) whose output goes into an empty folder of its own."""
    (tmp_path / "out").mkdir()
    frames = 5 if fields.get("sound") else 1
    fields = {"prompt": "a fox", "frames": frames, "resolution": 256, "steps": 2, "guidance": 1.0, **fields}
    return GenerationConfig(output=tmp_path / "out" / ("fox.mp4" if frames > 1 else "fox.png"), **fields)


def refusal(loaded: LoadedModel, config: GenerationConfig, **hooks) -> str:
    """The one line `write` refuses `config` with; fails when anything was written."""
    with pytest.raises(InputError) as refused:
        loaded.write(config, PhaseTimer(CPU), progress=False, **hooks)
    assert list(config.output.parent.iterdir()) == [], "something was written"
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_nan_vae_weights_are_refused_not_written_as_a_black_video(loaded, tmp_path):
    """Fails when a VAE whose weights hold NaN writes a black video (exit 0) instead of refusing its frames."""
    with poisoned(loaded.components.vae.decoder.conv_out.bias):
        message = refusal(loaded, request(tmp_path))
    assert message.startswith("the VAE decoder's frames are not finite"), message
    assert "VAE weights" in message and "--dtype" not in message  # a float32 run: the weights, not the precision


def test_nan_sound_decoder_weights_are_refused_not_written_as_silence(loaded, tmp_path):
    """Fails when a sound decoder whose weights hold NaN gets its waveform muxed into the mp4."""
    with poisoned(loaded.components.sound_tokenizer.decoder.conv1.bias):
        message = refusal(loaded, request(tmp_path, sound=True))
    assert message.startswith("the sound decoder's waveform is not finite"), message
    assert "sound tokenizer weights" in message


def test_nan_transformer_weights_in_float32_blame_the_weights_not_the_precision(loaded, tmp_path):
    """Fails when a float32 run whose latents went NaN advises --dtype float32 (it is float32 already)."""
    with poisoned(loaded.components.transformer.proj_out.bias):
        message = refusal(loaded, request(tmp_path))
    assert message.startswith("the denoised latents are not finite"), message
    assert "float32 run" in message and "weights" in message and "--dtype float32" not in message


def test_non_finite_latents_in_a_narrow_dtype_still_advise_float32():
    """Fails when a bfloat16 run's non-finite latents lose the advice to try float32 (an overflow is likely there)."""
    vision = torch.zeros(1, 4, 2, 3, 3)
    vision[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(InputError, match=r"use --dtype float32 \(if it persists, the checkpoint's weights"):
        check_finite(Latents(vision), torch.bfloat16)


class Stopped(Exception):
    """What a server's cancellation raises from a hook."""


def test_a_decode_hook_that_raises_stops_the_run_before_anything_is_written(loaded, tmp_path):
    """Fails when a request cancelled during the VAE decode keeps decoding, swallows the hook's exception or
    writes a file: the hook's first call (the decode's first piece, after the last step) ends the run."""
    steps, calls = [], []

    def stop() -> None:
        calls.append(len(steps))
        raise Stopped

    config = request(tmp_path)
    with pytest.raises(Stopped):
        loaded.write(config, PhaseTimer(CPU), progress=False, on_step=steps.append, on_decode_tile=stop)
    assert calls == [config.steps], "the hook ran once, after denoising"
    assert list(config.output.parent.iterdir()) == []


def test_the_decode_hook_is_called_at_every_tile(loaded, tmp_path):
    """Fails when the hook is not called during a decode, or not at each of the plan's tiles."""
    calls = []
    config = request(tmp_path)
    loaded.write(config, PhaseTimer(CPU), progress=False, on_decode_tile=lambda: calls.append(1))
    assert config.output.exists()
    assert len(calls) >= GRID.rows * GRID.cols


def test_nan_vae_weights_are_refused_through_enable(published_checkpoint):
    """Fails when a diffusers call under enable() returns the black frames of a NaN VAE instead of the CLI's refusal."""
    from diffusers import Cosmos3OmniPipeline

    pipe = Cosmos3OmniPipeline.from_pretrained(published_checkpoint, enable_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.decoder.conv_out.bias.data.fill_(float("nan"))
    cosmos3_offload.enable(pipe)
    call = {"prompt": "a fox", "num_frames": 1, "height": 192, "width": 320, "num_inference_steps": 2}
    with pytest.raises(InputError, match="the VAE decoder's frames are not finite"):
        pipe(**call, guidance_scale=1.0, enable_safety_check=False, generator=torch.Generator().manual_seed(0))
