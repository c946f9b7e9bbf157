"""`enable(pipe)` and the action modes: `pipe(action=CosmosActionCondition(...))` returns what the unpatched
pipeline returns (video latents or frames, predicted actions, the tuple form), every plan gives the resident
actions bit for bit, and what an action call cannot be is refused in one line."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipelineOutput, CosmosActionCondition
from PIL import Image
from published_layout import PLANS
from tiny_models import relative_error

import cosmos3_offload
from cosmos3_offload.errors import InputError
from cosmos3_offload.integration.budget import BudgetPlan, pipeline_sizes
from cosmos3_offload.integration.call import read_call
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.actions import ACTION_TIERS, ACTION_WIDTHS, decoded_frames
from cosmos3_offload.model.geometry import generator_tokens

TOLERANCE = 1e-4
FRAME_TOLERANCE = 1 / 255 + TOLERANCE  # ours are rounded to 8 bits, diffusers' are not
CALL = {
    "prompt": "the gripper picks up the red cup",
    "num_inference_steps": 2,
    "guidance_scale": 5.0,
    "enable_safety_check": False,
}
# (mode, domain, chunk, seed, extra call arguments): two seeds a mode, chunks 4 and 6, sound with one.
CASES = [
    ("policy", "bridge_orig_lerobot", 4, 1, {}),
    ("policy", "pusht", 6, 2, {"enable_sound": True}),
    ("forward_dynamics", "av", 4, 3, {}),
    ("forward_dynamics", "pusht", 6, 4, {"negative_prompt": "blurry"}),
    ("inverse_dynamics", "galbot", 6, 5, {}),
    ("inverse_dynamics", "bridge_orig_lerobot", 4, 6, {}),
]


def load(folder) -> Cosmos3OmniPipeline:
    pipe = Cosmos3OmniPipeline.from_pretrained(folder, enable_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def folder(published_checkpoint):
    return published_checkpoint


@pytest.fixture(scope="module")
def plain(folder):
    return load(folder)


@pytest.fixture(scope="module")
def resident(folder):
    return cosmos3_offload.enable(load(folder))


def condition(mode: str, domain: str, chunk: int, **fields) -> CosmosActionCondition:
    """A 200x300 frame (policy, forward dynamics) or a 9-frame 176x240 clip (inverse dynamics), at tier 256;
    forward dynamics follows 3 rows of the domain's width (the last repeats)."""
    rng = np.random.default_rng(7)
    if mode == "inverse_dynamics":
        frames = [Image.fromarray(rng.integers(0, 255, (176, 240, 3), dtype=np.uint8)) for _ in range(9)]
        fields = {"video": frames} | fields
    else:
        fields = {"image": Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))} | fields
    if mode == "forward_dynamics" and "raw_actions" not in fields:
        fields["raw_actions"] = torch.from_numpy(rng.standard_normal((3, ACTION_WIDTHS[domain])).astype(np.float32))
    return CosmosActionCondition(mode=mode, chunk_size=chunk, domain_name=domain, resolution_tier=256, **fields)


def run(pipe, mode, domain, chunk, seed, output_type="latent", **extra):
    action = condition(mode, domain, chunk)
    return pipe(**CALL, **extra, action=action, generator=generator(seed), output_type=output_type)


@pytest.mark.parametrize("mode, domain, chunk, seed, extra", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_each_mode_equals_the_unpatched_pipeline(plain, resident, mode, domain, chunk, seed, extra):
    """Fails when an enabled pipeline's video latents, sound or predicted actions (shape: the chunk x the domain's
    width; None for forward dynamics) differ from diffusers' by more than 1e-4."""
    expected = run(plain, mode, domain, chunk, seed, **extra)
    result = run(resident, mode, domain, chunk, seed, **extra)
    assert isinstance(result, Cosmos3OmniPipelineOutput)
    assert result.video.shape == expected.video.shape
    assert relative_error(result.video, expected.video) <= TOLERANCE
    if extra.get("enable_sound"):
        assert relative_error(result.sound, expected.sound) <= TOLERANCE
    if mode == "forward_dynamics":
        assert result.action is None and expected.action is None
        return
    (actions,), (theirs,) = result.action, expected.action
    assert actions.dtype == torch.float32 and actions.shape == (chunk, ACTION_WIDTHS[domain]) == theirs.shape
    assert relative_error(actions, theirs) <= TOLERANCE


def test_frames_equal_the_unpatched_pipelines(plain, resident):
    """Fails when an action call's decoded frames (the content's size, 4*(chunk//4)+1 of them) differ from
    diffusers' by more than an 8-bit level."""
    expected = run(plain, "policy", "pusht", 6, 8, output_type="np")
    result = run(resident, "policy", "pusht", 6, 8, output_type="np")
    assert result.video.shape == expected.video.shape and result.video.shape[0] == decoded_frames(6)
    assert np.abs(result.video - expected.video).max() <= FRAME_TOLERANCE
    assert relative_error(result.action[0], expected.action[0]) <= TOLERANCE


@pytest.mark.parametrize("mode", ["policy", "forward_dynamics"])
def test_return_dict_false_gives_video_sound_and_actions(plain, resident, mode):
    """Fails when the tuple form of an action call is not diffusers' (video, sound, action), or holds other
    actions than the dict form."""
    video, sound, action = run(resident, mode, "bridge_orig_lerobot", 4, 9, return_dict=False)
    output = run(resident, mode, "bridge_orig_lerobot", 4, 9)
    assert sound is None and torch.equal(video, output.video)
    if mode == "forward_dynamics":
        theirs = run(plain, mode, "bridge_orig_lerobot", 4, 9, return_dict=False)
        assert len(theirs) == 3 and action is None and theirs[2] is None
    else:
        assert len(action) == 1 and torch.equal(action[0], output.action[0])


@pytest.mark.parametrize("name", ["staged", "streamed"])
def test_staged_and_streamed_plans_give_the_resident_actions(folder, resident, name):
    """Fails when a plan that moves the weights (the action heads with the generator) changes a bit of the
    video latents or the predicted actions."""
    placement = {"offload_stages": ["reasoner", "generator", "vae"]} if name == "staged" else {"plan": PLANS[name]}
    pipe = cosmos3_offload.enable(load(folder), **placement)
    assert pipe.offload.plan.moves_weights
    for mode in ("policy", "inverse_dynamics"):
        result = run(pipe, mode, "galbot", 4, 10)
        base = run(resident, mode, "galbot", 4, 10)
        assert torch.equal(result.video, base.video) and torch.equal(result.action[0], base.action[0]), mode


def test_given_action_latents_start_as_they_are(plain, resident):
    """Fails when `action_latents=` is not where an action call's actions start, as in diffusers."""
    start = torch.randn(4, plain.transformer.config.action_dim, generator=generator(1))
    expected = run(plain, "policy", "pusht", 4, 2, action_latents=start.clone())
    result = run(resident, "policy", "pusht", 4, 2, action_latents=start.clone())
    assert relative_error(result.action[0], expected.action[0]) <= TOLERANCE
    assert not torch.allclose(result.action[0], run(resident, "policy", "pusht", 4, 2).action[0])


def test_a_budgeted_action_call_counts_its_tokens_and_heads(folder, monkeypatch):
    """Fails when a budget's check of an action call leaves out the action tokens or counts the video at less than
    the canvas, or the planner's sizes leave out the action heads enable() places."""
    pipe = cosmos3_offload.enable(load(folder), vram_budget="1GiB", max_frames=9, max_height=320, max_width=320)
    checked = []

    def spy(self, request, **options):
        checked.append((request, options))
        raise InputError("checked")

    monkeypatch.setattr(BudgetPlan, "check_call", spy)
    with pytest.raises(InputError, match="checked"):
        run(pipe, "policy", "pusht", 6, 1)
    request, options = checked[0]
    height, width = ACTION_TIERS[256]["16,9"]  # the 200x300 frame's canvas
    assert options == {"action": True} and (request.frames, request.height, request.width) == (7, height, width)
    assert request.tokens == generator_tokens(7, height, width) + 6 and request.encode_frames == 1
    config, vae = dict(pipe.transformer.config), dict(pipe.vae.config)
    without = model_sizes(config, vae, 4).towers["generator"].whole.payload
    heads = [p for name, p in pipe.transformer.named_parameters() if name.startswith("action_")]
    assert heads and not any(p.is_meta for p in heads)
    placed = sum(p.numel() * p.element_size() for p in heads)
    assert pipeline_sizes(pipe).towers["generator"].whole.payload == without + placed


def refusal(pipe, call: dict, kind: type[Exception] = InputError) -> str:
    with pytest.raises(kind) as refused:
        pipe(**{**CALL, "output_type": "latent", **call})
    message = str(refused.value)
    assert "\n" not in message, message
    return message


def test_diffusers_rules_of_an_action_call_are_refused_with_its_words(folder, resident):
    """Fails when an action call with its own frame count or size, a top-level image or video, rows wider than the
    action heads, a domain wider than them, or a condition changed after diffusers checked it is run."""
    image = Image.new("RGB", (64, 64))
    policy = condition("policy", "pusht", 4)
    for call, said in [
        ({"num_frames": 5}, "`num_frames` has to be None if action is not None"),
        ({"height": 256, "width": 256}, "`height` and `width` have to be None"),
        ({"image": image}, "not the top-level `image` argument"),
        ({"video": [image] * 5}, "not the top-level `video` argument"),
    ]:
        assert said in refusal(resident, {**call, "action": policy}, ValueError)
    wide = condition("forward_dynamics", "hand_pose", 4)  # 57 numbers a row; the tiny heads take 32
    assert "action dimension 57 exceeds model action_dim=32" in refusal(resident, {"action": wide}, ValueError)
    said = refusal(resident, {"action": condition("policy", "hand_pose", 4)}, ValueError)
    assert "raw_action_dim=57 exceeds the model's trained action_dim=32" in said
    changed = condition("policy", "pusht", 4)
    changed.domain_name = "libero"  # no action width: diffusers' construction refuses it
    assert "not supported for action inference" in refusal(resident, {"action": changed}, ValueError)
    without_heads = load(folder)
    without_heads.transformer.register_to_config(action_gen=False)
    with pytest.raises(ValueError, match="requires a transformer trained with action_gen=True"):
        read_call(without_heads, call_arguments(**CALL, action=policy))


def call_arguments(**given) -> dict:
    """Every argument of diffusers' `__call__` by name: its default, or as given."""
    parameters = inspect.signature(Cosmos3OmniPipeline.__call__).parameters
    return {name: p.default for name, p in parameters.items() if name != "self"} | given


def test_what_the_other_doors_refuse_of_an_action_run_is_refused_here(resident):
    """Fails when a chunk past 1024, an unknown view point, non-finite or absurd rows, a non-condition, action
    latents without an action or of the wrong shape, or video latents of the wrong shape reach the model."""
    nan, huge = torch.zeros(3, ACTION_WIDTHS["pusht"]), torch.zeros(3, ACTION_WIDTHS["pusht"])
    nan[1, 0], huge[2, 1] = float("nan"), 1e5
    for call, said in [
        ({"action": condition("policy", "pusht", 1025)}, "action.chunk_size must be"),
        ({"action": condition("policy", "pusht", 4, view_point="top_view")}, "action.view_point must be one of"),
        ({"action": condition("forward_dynamics", "pusht", 4, raw_actions=nan)}, "row 2, column 1 is nan"),
        ({"action": condition("forward_dynamics", "pusht", 4, raw_actions=huge)}, "row 3, column 2 is 100000"),
        ({"action": object()}, "action must be a diffusers CosmosActionCondition, got object"),
        ({"action_latents": torch.zeros(4, 32)}, "action_latents start an action call's actions; without action="),
        (
            {"action": condition("policy", "pusht", 4), "action_latents": torch.zeros(5, 32)},
            r"action_latents have shape [5, 32]; this call's are [4, 32]",
        ),
        (
            {"action": condition("policy", "pusht", 4), "latents": torch.zeros(1, 48, 2, 12, 20)},
            r"latents have shape [1, 48, 2, 12, 20]; this call's are [1, 48, 2, 12, 18]",
        ),
    ]:
        assert said in refusal(resident, call)


def test_an_action_call_under_the_step_cache_is_refused(folder):
    """Fails when enable(cache="seacache") runs an action call (its gate reads the video alone), or refuses a
    plain call."""
    pipe = cosmos3_offload.enable(load(folder), cache="seacache")
    said = refusal(pipe, {"action": condition("policy", "pusht", 4)})
    assert "enabled with cache='seacache', which does not go with action=" in said
    pipe(**CALL, num_frames=5, height=64, width=64, output_type="latent")
