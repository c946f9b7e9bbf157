"""`cosmos3_offload.enable(pipe)`: a diffusers pipeline, placed by us, returns what it returned unpatched."""

from __future__ import annotations

import gc
import inspect
import weakref

import numpy as np
import pytest
import torch
from diffusers import Cosmos3OmniPipeline, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipelineOutput
from PIL import Image
from published_layout import PLANS, write_published_checkpoint
from tiny_models import relative_error

import cosmos3_offload
from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.planned_request import cached_hiddens
from cosmos3_offload.app.runner import LoadedModel, generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import InputError
from cosmos3_offload.integration.budget import BudgetPlan
from cosmos3_offload.integration.offloaded_pipeline import OffloadedCosmos3OmniPipeline
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.loading.quantization import Fp8Options
from cosmos3_offload.planning.plan import GroupPlan, Mode, Plan

CPU = torch.device("cpu")
TOLERANCE = 1e-4  # the published-layout parity test's
FRAME_TOLERANCE = 1 / 255 + TOLERANCE  # ours are rounded to 8 bits, diffusers' are not
CALL = {
    "prompt": "a red fox runs through fresh snow, tracking shot",
    "num_frames": 9,
    "height": 192,
    "width": 320,
    "num_inference_steps": 3,
    "guidance_scale": 5.0,
    "enable_safety_check": False,
}
SEED = 11
# Plans the tiny model is run under besides resident; "budget" is the planner's pick for 128 MiB: the
# reasoner streamed, the generator and the VAE staged, the decode in tiles.
PLACED = {
    "staged": {"offload_stages": ["reasoner", "generator", "vae"]},
    "streamed": {"plan": PLANS["streamed"]},
    "budget": {"vram_budget": "128MiB", "max_frames": 9, "max_height": 192, "max_width": 320},
}


def generator() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(SEED)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_published_checkpoint(tmp_path_factory.mktemp("hub") / "Cosmos3-Nano")


def load(folder) -> Cosmos3OmniPipeline:
    pipe = Cosmos3OmniPipeline.from_pretrained(folder, enable_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(folder):
    """The unpatched pipeline's outputs: latents, frames, and frames with sound; and its generator after a call."""
    pipe = load(folder)
    used = generator()
    latent = pipe(**CALL, generator=used, output_type="latent").video
    return {
        "latent": latent,
        "generator_after": used.get_state(),
        "np": pipe(**CALL, generator=generator(), output_type="np").video,
        "sound": pipe(**CALL, generator=generator(), output_type="np", enable_sound=True),
    }


@pytest.fixture(scope="module")
def resident(folder):
    return cosmos3_offload.enable(load(folder))


@pytest.fixture(scope="module")
def budgeted(folder):
    return cosmos3_offload.enable(load(folder), **PLACED["budget"])


def assert_frames_match(frames: np.ndarray, expected: np.ndarray) -> None:
    assert frames.shape == expected.shape and frames.dtype == expected.dtype
    assert np.abs(frames - expected).max() <= FRAME_TOLERANCE


def test_resident_latents_and_noise_draws_match_the_unpatched_pipeline(resident, reference):
    """Latents equal diffusers', and the caller's generator ends where diffusers' call leaves it."""
    used = generator()
    latents = resident(**CALL, generator=used, output_type="latent").video
    assert latents.shape == reference["latent"].shape
    assert relative_error(latents, reference["latent"]) <= TOLERANCE
    assert torch.equal(used.get_state(), reference["generator_after"])


@pytest.mark.parametrize("output_type", ["np", "pt", "pil"])
def test_every_output_type_is_diffusers_own(resident, reference, output_type):
    """np, pt and pil videos have diffusers' types, layouts and values (within one 8-bit level)."""
    result = resident(**CALL, generator=generator(), output_type=output_type)
    assert isinstance(result, Cosmos3OmniPipelineOutput) and result.sound is None and result.action is None
    expected = reference["np"]
    if output_type == "np":
        assert_frames_match(result.video, expected)
    elif output_type == "pt":
        assert isinstance(result.video, torch.Tensor) and result.video.shape == (9, 3, 192, 320)
        assert_frames_match(result.video.permute(0, 2, 3, 1).numpy(), expected)
    else:
        assert len(result.video) == 9 and all(isinstance(frame, Image.Image) for frame in result.video)
        frames = np.stack([np.asarray(frame) for frame in result.video]).astype(np.int16)
        assert np.abs(frames - np.round(expected * 255)).max() <= 1


def test_return_dict_false_gives_the_video_and_sound_tuple(resident):
    """return_dict=False returns (video, sound), as diffusers does."""
    video, sound = resident(**CALL, generator=generator(), output_type="latent", return_dict=False)
    assert isinstance(video, torch.Tensor) and sound is None


@pytest.mark.parametrize("name", list(PLACED))
def test_offloaded_plans_match_the_unpatched_pipeline(folder, reference, resident, budgeted, name):
    """Staged, streamed and a budget's plan (streamed, staged, tiled decode) give diffusers' frames; staged and
    streamed give exactly the resident frames."""
    pipe = budgeted if name == "budget" else cosmos3_offload.enable(load(folder), **PLACED[name])
    assert pipe.offload.plan.moves_weights
    frames = pipe(**CALL, generator=generator(), output_type="np").video
    assert_frames_match(frames, reference["np"])
    if name != "budget":
        assert np.array_equal(frames, resident(**CALL, generator=generator(), output_type="np").video)


def test_budget_plan_streams_stages_and_tiles(budgeted):
    """128 MiB does not hold the resident plan's decode: the planner moved the towers and tiled the decode."""
    plan = budgeted.offload.plan
    assert plan.reasoner.mode is Mode.STREAMED and plan.vae.mode is Mode.STAGED
    assert plan.decode_grid.rows * plan.decode_grid.cols > 1
    assert "predicted peak" in budgeted.offload.summary()


def test_sound_matches_the_unpatched_pipeline_when_staged(folder, reference):
    """With sound, a staged pipeline's frames and waveform equal diffusers'."""
    pipe = cosmos3_offload.enable(load(folder), **PLACED["staged"])
    result = pipe(**CALL, generator=generator(), output_type="np", enable_sound=True)
    expected = reference["sound"]
    assert_frames_match(result.video, expected.video)
    assert isinstance(result.sound, torch.Tensor) and result.sound.shape == expected.sound.shape
    assert relative_error(result.sound, expected.sound) <= TOLERANCE


@pytest.mark.parametrize("scheduler", ["unipc shift 7", "euler shift 2"])
def test_the_users_scheduler_is_the_one_that_runs(folder, scheduler):
    """The scheduler the user sets on the pipeline (here after enable(), on a pipeline called before) is the one
    stepped, as diffusers steps it: a UniPC of another shift, or another class altogether."""
    config = UniPCMultistepScheduler.load_config(folder / "scheduler")

    def configured() -> UniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler:
        if scheduler.startswith("unipc"):
            return UniPCMultistepScheduler.from_config(config, flow_shift=7.0)
        return FlowMatchEulerDiscreteScheduler(shift=2.0)

    pipe = load(folder)
    pipe.scheduler = configured()
    expected = pipe(**CALL, generator=generator(), output_type="latent").video
    cosmos3_offload.enable(pipe, offload_stages=["generator"])  # a pipeline called before is enabled as well
    pipe.scheduler = configured()  # a fresh one, set after enable()
    latents = pipe(**CALL, generator=generator(), output_type="latent").video
    assert relative_error(latents, expected) <= TOLERANCE


def test_image_to_video_matches_the_unpatched_pipeline(folder, resident):
    """An image anchors latent frame 0 exactly as in diffusers."""
    pixels = torch.Generator().manual_seed(3)
    image = Image.fromarray(torch.randint(0, 256, (200, 300, 3), generator=pixels, dtype=torch.uint8).numpy())
    expected = load(folder)(**CALL, image=image, generator=generator(), output_type="latent").video
    latents = resident(**CALL, image=image, generator=generator(), output_type="latent").video
    assert relative_error(latents, expected) <= TOLERANCE


def test_fp8_placement_gives_the_clis_quantized_video(folder, tmp_path):
    """quantize="fp8": the decoder layers' linears hold FP8 weights, and the latents are exactly those of
    our own run of the folder with --quantize fp8 (the same rounding of the same weights)."""
    config = cli_request(tmp_path, steps=3)
    components = load_components(folder, CPU, torch.float32, fp8=Fp8Options(quantize="fp8"))
    expected = generate_video(config, components, PhaseTimer(CPU), progress=False).latents
    pipe = cosmos3_offload.enable(load(folder), quantize="fp8", offload_stages=["generator"])
    latents = pipe(**CALL, generator=generator(), output_type="latent").video
    assert torch.equal(latents, expected)
    assert pipe.transformer.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    assert "generator W8A16 x3" in pipe.offload.summary()


def cli_request(tmp_path, **fields) -> GenerationConfig:
    """`CALL` as the CLI asks for it (320x192 is resolution 256's 16:9)."""
    config = GenerationConfig(
        prompt=CALL["prompt"], frames=9, resolution=256, guidance=5.0, seed=SEED, output=tmp_path / "o.mp4", **fields
    )
    assert (config.width, config.height) == (CALL["width"], CALL["height"])
    return config


def test_the_step_cache_reuses_the_clis_steps_and_gives_its_latents(folder, tmp_path):
    """enable(cache="seacache", cache_threshold=1) on a streamed generator skips the very steps the CLI's
    --cache seacache --cache-threshold 1 skips (some of them), and its latents equal the CLI's."""
    config = cli_request(tmp_path, steps=5, cache="seacache", cache_threshold=1.0)
    components = load_components(folder, CPU, torch.float32)
    expected = generate_video(config, components, PhaseTimer(CPU), progress=False)
    pipe = cosmos3_offload.enable(load(folder), plan=PLANS["streamed"], cache="seacache", cache_threshold=1.0)
    latents = pipe(**{**CALL, "num_inference_steps": 5}, generator=generator(), output_type="latent").video
    cache = pipe.offload.last_call.step_cache
    assert cache.reused > 0 and cache.decisions == expected.step_cache.decisions
    assert relative_error(latents, expected.latents) <= TOLERANCE
    assert "seacache (threshold 1): 3 of 5 steps computed, 2 reused" in pipe.offload.summary()


def test_step_cache_settings_are_checked_as_the_clis(folder):
    """An unknown cache, or a threshold without seacache or out of range, is the CLI's InputError at enable()."""
    for arguments, message in [
        ({"cache": "teacache"}, "teacache"),
        ({"cache_threshold": 0.5}, "seacache too"),
        ({"cache": "seacache", "cache_threshold": -1.0}, "cache threshold"),
    ]:
        with pytest.raises(InputError, match=message):
            cosmos3_offload.enable(load(folder), **arguments)


def test_a_budgeted_call_is_predicted_with_the_step_caches_residuals(folder, monkeypatch):
    """Under a budget, a call with the step cache is checked holding the cache's residuals, as the CLI's request is."""
    pipe = cosmos3_offload.enable(load(folder), **PLACED["budget"], cache="seacache")
    checked = []

    def spy(self, request, **options):
        checked.append(request)
        raise InputError("checked")

    monkeypatch.setattr(BudgetPlan, "check_call", spy)
    with pytest.raises(InputError, match="checked"):
        pipe(**CALL, generator=generator(), output_type="latent")
    assert checked[0].cached_hiddens == cached_hiddens("seacache", None) > 0


def test_latents_gone_nan_are_refused_as_the_cli_refuses_them(folder, tmp_path):
    """A NaN weight: enable()'s call raises the CLI's InputError instead of returning black frames, and the
    CLI's LoadedModel.write raises the same one and writes nothing."""
    pipe = load(folder)
    pipe.transformer.proj_out.bias.data.fill_(float("nan"))
    cosmos3_offload.enable(pipe, offload_stages=["generator"])
    with pytest.raises(InputError, match="latents are not finite") as through_enable:
        pipe(**CALL, generator=generator(), output_type="np")
    loaded = LoadedModel.open(checkpoint=folder, device="cpu")
    timer = PhaseTimer(CPU)
    loaded.load(timer).transformer.proj_out.bias.data.fill_(float("nan"))
    config = cli_request(tmp_path, steps=3)
    with pytest.raises(InputError) as through_cli:
        loaded.write(config, timer, progress=False)
    assert str(through_cli.value) == str(through_enable.value)
    assert not config.output.exists()


def test_a_diverging_scheduler_is_refused_whatever_the_output_type(folder):
    """The user's scheduler stepping to infinity is an InputError, for latents as for frames."""

    class Diverging(UniPCMultistepScheduler):
        def step(self, *args, **kwargs):
            sample = super().step(*args, **kwargs)[0]
            return (torch.full_like(sample, float("inf")),)

    pipe = cosmos3_offload.enable(load(folder))
    pipe.scheduler = Diverging.from_config(pipe.scheduler.config)
    for output_type in ("latent", "pil"):
        with pytest.raises(InputError, match="latents are not finite"):
            pipe(**CALL, generator=generator(), output_type=output_type)


def test_resident_on_the_device_they_are_on_keeps_the_weights_tensors(folder):
    """Resident on the device the weights are on, an aligned weight keeps its storage (nothing copied, as
    after `pipe.to("cuda")`), a weight at a file's byte offset is copied into an aligned home and its old
    tensor freed, and the weights generation never reads are released to meta (the action heads are read:
    placed with the generator, for action calls)."""
    pipe = load(folder)
    aligned = {}
    for name, param in list(pipe.transformer.named_parameters())[::2]:  # every other one: a fresh allocation
        param.data = param.data.clone()
        aligned[name] = param.data_ptr()
    unaligned = {n: weakref.ref(p) for n, p in pipe.transformer.named_parameters() if p.data_ptr() % 64}
    assert unaligned and aligned and all(pointer % 64 == 0 for pointer in aligned.values())
    cosmos3_offload.enable(pipe, device="cpu")
    gc.collect()
    after = dict(pipe.transformer.named_parameters())
    released = [name for name, p in after.items() if p.is_meta]
    assert any(name.startswith("lm_head.") for name in released)
    assert not any(name.startswith("action_") for name in released)
    assert all(after[name].data_ptr() == pointer for name, pointer in aligned.items() if name not in released)
    assert all(ref() is None for ref in unaligned.values())
    assert all(p.data_ptr() % 64 == 0 for p in after.values() if not p.is_meta)


def test_staged_weights_live_only_in_their_host_slabs(folder):
    """Staged, every original tensor is freed and every weight's storage lies in a host slab: one copy, and the
    decoded sound still equals diffusers' (test_sound_matches...)."""
    pipe = load(folder)
    parts = [pipe.transformer, pipe.vae, pipe.sound_tokenizer]
    originals = [weakref.ref(p) for part in parts for p in part.parameters()]
    cosmos3_offload.enable(pipe, **PLACED["staged"])
    gc.collect()
    assert originals and all(ref() is None for ref in originals)
    slabs = [s.buffer for p in pipe.offload.engine.placements.values() for s in p.host_slabs]
    ranges = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in slabs]
    placed = [p for part in parts for p in part.parameters() if not p.is_meta]
    assert placed and all(any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in placed)
    # weight_norm's load-time copies of the sound tokenizer's convolutions are gone too (recomputed when used)
    computed = [m.weight for m in pipe.sound_tokenizer.modules() if hasattr(m, "weight_g")]
    assert computed and all(w.is_meta for w in computed)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"action": object()}, "action must be a diffusers CosmosActionCondition"),
        ({"action_latents": torch.zeros(3, 6)}, "action_latents start an action call's actions"),
        ({"mixed_precision_format": "fp8"}, "mixed_precision_format"),
        ({"prompt": ["a fox", "a cat"]}, "prompt is a list of 2"),
        ({"negative_prompt": ["blurry", "dark"]}, "negative_prompt is a list of 2"),
        ({"output_type": "mp4"}, "output_type"),
        ({"condition_video_keep": "last"}, "condition_video_keep"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"latents": torch.zeros(1, 4, 3, 12, 20)}, "latents have shape"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_arguments_the_split_cannot_honour_are_refused_by_name(resident, arguments, named):
    """Each argument the split does not honour is an InputError naming it, never silently ignored."""
    with pytest.raises(InputError, match=named):
        resident(**{**CALL, "output_type": "latent", **arguments}, generator=generator())


def test_diffusers_own_checks_still_apply(resident):
    """What diffusers refuses (a height off the VAE grid) it still refuses, with its own message."""
    with pytest.raises(ValueError, match="multiples of 16"):
        resident(**{**CALL, "height": 100}, output_type="latent")


def test_a_call_over_the_budget_is_refused_before_it_runs(budgeted):
    """Planned for 9 frames at 320x192, a 832x480 call does not fit 128 MiB: refused with the numbers."""
    with pytest.raises(InputError, match=r"832x480\) needs about .* GiB .* the 0.12 GiB budget leaves"):
        budgeted(**{**CALL, "height": 480, "width": 832}, output_type="latent")


def test_enable_refuses_what_it_cannot_place(folder, resident):
    """Conflicting placements, unreadable budgets, budgets nothing fits, a mapped reasoner, a pipeline placed
    twice, and moving the placed weights afterwards are InputErrors."""
    pipe = load(folder)
    refusals = [
        ({"vram_budget": "8GiB", "offload_stages": ["vae"]}, "not several"),
        ({"host_budget": "8GiB"}, "host_budget goes with vram_budget"),
        ({"vram_budget": "lots"}, "cannot read the budget"),
        ({"vram_budget": True}, "vram_budget must be"),
        ({"vram_budget": "1MiB"}, "nothing fits"),
        (
            {"plan": Plan(reasoner=GroupPlan(mode=Mode.MAPPED))},
            r"loaded pipeline's weights have none: stream or stage the reasoner instead$",
        ),
        ({"offload_stages": ["text_encoder"]}, "unknown offload stage"),
        ({"max_frames": 0, "vram_budget": "8GiB"}, "max_frames"),
        ({"quantize": "int4"}, "unknown --quantize"),
        ({"fp8_mode": "w8a8"}, "fp8_mode and fp8_scales apply to FP8 weights"),
    ]
    for arguments, message in refusals:
        with pytest.raises(InputError, match=message):
            cosmos3_offload.enable(pipe, **arguments)
    assert type(pipe) is Cosmos3OmniPipeline and not any(p.is_meta for p in pipe.transformer.parameters())
    with pytest.raises(InputError, match="enabled already"):
        cosmos3_offload.enable(resident)
    with pytest.raises(InputError, match="takes a diffusers Cosmos3OmniPipeline"):
        cosmos3_offload.enable(pipe.transformer)
    with pytest.raises(InputError, match="placed this pipeline's weights"):
        resident.to("cpu")


def test_a_module_swapped_after_enable_is_refused(folder):
    """A component replaced after enable() was never placed: the call says so instead of running it."""
    pipe = cosmos3_offload.enable(load(folder))
    pipe.sound_tokenizer = None
    with pytest.raises(InputError, match="replaced after cosmos3_offload.enable"):
        pipe(**CALL, output_type="latent")


def test_the_patched_call_takes_exactly_diffusers_arguments():
    """Same parameter names, order and defaults as `Cosmos3OmniPipeline.__call__` (diffusers 0.42.1)."""
    ours = inspect.signature(OffloadedCosmos3OmniPipeline.__call__)
    theirs = inspect.signature(Cosmos3OmniPipeline.__call__)
    assert [(p.name, p.default) for p in ours.parameters.values()] == [
        (p.name, p.default) for p in theirs.parameters.values()
    ]
