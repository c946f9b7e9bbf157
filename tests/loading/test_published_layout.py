"""A folder in the published Hub layout loads unchanged and generates what diffusers' pipeline does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import Cosmos3OmniPipeline, UniPCMultistepScheduler
from published_layout import (
    NEGATIVE_PROMPT,
    NEGATIVE_PROMPT_I2V,
    PLANS,
    corrupt,
    never_read_files,
    pickle_marker,
    write_published_checkpoint,
)
from tiny_models import diffusers_output, relative_error

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.feasibility import request_of
from cosmos3_offload.app.runner import LoadedModel, generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.checkpoint import model_configs_of
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.loading.layout import default_negative_prompt, pipeline_options, sound_config, sound_samples
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.groups import SOUND
from cosmos3_offload.planning.memory import peaks, weight_bytes
from cosmos3_offload.planning.plan import Plan

CPU = torch.device("cpu")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def published(published_checkpoint):
    """The session's published-layout folder (conftest.py), with sound; read-only here."""
    return published_checkpoint


def request(tmp_path, *, sound: bool, frames: int = 9, negative: str | None = None) -> GenerationConfig:
    return GenerationConfig(
        prompt=json.dumps({"scene": "a red fox runs through fresh snow", "camera": "tracking"}),
        negative_prompt=negative,
        frames=frames,
        resolution=256,
        steps=3,
        guidance=5.0,
        seed=11,
        sound=sound,
        output=tmp_path / ("o.jpg" if frames == 1 else "o.mp4"),
    )


def ours(folder, config, plan=None):
    loaded = LoadedModel.open(checkpoint=folder, device="cpu", plan=plan or Plan(), sound=config.sound)
    config = loaded.check(config)
    components = loaded.load(PhaseTimer(CPU))
    return config, components, generate_video(config, components, PhaseTimer(CPU), progress=False)


def theirs(folder, config):
    """The pipeline as the Cosmos3 docs set it up: from_pretrained, then the request's flow shift; its output
    (frames as floats, sound) and its latents after the last step, which `output_type="latent"` returns."""
    pipe = Cosmos3OmniPipeline.from_pretrained(folder, enable_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = UniPCMultistepScheduler.from_config(
        pipe.scheduler.config, flow_shift=config.flow_shift, use_karras_sigmas=False
    )
    latents = []

    def last_latents(pipe, index, t, tensors):
        if index == config.steps - 1:
            latents.append(tensors["latents"].float())
        return {}

    result = diffusers_output(
        pipe, config, output_type="np", enable_sound=config.sound, callback_on_step_end=last_latents
    )
    return result, latents[0]


@pytest.fixture(scope="module")
def resident_with_sound(published, tmp_path_factory):
    """ours() of the 9-frame request with sound, resident: (config, components, video)."""
    return ours(published, request(tmp_path_factory.mktemp("resident"), sound=True))


@pytest.mark.parametrize("sound", [False, True], ids=["video", "video+sound"])
def test_published_folder_matches_the_diffusers_pipeline(published, tmp_path, resident_with_sound, sound):
    """Latents, frames (and the waveform) equal `Cosmos3OmniPipeline.from_pretrained(folder)(...)`'s."""
    config, _, video = resident_with_sound if sound else ours(published, request(tmp_path, sound=False))
    result, latents = theirs(published, config)
    assert relative_error(video.latents, latents) <= TOLERANCE
    frames = np.asarray(result.video)
    assert video.frames.shape == frames.shape
    # The pipeline returns floats in [0, 1]; ours are those floats rounded to uint8.
    assert np.abs(video.frames.astype(np.float64) / 255 - frames).max() <= 1 / 255 + TOLERANCE
    if sound:
        assert video.sound is not None and video.sound.sample_rate == 200
        expected = result.sound.float().numpy()
        assert video.sound.waveform.shape == expected.shape
        assert relative_error(torch.from_numpy(video.sound.waveform), torch.from_numpy(expected)) <= TOLERANCE
    else:
        assert video.sound is None and result.sound is None


def test_every_plan_gives_the_resident_result_with_sound(published, tmp_path, resident_with_sound):
    """Resident, staged and streamed plans give bit-identical latents, frames and waveforms."""
    runs = {
        name: ours(published, request(tmp_path, sound=True), plan)[2]
        for name, plan in PLANS.items()
        if name != "resident"
    }
    base = runs["resident"] = resident_with_sound[2]
    for name, run in runs.items():
        assert torch.equal(run.latents, base.latents), name
        assert np.array_equal(run.frames, base.frames), name
        assert np.array_equal(run.sound.waveform, base.sound.waveform), name


def test_staged_sound_tokenizer_lives_on_the_host_and_never_loads_its_encoder(published, tmp_path):
    """With the VAE staged the sound decoder gets a host slab; the sound encoder's weights stay on meta."""
    components = load_components(published, CPU, torch.float32, PLANS["staged"], sound=True)
    placement = components.engine.placements[SOUND]
    assert placement.where == "staged" and placement.host_slabs
    assert components.sound_tokenizer.encoder is None
    assert all(not p.is_meta for p in components.sound_tokenizer.decoder.parameters())


def test_sound_is_loaded_only_when_asked_for(published):
    """Without sound the sound tokenizer is not built, and the action heads are never materialized."""
    components = load_components(published, CPU, torch.float32)
    assert components.sound_tokenizer is None and SOUND not in components.engine.placements
    action = [p for n, p in components.transformer.named_parameters() if n.startswith("action_")]
    assert action and all(p.is_meta for p in action)


def test_nothing_but_the_pipeline_parts_is_read(tmp_path):
    """vision_encoder/, root transformers files, example clips and pickles stay unopened: corrupted and
    unreadable, the folder still generates the same frames, and no pickle was unpickled."""
    folder = write_published_checkpoint(tmp_path / "hub")
    config = request(tmp_path, sound=True, frames=5)
    before = ours(folder, config)[2]
    untouched = never_read_files(folder)
    assert any(f.suffix == ".pth" for f in untouched) and any("vision_encoder" in f.parts for f in untouched)
    corrupt(untouched)
    after = ours(folder, config)[2]
    assert np.array_equal(before.frames, after.frames) and np.array_equal(before.sound.waveform, after.sound.waveform)
    assert not pickle_marker(folder).exists()


def test_default_negative_prompt_follows_the_docs(published, tmp_path):
    """No negative prompt: text-to-video takes assets/negative_prompt.json, conditioned runs the i2v one,
    an image none; each as the JSON text the docs pass."""
    assert default_negative_prompt(published, frames=9, conditioned=False) == json.dumps(NEGATIVE_PROMPT)
    assert default_negative_prompt(published, frames=9, conditioned=True) == json.dumps(NEGATIVE_PROMPT_I2V)
    assert default_negative_prompt(published, frames=1, conditioned=False) is None
    loaded = LoadedModel.open(checkpoint=published, device="cpu")
    assert loaded.check(request(tmp_path, sound=False)).negative_prompt == json.dumps(NEGATIVE_PROMPT)
    given = loaded.check(request(tmp_path, sound=False, negative="my own"))
    assert given.negative_prompt == "my own"


def test_sound_is_refused_without_a_sound_branch(tmp_path, published):
    """--sound on a folder without a sound tokenizer, or on the embedded model, is refused before loading."""
    silent = write_published_checkpoint(tmp_path / "silent", sound=False)
    for checkpoint in (silent, None):
        loaded = LoadedModel.open(checkpoint=checkpoint, device="cpu", sound=True)
        with pytest.raises(InputError, match="sound_tokenizer"):
            loaded.check(request(tmp_path, sound=True))
    with pytest.raises(InputError, match="opened without sound"):
        LoadedModel.open(checkpoint=published, device="cpu").check(request(tmp_path, sound=True))


def test_pipeline_options_come_from_the_indexes(tmp_path, published):
    """model_index.json's system-prompt and native-schedule switches and a modular index's distilled sigmas."""
    assert pipeline_options(published).use_system_prompt and not pipeline_options(published).distilled
    index = json.loads((published / "model_index.json").read_text())
    folder = tmp_path / "options"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({**index, "default_use_system_prompt": False, "use_native_flow_schedule": True})
    )
    (folder / "modular_model_index.json").write_text(json.dumps({"config": {"distilled_sigmas": [1.0, 0.75, 0.5]}}))
    options = pipeline_options(folder)
    assert not options.use_system_prompt and options.native_flow_schedule
    assert options.distilled_sigmas == (1.0, 0.75, 0.5)
    (folder / "modular_model_index.json").write_text(json.dumps({"distilled_sigmas": [0.5, 0.9]}))
    with pytest.raises(InputError, match="strictly falling"):
        pipeline_options(folder)


@pytest.mark.parametrize("name", ["resident", "staged"])
def test_planner_counts_the_sound_decoder_the_engine_allocates(published, tmp_path, name):
    """With sound the planner's weight bytes (resident, arena per group, host) are the engine's, and a
    staged generation's arena peak is the predicted one: the sound decoder is placed like the VAE."""
    plan = PLANS[name]
    sound = sound_config(published)
    sizes = model_sizes(*model_configs_of(published), dtype_bytes=4, sound_config=sound)
    predicted = weight_bytes(plan, sizes)
    components = load_components(published, CPU, torch.float32, plan, sound=True)
    engine = components.engine
    assert sizes.sound.payload > 0 and (predicted.arena[SOUND] > 0) == (name == "staged")
    for group, nbytes in predicted.arena.items():
        assert engine.placements[group].arena_bytes == nbytes, group
    assert predicted.resident == engine.resident_bytes
    assert predicted.pinned + predicted.host == engine.host_bytes
    config = request(tmp_path, sound=True, frames=5)
    generate_video(config, components, PhaseTimer(CPU), progress=False)
    assert engine.arena.peak_bytes == predicted.arena_peak
    # Without sound the sizes hold no sound decoder, and the decode part does not count one.
    silent = model_sizes(*model_configs_of(published), dtype_bytes=4)
    assert silent.sound.payload == 0 and SOUND not in weight_bytes(plan, silent).arena
    with_sound = request_of(config, sound)
    assert with_sound.sound_samples == sound_samples(sound, 5, config.fps) > 0
    # Resident, the decoder's weights add to the decode; staged, it fits the larger VAE's arena (and
    # its few activations come after the video's decode has freed more).
    extra = peaks(plan, sizes, with_sound).decode - peaks(plan, silent, request_of(config)).decode
    assert extra == (sizes.sound.payload if name == "resident" else 0)
