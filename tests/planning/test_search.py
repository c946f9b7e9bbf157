"""The planner predicts memory and time per plan, picks the fastest that fits, and refuses with the least budget."""

from __future__ import annotations

import pytest

from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.groups import VAE_ENCODER
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.planning.memory import HostMemory, decode_bytes_and_share, encode_bytes, host_memory, weight_bytes
from cosmos3_offload.planning.plan import BOUNCE_SLOTS, GroupPlan, Mode, Plan
from cosmos3_offload.planning.request import DeviceProfile, Request, parse_budget
from cosmos3_offload.planning.search import TIME_TOLERANCE, candidates, choose_plan, describe_choice, predict, spread
from cosmos3_offload.planning.tiles import TileGrid
from cosmos3_offload.planning.timing import moved_bytes, simulate_ring
from cosmos3_offload.units import GIB, MIB

PROFILE = DeviceProfile()


@pytest.fixture(scope="module")
def nano():
    spec = model_spec("nano")
    return model_sizes(spec.transformer, spec.vae)


def test_sizes_match_the_design_brief(nano):
    """Nano's generator tower is about 12.9 GiB over 36 layers; the VAE about 1.3 GiB in bf16 (decoder side 1.03)."""
    generator = nano.towers["generator"].whole.payload
    assert 12.5 * GIB < generator < 13.2 * GIB
    assert 1.2 * GIB < nano.vae.payload + nano.vae_encoder.payload < 1.45 * GIB
    assert 1.0 * GIB < nano.vae.payload < 1.1 * GIB
    assert nano.layers == 36 and nano.mlp_mats == 3


def test_resident_layers_are_spread_not_a_prefix():
    """Resident layers sit at the centres of equal bins."""
    assert spread(36, 6) == (3, 9, 15, 21, 27, 33)
    assert spread(10, 0) == () and spread(4, 4) == (0, 1, 2, 3)


def test_simulation_is_compute_or_transfer_bound():
    """A streamed step takes max(compute, copies) in steady state: hidden copies are free, slow ones dominate."""
    streamed = GroupPlan(mode="streamed", ring=2, prefetch=1)
    assert simulate_ring(streamed, [0.1] * 10, layer_s=1.0) == pytest.approx(10.0)
    assert simulate_ring(streamed, [1.0] * 10, layer_s=0.1) == pytest.approx(10.0, rel=0.02)
    half = GroupPlan(mode="streamed", resident_layers=spread(10, 5), ring=2, prefetch=1)
    assert simulate_ring(half, [1.0] * 10, layer_s=0.1) == pytest.approx(5.0, rel=0.05)
    # Layers of different sizes: the copies add up to the transfer-bound pass.
    assert simulate_ring(streamed, [0.5, 1.5] * 5, layer_s=0.01) == pytest.approx(10.0, rel=0.02)


def test_more_resident_layers_cost_memory_and_save_time_when_transfer_bound(nano):
    """At 256p (transfer-bound) each resident layer adds its bytes to the peak and shortens the step."""
    request = Request.for_video(93, 192, 320)
    few, many = (
        predict(
            Plan(
                reasoner=GroupPlan(mode="streamed"),
                generator=GroupPlan(mode="streamed", resident_layers=spread(36, n)),
                vae=GroupPlan(mode="staged"),
            ),
            nano,
            request,
            PROFILE,
        )
        for n in (4, 20)
    )
    assert many.peaks.denoise > few.peaks.denoise
    assert many.times.step < few.times.step


def test_roomy_budget_keeps_everything_resident(nano):
    """With room for everything, nothing moves."""
    choice = choose_plan(nano, Request.for_video(93, 480, 832), 80 * GIB, PROFILE)
    assert {choice.plan.reasoner.mode, choice.plan.generator.mode, choice.plan.vae.mode} == {Mode.RESIDENT}
    assert choice.plan.decode_grid == TileGrid() and choice.plan.mlp_chunk is None


def test_small_budget_streams_and_fits(nano):
    """Under 8 GiB at 720p x 189f the pick streams both towers and its predicted peak fits the budget."""
    choice = choose_plan(nano, Request.for_video(189, 720, 1280), 8 * GIB, PROFILE)
    assert choice.plan.generator.mode == "streamed" and choice.plan.reasoner.mode == "streamed"
    assert choice.prediction.peak <= 8 * GIB * PROFILE.headroom


def test_refusal_names_a_budget_that_works(nano):
    """Too small a budget is refused with the least budget that fits; that budget then works."""
    request = Request.for_video(189, 720, 1280)
    with pytest.raises(InputError, match=r"needs at least (\d+\.\d) GiB") as error:
        choose_plan(nano, request, 3 * GIB, PROFILE)
    least = float(error.value.args[0].split("at least ")[1].split(" GiB")[0])
    choose_plan(nano, request, int(least * GIB), PROFILE)


@pytest.mark.parametrize(
    "text, value",
    [
        ("8GiB", 8 * GIB),
        ("8", 8 * GIB),
        ("7500MiB", 7500 * 1024**2),
        ("8GB", 8e9),
        ("1PiB", 1024**5),
        ("2TiB", 2 * 1024**4),
        ("8TB", 8e12),
        ("1MiB", 1024**2),
        ("4096KiB", 4 * 1024**2),
        (" 8 gib ", 8 * GIB),
    ],
)
def test_budget_parsing(text, value):
    """Sizes with binary or decimal units from KiB to PiB (the documented range ends at 1 PiB), or bare GiB."""
    assert parse_budget(text) == int(value)


@pytest.mark.parametrize("text", ["eight", "8XB", "", "GiB", "nan", "inf", "-infGiB", "1e400", "nanMiB", "8 GiB GiB"])
def test_unreadable_budgets_are_refused(text):
    """Unreadable or non-finite budgets say exactly which units are accepted."""
    accepted = r"write it like 8GiB or 7500MiB: a number and one of B, KiB, MiB, GiB, TiB, PiB \(KB to PB"
    with pytest.raises(InputError, match=accepted):
        parse_budget(text)


@pytest.mark.parametrize("text", ["-1GiB", "0", "0.5MiB", "1e9", "2000000GiB"])
def test_out_of_range_budgets_are_refused(text):
    """Budgets below 1 MiB or past 1 PiB are refused with the range."""
    with pytest.raises(InputError, match="out of range"):
        parse_budget(text)


@pytest.mark.parametrize("budget, shown", [(MIB, "1.0 MiB"), (300 * MIB, "300.0 MiB"), (3 * GIB, "3.0 GiB")])
def test_a_budget_nothing_fits_is_shown_in_a_unit_that_shows_it(nano, budget, shown):
    """If this fails, a 1 MiB budget is reported as 'a 0.0 GiB budget'."""
    with pytest.raises(InputError, match=f"nothing fits a {shown} budget"):
        choose_plan(nano, Request.for_video(189, 720, 1280), budget, PROFILE)


def test_decode_bytes_trade_for_work(nano):
    """More tiles or fewer frames a pass: less device memory, more work; one 4-frame tile is the untiled decode."""
    cost = {
        (r, c, f): decode_bytes_and_share(nano, TileGrid(rows=r, cols=c, frames=f), 720, 1280)
        for r, c in ((1, 1), (2, 2), (3, 4))
        for f in (1, 4)
    }
    assert cost[1, 1, 4][1] == pytest.approx(1.0)
    for f in (1, 4):
        assert cost[1, 1, f][0] > cost[2, 2, f][0] > cost[3, 4, f][0]
        assert cost[1, 1, f][1] < cost[2, 2, f][1] < cost[3, 4, f][1]
    for tiles in ((1, 1), (2, 2), (3, 4)):
        assert cost[(*tiles, 1)][0] < cost[(*tiles, 4)][0] and cost[(*tiles, 1)][1] > cost[(*tiles, 4)][1]


def test_encode_of_conditioning_frames_is_planned(nano):
    """Text to video predicts no encode; a clip's 5 frames cost more than an image's 1; plans fit with the encode."""
    peaks = {}
    for frames in (0, 1, 5):
        request = Request.for_video(189, 720, 1280, encode_frames=frames)
        choice = choose_plan(nano, request, 6 * GIB, PROFILE)
        assert choice.prediction.peak <= 6 * GIB * PROFILE.headroom
        peaks[frames] = predict(choice.plan, nano, request, PROFILE).peaks.encode
    assert peaks[0] == 0 < peaks[1] < peaks[5]
    assert encode_bytes(Request.for_video(189, 720, 1280, encode_frames=9)) == encode_bytes(
        Request.for_video(189, 720, 1280, encode_frames=5)
    )  # chunks of at most 4 frames


def test_a_staged_encoder_holds_only_its_own_weights_while_it_encodes(nano):
    """The encode holds the encoder's arena alone (not the largest group to come); a resident VAE
    holds both of its sides for the whole run."""
    request = Request.for_video(189, 720, 1280, encode_frames=5)
    staged = Plan(reasoner=GroupPlan(mode="staged"), generator=GroupPlan(mode="staged"), vae=GroupPlan(mode="staged"))
    resident_vae = Plan(reasoner=GroupPlan(mode="staged"), generator=GroupPlan(mode="staged"))
    gap = (
        predict(staged, nano, request, PROFILE).peaks.encode
        - predict(resident_vae, nano, request, PROFILE).peaks.encode
    )
    encoder_arena = weight_bytes(staged, nano).arena[VAE_ENCODER]
    resident = nano.vae.payload + nano.vae_encoder.payload
    assert encoder_arena < weight_bytes(staged, nano).arena_peak and gap == encoder_arena - resident


@pytest.fixture(scope="module")
def every_prediction(nano):
    """every_prediction(request): [(plan, predict(plan))] for every candidate, computed once per request
    (the budgets below all compare against the same predictions)."""
    predictions = {}

    def of(request: Request):
        if request not in predictions:
            predictions[request] = [(plan, predict(plan, nano, request, PROFILE)) for plan in candidates(nano)]
        return predictions[request]

    return of


@pytest.mark.parametrize("budget_gib", [6, 8, 12, 16, 24, 32, 48, 80])
@pytest.mark.parametrize("shape", [(189, 720, 1280), (93, 480, 832), (93, 192, 320)])
def test_the_pick_is_fastest_then_moves_least_then_holds_least(nano, every_prediction, budget_gib, shape):
    """No fitting candidate is predicted faster; among the equally fast none moves fewer bytes, and among
    those none peaks lower."""
    request = Request.for_video(*shape)
    choice = choose_plan(nano, request, budget_gib * GIB, PROFILE)
    usable = budget_gib * GIB * PROFILE.headroom
    best = choice.prediction.times.total
    chosen = (moved_bytes(choice.plan, nano, request), choice.prediction.peak)
    for plan, prediction in every_prediction(request):
        if prediction.peak > usable:
            continue
        assert prediction.times.total >= best * (1 - TIME_TOLERANCE)
        if prediction.times.total <= best * (1 + TIME_TOLERANCE):
            assert (moved_bytes(plan, nano, request), prediction.peak) >= chosen


def test_room_to_spare_moves_no_more_than_needed(nano):
    """At 32 GiB, 720p x 189f does not stream the generator every step when moving one tower once will do."""
    request = Request.for_video(189, 720, 1280)
    choice = choose_plan(nano, request, 32 * GIB, PROFILE)
    assert choice.plan.generator.mode is Mode.RESIDENT
    assert moved_bytes(choice.plan, nano, request) <= nano.towers["reasoner"].whole.packed


def test_a_roomy_budget_never_tiles_the_decode(nano):
    """Tiling is predicted slower, so with room for the untiled decode it is never picked."""
    for budget in (24, 32, 48):
        choice = choose_plan(nano, Request.for_video(189, 720, 1280), budget * GIB, PROFILE)
        untiled = decode_bytes_and_share(nano, TileGrid(), 720, 1280)[0] + nano.vae.payload
        if untiled <= budget * GIB * PROFILE.headroom - weight_bytes(choice.plan, nano).resident:
            assert choice.plan.decode_grid == TileGrid()


def test_host_budget_too_small_for_a_pinned_reasoner_maps_it(nano):
    """Under 8 GiB of device memory at 720p x 189f, a roomy host budget streams the reasoner from pinned
    slabs (faster prefill); one too small for them maps it from the checkpoint, and the pick fits both budgets."""
    request = Request.for_video(189, 720, 1280)
    roomy = choose_plan(nano, request, 8 * GIB, PROFILE, mapped=True)
    assert roomy.plan.reasoner.mode is Mode.STREAMED and roomy.prediction.host.held > 25 * GIB
    host_budget = 16 * GIB
    lean = choose_plan(nano, request, 8 * GIB, PROFILE, host_budget=host_budget, mapped=True)
    assert lean.plan.reasoner.mode is Mode.MAPPED and lean.plan.generator.mode is Mode.STREAMED
    assert lean.prediction.host.held <= host_budget * PROFILE.headroom
    assert lean.prediction.peak <= 8 * GIB * PROFILE.headroom
    assert lean.prediction.host.page_cache > 0 and lean.prediction.host.private == 0  # the embedding is read in place
    assert lean.prediction.times.prefill > roomy.prediction.times.prefill


def test_mapping_is_considered_only_with_a_checkpoint(nano):
    """Without a checkpoint (random weights) no plan maps the reasoner, and a small host budget is refused
    with the least host budget that works and a hint to pass --checkpoint."""
    request = Request.for_video(189, 720, 1280)
    assert all(p.reasoner.mode is not Mode.MAPPED for p in candidates(nano))
    assert any(p.reasoner.mode is Mode.MAPPED for p in candidates(nano, mapped=True))
    with pytest.raises(InputError, match=r"at least (\d+\.\d) GiB of host memory.*--checkpoint") as error:
        choose_plan(nano, request, 8 * GIB, PROFILE, host_budget=16 * GIB)
    least = float(error.value.args[0].split("at least ")[1].split(" GiB")[0])
    choice = choose_plan(nano, request, 8 * GIB, PROFILE, host_budget=int(least * GIB))
    assert choice.prediction.host.held <= least * GIB * PROFILE.headroom


def test_mapped_prefill_is_bounded_by_the_host_copy(nano):
    """A mapped reasoner's prefill takes about its layers' bytes over the host memcpy rate."""
    request = Request.for_video(93, 480, 832)
    plan = Plan(reasoner=GroupPlan(mode="mapped"), generator=GroupPlan(mode="staged"), vae=GroupPlan(mode="staged"))
    layers = sum(g.payload for g in nano.towers["reasoner"].layers)
    for rate in (4.0, 8.0):
        prefill = predict(plan, nano, request, DeviceProfile(host_copy_GBps=rate)).times.prefill
        assert prefill == pytest.approx(layers / (rate * 1e9), rel=0.1)


def test_host_memory_of_each_mode(nano):
    """Pinned holds staged and streamed weights and the bounce ring; mapped layers sit in the page cache."""
    streamed = host_memory(Plan(reasoner=GroupPlan(mode="streamed")), nano)
    mapped = host_memory(Plan(reasoner=GroupPlan(mode="mapped")), nano)
    reasoner = nano.towers["reasoner"]
    assert streamed == HostMemory(
        pinned=sum(g.packed for g in reasoner.layers), page_cache=0, private=nano.embedding.packed
    )
    slot = max(g.slot for g in reasoner.layers)
    assert mapped.pinned == BOUNCE_SLOTS * slot < 1 * GIB
    assert mapped.page_cache == sum(g.payload for g in reasoner.layers) + nano.embedding.payload
    assert mapped.private == 0 and host_memory(Plan(), nano) == HostMemory(pinned=0, page_cache=0, private=0)


def test_describe_choice_prints_host_memory(nano):
    """The plan's description names the host budget and the pinned, page-cache and private bytes."""
    choice = choose_plan(nano, Request.for_video(189, 720, 1280), 8 * GIB, PROFILE, host_budget=16 * GIB, mapped=True)
    text = describe_choice(choice, 8 * GIB, 16 * GIB)
    assert "and a 16.0 GiB host budget: reasoner mapped" in text
    assert "host memory for weights: pinned " in text and "page cache " in text and "private 0.00 GiB" in text
