"""The planner on several GPUs: each GPU's memory and time under CFG- and sequence-parallel layouts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.planning.memory import activation_bytes, reasoner_memory_bytes
from cosmos3_offload.planning.parallel import SINGLE, ParallelLayout
from cosmos3_offload.planning.plan import GroupPlan, Plan
from cosmos3_offload.planning.request import MAX_RATE, DeviceProfile, Request
from cosmos3_offload.planning.search import candidates, choose_plan, describe_choice, least_budget, predict
from cosmos3_offload.planning.tiles import TileGrid
from cosmos3_offload.planning.timing import rank_h2d_GBps, streamed_bytes
from cosmos3_offload.units import GIB

PROFILE = DeviceProfile()
CFG_AND_SEQUENCE = ParallelLayout(cfg=2, sequence=2)
ALL_STREAMED = Plan(
    reasoner=GroupPlan(mode="streamed"), generator=GroupPlan(mode="streamed"), vae=GroupPlan(mode="staged")
)


@pytest.fixture(scope="module")
def nano():
    spec = model_spec("nano")
    return model_sizes(spec.transformer, spec.vae)


def on(layout: ParallelLayout, *shape: int) -> Request:
    return replace(Request.for_video(*(shape or (189, 720, 1280))), parallel=layout)


def test_one_gpu_ignores_the_multi_gpu_rates(nano):
    """One GPU's predictions are exactly those of a profile with other interconnect and host-read rates
    (its measured H2D rate stands): the new terms never touch a single-GPU plan."""
    other = replace(PROFILE, interconnect_GBps=1.0, host_read_GBps=1.0)
    assert on(ParallelLayout(cfg=1, sequence=1)) == Request.for_video(189, 720, 1280)
    for shape in ((189, 720, 1280), (93, 192, 320)):
        request = Request.for_video(*shape)
        for plan in candidates(nano, mapped=True)[::97]:
            assert predict(plan, nano, request, PROFILE) == predict(plan, nano, request, other)


def test_four_gpus_hold_less_and_step_in_under_half_the_time(nano):
    """Nano 720p x 189f on CFG 2 x Ulysses 2: each GPU's activations, reasoner memory and denoise peak
    are below one GPU's, and its step takes less than half as long."""
    single, four = on(SINGLE), on(CFG_AND_SEQUENCE)
    assert activation_bytes(nano, four, chunk=2048) < activation_bytes(nano, single, chunk=2048)
    assert 2 * reasoner_memory_bytes(nano, four) == reasoner_memory_bytes(nano, single)
    for plan in (Plan(), ALL_STREAMED):
        one, each = predict(plan, nano, single, PROFILE), predict(plan, nano, four, PROFILE)
        assert each.peaks.denoise < one.peaks.denoise
        assert each.times.step < 0.5 * one.times.step
    resident = predict(Plan(), nano, four, PROFILE).times.prefill
    assert resident < predict(Plan(), nano, single, PROFILE).times.prefill  # one prompt each instead of two


def test_a_sequence_parallel_gpu_holds_more_than_its_rows_alone(nano):
    """A GPU of a Ulysses pair holds more than a lone GPU with the same rows: the exchanged heads,
    the all-to-all's send and receive buffers and the whole embedded sequence."""
    pair = on(ParallelLayout(sequence=2))
    rows_alone = replace(pair, tokens=pair.rank_tokens, parallel=SINGLE)
    assert activation_bytes(nano, pair) > activation_bytes(nano, rows_alone)


def test_a_budget_for_four_gpus_but_not_one_plans_for_four(nano):
    """The least per-GPU budget of 4 GPUs is below one GPU's; at that budget one GPU is refused and
    the 4-GPU pick fits it."""
    single, four = on(SINGLE), on(CFG_AND_SEQUENCE)
    budget = least_budget(nano, four, PROFILE)
    assert budget < least_budget(nano, single, PROFILE)
    with pytest.raises(InputError, match="needs at least"):
        choose_plan(nano, single, budget, PROFILE)
    choice = choose_plan(nano, four, budget, PROFILE)
    assert choice.layout == CFG_AND_SEQUENCE
    assert choice.prediction.peak <= budget * PROFILE.headroom


def test_a_slower_interconnect_slows_the_exchanges_in_proportion(nano):
    """A resident step's extra time over a free interconnect grows as 1/bandwidth (NVLink to PCIe);
    without sequence-parallel only the small CFG exchange remains."""

    def step(layout: ParallelLayout, rate: float) -> float:
        return predict(Plan(), nano, on(layout), replace(PROFILE, interconnect_GBps=rate)).times.step

    for layout in (CFG_AND_SEQUENCE, ParallelLayout(sequence=4)):
        free = step(layout, MAX_RATE)
        nvlink, pcie = step(layout, 300.0) - free, step(layout, 25.0) - free
        assert 0 < nvlink < pcie
        assert pcie == pytest.approx(nvlink * (1 / 25 - 1 / MAX_RATE) / (1 / 300 - 1 / MAX_RATE), rel=1e-6)
    cfg_only = ParallelLayout(cfg=2)
    assert step(cfg_only, 25.0) - step(cfg_only, MAX_RATE) < 0.1 * (
        step(CFG_AND_SEQUENCE, 25.0) - step(CFG_AND_SEQUENCE, MAX_RATE)
    )


def test_host_memory_is_one_shared_copy_per_host(nano):
    """Every GPU of a host reads the same slabs: host memory does not grow with the GPU count."""
    layouts = (SINGLE, ParallelLayout(cfg=2), CFG_AND_SEQUENCE, ParallelLayout(cfg=2, sequence=4))
    for plan in (ALL_STREAMED, Plan(reasoner=GroupPlan(mode="mapped"))):
        hosts = {predict(plan, nano, on(layout), PROFILE).host for layout in layouts}
        assert len(hosts) == 1 and next(iter(hosts)).pinned > 0


def test_four_gpus_share_a_slow_host_read(nano):
    """With 100 GB/s of host reads, 4 GPUs streaming at once get 25 GB/s each, not their 55 GB/s link;
    a transfer-bound step (256p, all streamed) takes about its copies at that rate."""
    request = on(CFG_AND_SEQUENCE, 93, 192, 320)
    slow, roomy = replace(PROFILE, host_read_GBps=100.0), replace(PROFILE, host_read_GBps=1000.0)
    four = CFG_AND_SEQUENCE
    assert rank_h2d_GBps(slow, four) == pytest.approx(25.0) and rank_h2d_GBps(roomy, four) == PROFILE.h2d_GBps
    assert rank_h2d_GBps(slow, SINGLE) == PROFILE.h2d_GBps
    step = predict(ALL_STREAMED, nano, request, slow).times.step
    assert step > predict(ALL_STREAMED, nano, request, roomy).times.step
    assert step == pytest.approx(streamed_bytes(ALL_STREAMED, nano) / 25e9, rel=0.1)


def test_the_decode_deals_tiles_but_not_the_low_resolution_pass(nano):
    """On 4 GPUs a 2x2-tile decode takes under half one GPU's time but more than a quarter (every GPU
    runs the low-resolution pass); a single tile cannot be shared."""

    def decode(layout: ParallelLayout, grid: TileGrid) -> float:
        return predict(replace(ALL_STREAMED, decode_grid=grid), nano, on(layout), PROFILE).times.decode

    grid = TileGrid(rows=2, cols=2)
    one, four = decode(SINGLE, grid), decode(CFG_AND_SEQUENCE, grid)
    assert one / 4 < four < one / 2
    assert decode(CFG_AND_SEQUENCE, TileGrid()) == decode(SINGLE, TileGrid())


def test_layouts_the_request_or_model_cannot_take_are_refused(nano):
    """CFG-parallel needs two branches, Ulysses a degree that divides the tokens and the model's heads."""
    with pytest.raises(InputError, match="two CFG branches"):
        replace(Request.for_video(189, 720, 1280, guidance=False), parallel=ParallelLayout(cfg=2))
    with pytest.raises(InputError, match="does not divide"):
        Request(tokens=1001, parallel=ParallelLayout(sequence=2))
    with pytest.raises(InputError, match="key/value heads"):
        predict(Plan(), nano, on(ParallelLayout(sequence=3)), PROFILE)  # 44,160 tokens divide by 3; 8 kv heads do not


def test_describe_choice_names_the_layout_and_says_per_gpu(nano):
    """A parallel plan's description names the layout and that budget, memory and time are each GPU's."""
    choice = choose_plan(nano, on(CFG_AND_SEQUENCE), 8 * GIB, PROFILE)
    text = describe_choice(choice, 8 * GIB)
    assert CFG_AND_SEQUENCE.describe() in text and "8.0 GiB budget per GPU" in text
    assert "per GPU" not in describe_choice(choose_plan(nano, on(SINGLE), 8 * GIB, PROFILE), 8 * GIB)


def test_cpu_ranks_are_counted_as_processes_not_gpus():
    """If this fails, a run over CPU processes (`--gpus 2 --device cpu`) reports and refuses in GPUs."""
    assert ParallelLayout(cfg=2).describe() == "2 GPUs: CFG-parallel 2"
    assert ParallelLayout(cfg=2, on_cpu=True).describe() == "2 CPU processes: CFG-parallel 2"
    assert ParallelLayout(on_cpu=True).describe() == "one CPU process"
    with pytest.raises(InputError, match="sequence-parallel over 3 CPU processes"):
        ParallelLayout(sequence=3, on_cpu=True).check_tokens(100)
