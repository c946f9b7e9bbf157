"""SeaCache in our loop makes diffusers' decisions and gives its latents; threshold 0 changes nothing."""

from __future__ import annotations

import pytest
import torch
from diffusers import SeaCacheConfig
from tiny_models import diffusers_latents, relative_error, tiny_pipeline

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.feasibility import request_of
from cosmos3_offload.app.generate import Latents, denoise_latents, initial_noise, prefill_branches, prepare_branches
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.components import load_components, model_configs
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.planning.memory import peaks
from cosmos3_offload.planning.plan import GroupPlan, Plan
from cosmos3_offload.stepcache.seacache import SeaCache, held_hiddens, seacache_config

TOLERANCE = 1e-4
CPU = torch.device("cpu")


def request(tmp_path, **overrides) -> GenerationConfig:
    fields = dict(prompt="a red fox in the snow", frames=9, resolution=256, steps=14, guidance=6.0, seed=3)
    return GenerationConfig(**{**fields, **overrides, "output": tmp_path / "out.mp4"})


def our_latents(config: GenerationConfig, cache: SeaCache | None) -> torch.Tensor:
    pipe = tiny_pipeline(shift=config.flow_shift)
    latents = initial_noise(pipe, config, torch.device("cpu"))
    branches = prepare_branches(pipe, config, latents)
    memories = prefill_branches(pipe, branches)
    return denoise_latents(pipe, config, branches, memories, Latents(latents), progress=False, step_cache=cache).vision


def diffusers_decisions(config: GenerationConfig, cache: SeaCacheConfig) -> tuple[torch.Tensor, list[tuple[bool, ...]]]:
    """diffusers' pipeline with `transformer.enable_cache(cache)`: its latents and, per step and
    branch, whether its decoder stack ran (its first layer was called)."""
    pipe = tiny_pipeline(shift=config.flow_shift)
    calls: list[bool] = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(False))
    pipe.transformer.layers[0].register_forward_pre_hook(lambda *_: calls.__setitem__(-1, True))
    pipe.transformer.enable_cache(cache)
    latents = diffusers_latents(pipe, config)
    branches = 2 if config.uses_guidance else 1
    return latents, [tuple(calls[i : i + branches]) for i in range(0, len(calls), branches)]


@pytest.mark.parametrize("guidance", [6.0, 1.0], ids=["cfg", "no-cfg"])
def test_default_threshold_matches_diffusers(tmp_path, guidance):
    """At diffusers' defaults, the same steps are reused per branch and the latents agree within 1e-4."""
    config = request(tmp_path, guidance=guidance)
    cache = SeaCache(seacache_config(), branches=2 if config.uses_guidance else 1)
    ours = our_latents(config, cache)
    theirs, decisions = diffusers_decisions(config, SeaCacheConfig())
    assert cache.decisions == decisions
    assert 0 < cache.reused < config.steps - 2  # the case exercises reuse and recomputation
    assert relative_error(ours, theirs) <= TOLERANCE


def test_threshold_zero_is_the_uncached_loop_bit_for_bit(tmp_path):
    """Threshold 0 computes every step, so the latents are exactly the uncached loop's."""
    config = request(tmp_path, steps=6)
    cache = SeaCache(seacache_config(0.0), branches=2)
    assert torch.equal(our_latents(config, cache), our_latents(config, None))
    assert cache.computed == config.steps and cache.reused == 0


def test_a_high_threshold_reuses_at_most_the_configured_run(tmp_path):
    """Even when every step would qualify, the first and last steps compute and no more than two
    steps in a row are reused (diffusers' retention, end and consecutive limits)."""
    config = request(tmp_path, steps=10, guidance=1.0)
    cache = SeaCache(seacache_config(1e9), branches=1)
    our_latents(config, cache)
    pattern = [step[0] for step in cache.decisions]
    assert pattern == [True, False, False, True, False, False, True, False, False, True]
    assert cache.summary() == "seacache (threshold 1e+09): 4 of 10 steps computed, 6 reused"


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), float("inf")])
def test_a_bad_threshold_is_an_input_error(threshold):
    with pytest.raises(InputError, match="threshold"):
        seacache_config(threshold)


def cached_generation(tmp_path, plan: Plan):
    config = request(tmp_path, frames=5, steps=10, guidance=6.0, cache="seacache", cache_threshold=50.0)
    components = load_components(None, CPU, torch.float32, plan, random_model="tiny-deep")
    return components, generate_video(config, components, PhaseTimer(CPU), progress=False)


def test_a_cached_run_is_bit_identical_under_every_placement(tmp_path):
    """Staged and streamed generators reuse the same steps and give the resident run's latents exactly."""
    _, resident = cached_generation(tmp_path, Plan())
    for generator in (GroupPlan(mode="staged"), GroupPlan(mode="streamed", resident_layers=(2,), ring=3, prefetch=2)):
        _, placed = cached_generation(tmp_path, Plan(generator=generator, reasoner=GroupPlan(mode="staged")))
        assert placed.step_cache.decisions == resident.step_cache.decisions
        assert torch.equal(placed.latents, resident.latents)


def test_a_reused_step_copies_no_streamed_layer(tmp_path):
    """The ring moves each streamed layer once per computed step only; reused steps leave it untouched."""
    plan = Plan(generator=GroupPlan(mode="streamed", resident_layers=(2,), ring=2, prefetch=1))
    components, video = cached_generation(tmp_path, plan)
    group = components.engine.placements["generator"]
    computed = video.step_cache.computed
    assert computed < len(video.step_cache.decisions)
    assert computed * 5 <= len(group.copied_layers) <= computed * 5 + group.prefetch


def test_while_the_stack_runs_the_cache_holds_what_the_planner_counts(tmp_path):
    """During a computed step each branch keeps at most `residual_order` residuals (plus the stack's
    input): `held_hiddens` of them, which the planner adds to the denoise peak."""
    config = request(tmp_path, steps=8)
    config_cache = seacache_config(50.0)
    cache = SeaCache(config_cache, branches=2)
    pipe = tiny_pipeline(shift=config.flow_shift)
    held: list[int] = []
    last_mlp = pipe.transformer.layers[-1].mlp_moe_gen
    last_mlp.register_forward_pre_hook(lambda *_: held.append(max(len(s.history) for s in cache._states)))
    latents = initial_noise(pipe, config, CPU)
    branches = prepare_branches(pipe, config, latents)
    denoise_latents(
        pipe, config, branches, prefill_branches(pipe, branches), Latents(latents), progress=False, step_cache=cache
    )
    assert len(held) == 2 * cache.computed  # the hook ran once per branch of each computed step
    assert max(held) == config_cache.residual_order == held_hiddens(config_cache) - 1


def test_the_planner_adds_the_cache_to_the_denoise_peak_only(tmp_path):
    """A request with SeaCache plans `held_hiddens` more [tokens, hidden] tensors per branch in the
    denoise part (here 2 x 2 x 44,160 x 2048 bf16 values at Nano 720p x 189f), nothing elsewhere."""
    sizes = model_sizes(*model_configs(None, "nano"), dtype_bytes=2)
    plain, cached = (
        request_of(GenerationConfig(prompt="a fox", output=tmp_path / "o.mp4", **extra))
        for extra in ({}, {"cache": "seacache"})
    )
    before, after = peaks(Plan(), sizes, plain), peaks(Plan(), sizes, cached)
    assert after.denoise - before.denoise == 2 * 2 * plain.tokens * sizes.hidden * 2
    assert (after.prefill, after.decode) == (before.prefill, before.decode)
