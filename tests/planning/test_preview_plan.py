"""Exact previews in the plan: the VAE stays on the device and one preview decode joins the denoise's peak."""

from __future__ import annotations

import pytest

from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.planning.memory import decode_bytes_and_share, peaks, weight_bytes
from cosmos3_offload.planning.plan import GroupPlan, Mode, Plan
from cosmos3_offload.planning.request import DeviceProfile, Request
from cosmos3_offload.planning.search import choose_plan, least_budget
from cosmos3_offload.planning.tiles import TileGrid
from cosmos3_offload.units import GIB

PROFILE = DeviceProfile()


@pytest.fixture(scope="module")
def nano():
    spec = model_spec("nano")
    return model_sizes(spec.transformer, spec.vae)


def video(preview_frames: int = 0, **extra) -> Request:
    return Request.for_video(189, 720, 1280, preview_frames=preview_frames, **extra)


def test_an_exact_preview_adds_its_decode_to_the_denoise_peak_and_nothing_elsewhere(nano):
    """Fails when the denoise's predicted peak leaves out an exact preview's decode (the run would go out of
    memory between two steps), or when the preview is counted in the other parts, which it never joins."""
    plan = Plan(
        reasoner=GroupPlan(mode=Mode.STREAMED),
        generator=GroupPlan(mode=Mode.STREAMED),
        mlp_chunk=2048,
        decode_grid=TileGrid(rows=1, cols=1, frames=4),  # an untiled 720p decode: more than a step's activations
    )
    without, with_preview = peaks(plan, nano, video()), peaks(plan, nano, video(preview_frames=1))
    weights = weight_bytes(plan, nano)
    decode, _ = decode_bytes_and_share(nano, plan.decode_grid, 720, 1280)
    held_by_denoise = weights.resident + weights.arena["generator"]
    assert with_preview.denoise >= held_by_denoise + decode > without.denoise
    assert (with_preview.prefill, with_preview.decode, with_preview.encode) == (
        without.prefill,
        without.decode,
        without.encode,
    )


def test_a_step_caches_residuals_stay_beside_the_preview(nano):
    """Fails when the preview's decode is counted as if the step cache had let its residuals go: they are held
    from step to step."""
    plan = Plan(decode_grid=TileGrid(rows=1, cols=1, frames=4))
    plain = peaks(plan, nano, video(preview_frames=1)).denoise
    cached = peaks(plan, nano, video(preview_frames=1, cached_hiddens=2)).denoise
    decode_alone = peaks(plan, nano, video(preview_frames=1)).denoise - peaks(plan, nano, video()).denoise
    assert decode_alone > 0 and cached > plain


def test_exact_previews_keep_the_vae_resident_and_fit_the_budget(nano):
    """Fails when the planner stages the VAE for a request with exact previews (they decode while the generator
    holds the arena), or picks a plan over the budget; at 8 GiB without previews it stages the VAE, so the
    previews' plan differs for a reason."""
    budget = 8 * GIB
    plain = choose_plan(nano, video(), budget, PROFILE)
    previewed = choose_plan(nano, video(preview_frames=3), budget, PROFILE)
    assert plain.plan.vae.mode is Mode.STAGED
    assert previewed.plan.vae.mode is Mode.RESIDENT
    assert previewed.plan.generator.mode is Mode.STREAMED  # the generator still fits by streaming
    assert previewed.prediction.peak <= budget * PROFILE.headroom


def test_a_budget_that_fits_only_without_exact_previews_is_refused_with_the_way_out(nano):
    """Fails when exact previews are planned into a budget their resident VAE and decode cannot fit, or the
    refusal does not name the least budget that works and fast previews as the cheaper choice."""
    plain, previewed = least_budget(nano, video(), PROFILE), least_budget(nano, video(preview_frames=1), PROFILE)
    assert previewed > plain
    budget = (plain + previewed) // 2
    choose_plan(nano, video(), budget, PROFILE)  # fits without previews
    with pytest.raises(InputError, match=r"at least \d+\.\d GiB .*or fast previews instead of exact ones"):
        choose_plan(nano, video(preview_frames=1), budget, PROFILE)


def test_preview_frames_are_checked(nano):
    """Fails when a negative preview count is taken (the planner would count nothing for it)."""
    with pytest.raises(InputError, match="preview_frames must be >= 0"):
        video(preview_frames=-1)
