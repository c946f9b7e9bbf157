"""The planner's weight bytes are exactly what the offload engine allocates, for every plan kind.

`loading.sizes.model_sizes` measures a model on `meta`; `planning.memory.weight_bytes` turns that
into resident, arena, pinned and host bytes for a plan. Here the tiny models are really loaded on
the CPU under every kind of plan and the engine's allocations are measured three ways: its own
accounting, the model's parameters (device tensors vs. views into host slabs) and a generation's
arena peak. Nano is checked on `meta` against the layouts the loader would build.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.loading.placer import LAYER_MARK, weight_grouping
from cosmos3_offload.loading.quantization import Fp8Options
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.groups import (
    EMBEDDING,
    GENERATOR,
    PLANNED_GROUPS,
    REASONER,
    UNUSED,
    VAE,
    VAE_ENCODER,
    vae_group_of,
)
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.offload.materialize import build_on_meta, group_layouts, keep_fp32_dtype
from cosmos3_offload.offload.placements import HostOnly
from cosmos3_offload.offload.slabs import align
from cosmos3_offload.planning.memory import WeightBytes, weight_bytes
from cosmos3_offload.planning.plan import BOUNCE_SLOTS, GroupPlan, Mode, Plan
from cosmos3_offload.planning.search import candidates, spread

CPU = torch.device("cpu")
MODELS = ("tiny", "tiny-deep")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENGINE_GROUPS = (EMBEDDING, REASONER, GENERATOR, VAE, VAE_ENCODER)


def layers_of(model: str) -> int:
    return model_spec(model).transformer["num_hidden_layers"]


def streamed(resident_layers: tuple[int, ...] = (), ring: int = 2) -> GroupPlan:
    return GroupPlan(mode=Mode.STREAMED, resident_layers=resident_layers, ring=ring, prefetch=ring - 1)


def plan_kinds(layers: int) -> dict[str, Plan]:
    """Every kind of placement the engine has, each group in each home at least once."""
    kinds = {"resident": Plan()}
    for n in range(1, len(PLANNED_GROUPS) + 1):
        for groups in itertools.combinations(PLANNED_GROUPS, n):
            kinds["staged-" + "+".join(groups)] = Plan.from_offload(groups)
    # The streamed generator as the planner builds it (resident layers spread, vae staged), with
    # the reasoner in each of its modes along the way.
    counts = sorted({0, layers // 2, layers - 1})
    # (A mapped reasoner needs a checkpoint's files: tests/offload/test_mapped.py compares its bytes.)
    reasoners = itertools.cycle([m for m in Mode if m is not Mode.MAPPED])
    for count, ring in itertools.product(counts, (2, 3)):
        kinds[f"generator-streamed-{count}-resident-ring{ring}"] = Plan(
            reasoner=GroupPlan(mode=next(reasoners)),
            generator=streamed(spread(layers, count), ring),
            vae=GroupPlan(mode=Mode.STAGED),
        )
    # The streamed reasoner: its last layer is smaller (its output path is never loaded).
    kinds["reasoner-streamed"] = Plan(reasoner=streamed())
    kinds["reasoner-streamed-some-resident"] = Plan(
        reasoner=streamed(spread(layers, layers // 2), ring=3),
        generator=GroupPlan(mode=Mode.STAGED),
        vae=GroupPlan(mode=Mode.STAGED),
    )
    # Only the small last layer streams: the ring's slot is that layer's, not a full layer's.
    kinds["reasoner-streams-only-its-last-layer"] = Plan(
        reasoner=streamed(tuple(range(layers - 1)), ring=3), generator=streamed(spread(layers, 1))
    )
    return kinds


CASES = [(m, d, k) for m in MODELS for d in DTYPES for k in plan_kinds(layers_of(m))]

FP8 = Fp8Options(quantize="fp8")


@functools.cache
def sizes_of(model: str, dtype: str):
    spec = model_spec(model)
    return model_sizes(spec.transformer, spec.vae, DTYPES[dtype].itemsize)


def load(model: str, dtype: str, kind: str):
    plan = plan_kinds(layers_of(model))[kind]
    components = load_components(None, CPU, DTYPES[dtype], plan, random_model=model)
    return plan, components


def inside(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    start = buffer.data_ptr()
    return start <= tensor.data_ptr() < start + buffer.numel()


def device_parameter_bytes(components, slabs) -> int:
    """Bytes of every materialized parameter that is not a view into a host slab."""
    return sum(
        p.numel() * p.element_size()
        for root in (components.transformer, components.vae)
        for _, p in root.named_parameters()
        if not p.is_meta and not any(inside(p, s.buffer) for s in slabs)
    )


def group_signatures(plan: Plan, layers: int) -> set[tuple]:
    """What decides a plan's weight bytes, per group (the bytes add up group by group; the
    embedding follows the reasoner): the mode and, streamed, the resident-layer share and ring."""
    signatures = set()
    for group in PLANNED_GROUPS:
        how = plan.group(group)
        if how.mode is not Mode.STREAMED:
            signatures.add((group, how.mode))
            continue
        kept = len(how.resident_layers)
        share = "none" if kept == 0 else "all-but-one" if kept == layers - 1 else "some"
        signatures.add((group, how.mode, share, how.ring))
    return signatures


@pytest.mark.parametrize("model", MODELS)
def test_the_kinds_cover_every_placement_the_planner_considers(model):
    """If this fails, the planner gained a placement whose bytes these tests never compare with the engine."""
    layers = layers_of(model)
    covered = set().union(*(group_signatures(p, layers) for p in plan_kinds(layers).values()))
    for plan in candidates(sizes_of(model, "bf16")):
        assert group_signatures(plan, layers) <= covered, plan.describe()


@pytest.mark.parametrize("model, dtype, kind", CASES)
def test_engine_allocates_the_predicted_weight_bytes(model, dtype, kind):
    """If this fails, the planner's resident, arena or host bytes differ from the engine's: its budgets are wrong."""
    plan, components = load(model, dtype, kind)
    predicted = weight_bytes(plan, sizes_of(model, dtype))
    assert_engine_allocates(components, predicted)
    # The layout sums the nano test relies on agree with the engine where it can be measured.
    assert loader_weight_bytes(plan, *meta_models(model), DTYPES[dtype]) == predicted


@pytest.mark.parametrize("kind", plan_kinds(layers_of("tiny-deep")))
def test_engine_allocates_the_predicted_fp8_weight_bytes(kind):
    """With --quantize fp8 the planner counts each weight's own bytes (FP8 linears, float32 scales,
    bf16 rest) exactly as the engine allocates them, in every kind of placement."""
    plan = plan_kinds(layers_of("tiny-deep"))[kind]
    components = load_components(None, CPU, torch.bfloat16, plan, random_model="tiny-deep", fp8=FP8)
    spec = model_spec("tiny-deep")
    sizes = model_sizes(spec.transformer, spec.vae, 2, quantization=components.quantization)
    assert_engine_allocates(components, weight_bytes(plan, sizes))
    assert sizes.towers["generator"].whole.payload < sizes_of("tiny-deep", "bf16").towers["generator"].whole.payload


def assert_engine_allocates(components, predicted) -> None:
    engine = components.engine
    assert set(engine.placements) == set(ENGINE_GROUPS)
    assert engine.placements[EMBEDDING].arena_bytes == 0
    for group, nbytes in predicted.arena.items():
        assert engine.placements[group].arena_bytes == nbytes, group
    slabs = [s for p in engine.placements.values() for s in p.host_slabs]
    unpinned = [s for p in engine.placements.values() if isinstance(p, HostOnly) for s in p.host_slabs]
    # The engine's account, and the parameters themselves: device tensors vs. views into the slabs.
    assert predicted.resident == engine.resident_bytes == device_parameter_bytes(components, slabs)
    assert predicted.pinned + predicted.host == engine.host_bytes == sum(s.buffer.numel() for s in slabs)
    assert predicted.host == sum(s.buffer.numel() for s in unpinned)
    assert predicted.pinned == sum(s.buffer.numel() for s in slabs if not any(s is u for u in unpinned))
    assert engine.pinned_bytes == 0  # nothing can be page-locked on the CPU


# The arena peak follows from the placements' arena bytes (compared above for every case), so
# generating every kind once in float32 on tiny-deep covers it; a decode takes ~0.5 s in float32
# and ~5 s in bfloat16 on the CPU, so tiny and bfloat16 generate the kind with the smallest slot.
GENERATION_CASES = [("tiny-deep", "fp32", k) for k in plan_kinds(layers_of("tiny-deep"))] + [
    ("tiny", "fp32", "reasoner-streams-only-its-last-layer"),
    ("tiny-deep", "bf16", "reasoner-streams-only-its-last-layer"),
]


@pytest.mark.parametrize("model, dtype, kind", GENERATION_CASES)
def test_generation_arena_peak_is_the_predicted_arena_peak(tmp_path, model, dtype, kind):
    """If this fails, the arena a generation really reserves differs from the planner's arena peak."""
    plan, components = load(model, dtype, kind)
    config = GenerationConfig(prompt="a fox", frames=5, resolution=256, steps=1, output=tmp_path / "o.mp4")
    generate_video(config, components, PhaseTimer(CPU), progress=False)
    predicted = weight_bytes(plan, sizes_of(model, dtype))
    assert components.engine.arena.peak_bytes == max(predicted.arena.values()) == predicted.arena_peak
    assert components.engine.arena.nbytes == 0  # released after the decode


# --- nano, on meta: the layouts the loader would build for a plan, summed as the loader places them.


@functools.cache
def meta_models(model: str):
    spec = model_spec(model)
    return build_on_meta(Cosmos3OmniTransformer, spec.transformer), build_on_meta(AutoencoderKLWan, spec.vae)


def loader_weight_bytes(plan: Plan, transformer, vae, dtype: torch.dtype) -> WeightBytes:
    """The bytes the loader allocates for `plan`, from its own grouping and packing: device tensors
    for resident groups (payload), one host slab per staged group or streamed layer (packed), an
    unpinned slab for the embedding when the reasoner moves, a ring of aligned slots per streamed tower."""
    layers = transformer.config.num_hidden_layers
    layouts = group_layouts(transformer, weight_grouping(plan, layers), keep_fp32_dtype(Cosmos3OmniTransformer, dtype))
    layouts |= group_layouts(vae, vae_group_of, keep_fp32_dtype(AutoencoderKLWan, dtype))
    resident = pinned = host = mapped = 0
    arena = {group: 0 for group in (REASONER, GENERATOR, VAE, VAE_ENCODER)}
    slots: dict[str, list[int]] = {REASONER: [], GENERATOR: []}
    for group, layout in layouts.items():
        tower, _, layer = group.partition(LAYER_MARK)
        if group == UNUSED:
            continue
        if layer:
            slots[tower].append(align(layout.nbytes))
            if plan.group(tower).mode is Mode.MAPPED:
                mapped += layout.payload_bytes  # read from the file, in place
            else:
                pinned += layout.nbytes
        elif group == EMBEDDING:
            if plan.reasoner.mode is Mode.MAPPED:
                mapped += layout.payload_bytes
            elif plan.reasoner.moves_weights:
                host += layout.nbytes
            else:
                resident += layout.payload_bytes
        elif plan.group(group).mode is Mode.STAGED:
            arena[group] = layout.nbytes
            pinned += layout.nbytes
        else:
            resident += layout.payload_bytes
    for tower, sizes in slots.items():
        if sizes:
            arena[tower] = plan.group(tower).ring * max(sizes)
            pinned += BOUNCE_SLOTS * max(sizes) if plan.group(tower).mode is Mode.MAPPED else 0
    return WeightBytes(resident=resident, arena=arena, pinned=pinned, host=host, mapped=mapped)


def nano_plans(layers: int) -> dict[str, Plan]:
    return {
        "resident": Plan(),
        "staged": Plan.from_offload(PLANNED_GROUPS),
        "streamed": Plan(
            reasoner=streamed(), generator=streamed(spread(layers, 6), ring=3), vae=GroupPlan(mode=Mode.STAGED)
        ),
        "reasoner-mapped": Plan(
            reasoner=GroupPlan(mode=Mode.MAPPED), generator=streamed(spread(layers, 6)), vae=GroupPlan(mode=Mode.STAGED)
        ),
        "reasoner-mapped-but-its-last-layer": Plan(
            reasoner=GroupPlan(mode=Mode.MAPPED, resident_layers=tuple(range(layers - 1)))
        ),
        "last-layers-streamed": Plan(
            reasoner=streamed(tuple(range(layers - 1))), generator=streamed(tuple(range(1, layers)), ring=3)
        ),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_nano_weight_bytes_are_the_layouts_the_loader_would_build(dtype):
    """If this fails, the planner's bytes at real sizes miss alignment or grouping that the loader applies."""
    sizes = sizes_of("nano", dtype)
    transformer, vae = meta_models("nano")
    plans = nano_plans(sizes.layers)
    # A spread of the planner's own placements too (chunking and tiling do not move weights).
    placements = dict.fromkeys(
        replace(p, mlp_chunk=None, decode_grid=Plan().decode_grid) for p in candidates(sizes, mapped=True)
    )
    plans |= {f"candidate-{i}": p for i, p in enumerate(list(placements)[::29])}
    for name, plan in plans.items():
        assert weight_bytes(plan, sizes) == loader_weight_bytes(plan, transformer, vae, DTYPES[dtype]), name
