"""`enable(pipe)` and diffusers' `callback_on_step_end`: the callback sees what the unpatched pipeline's sees,
step by step, what it returns goes on, and `pipe._interrupt` stops the loop where diffusers stops it."""

from __future__ import annotations

import pytest
import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.callbacks import PipelineCallback
from tiny_models import relative_error

import cosmos3_offload

TOLERANCE = 1e-4
CALL = {
    "prompt": "a red fox runs through fresh snow",
    "num_frames": 9,
    "height": 192,
    "width": 320,
    "num_inference_steps": 4,
    "guidance_scale": 5.0,
    "output_type": "latent",
    "enable_safety_check": False,
}


def load(folder) -> Cosmos3OmniPipeline:
    pipe = Cosmos3OmniPipeline.from_pretrained(folder, enable_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(published_checkpoint):
    """(the unpatched pipeline, the same weights under enable())."""
    return load(published_checkpoint), cosmos3_offload.enable(load(published_checkpoint))


class Recorder:
    """A callback that records (step, timestep, latents, the pipe's num_timesteps and guidance) and, at given
    steps, scales the latents or sets the pipeline's interrupt."""

    def __init__(self, scale_at: int | None = None, stop_at: int | None = None):
        self.seen: list[tuple[int, float, torch.Tensor, int, float]] = []
        self.scale_at, self.stop_at = scale_at, stop_at

    def __call__(self, pipe, index, t, tensors):
        latents = tensors["latents"]
        self.seen.append((index, float(t), latents.clone(), pipe.num_timesteps, pipe.guidance_scale))
        if index == self.stop_at:
            pipe._interrupt = True
        if index == self.scale_at:
            return {"latents": latents * 0.5}
        return {}


def run(pipe, seed: int, callback):
    return pipe(**CALL, generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=callback).video


@pytest.mark.parametrize(
    "scale_at, stop_at", [(None, None), (1, None), (None, 1)], ids=["watch", "change-latents", "stop-early"]
)
def test_the_callback_sees_and_steers_what_the_unpatched_pipelines_does(pipes, scale_at, stop_at):
    plain, enabled = pipes
    theirs, ours = Recorder(scale_at, stop_at), Recorder(scale_at, stop_at)
    expected = run(plain, 3, theirs)
    got = run(enabled, 3, ours)
    assert [s[0] for s in ours.seen] == [s[0] for s in theirs.seen]
    assert len(ours.seen) == (2 if stop_at == 1 else CALL["num_inference_steps"])
    for mine, reference in zip(ours.seen, theirs.seen):
        assert mine[1] == reference[1] and mine[3:] == reference[3:]
        assert relative_error(mine[2], reference[2]) <= TOLERANCE
    assert relative_error(got, expected) <= TOLERANCE
    assert enabled._interrupt == (stop_at is not None)  # as diffusers leaves it, until the next call


def test_a_pipeline_callback_brings_its_own_tensor_inputs(pipes):
    """A PipelineCallback's `tensor_inputs` are what it gets, as diffusers passes them."""
    _, enabled = pipes

    class Halve(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return {"latents": callback_kwargs["latents"] * 0.5} if step_index == 0 else {}

    halved = run(enabled, 4, Halve(cutoff_step_ratio=None, cutoff_step_index=0))
    plain = run(enabled, 4, None)
    assert not torch.equal(halved, plain)


def test_tensor_inputs_the_pipeline_does_not_have_are_refused_by_diffusers_own_check(pipes):
    _, enabled = pipes
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        enabled(**CALL, callback_on_step_end=Recorder(), callback_on_step_end_tensor_inputs=["prompt_embeds"])
