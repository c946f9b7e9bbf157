"""Streamed layers give bit-identical generations; the ring wraps; CFG branches share each layer pass."""

from __future__ import annotations

import itertools

import pytest
import torch
from joint_cases import LONG_PROMPT, joint_case
from tiny_models import relative_error

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.offload.streaming import Streamed
from cosmos3_offload.planning.plan import GroupPlan, Plan
from cosmos3_offload.split.denoise import denoise, denoise_branches
from cosmos3_offload.split.prefill import prefill, prefill_prompts

CPU = torch.device("cpu")
STEPS = 3


def generate(tmp_path, plan):
    config = GenerationConfig(prompt="a fox", frames=5, resolution=256, steps=STEPS, output=tmp_path / "o.mp4")
    components = load_components(None, CPU, torch.float32, plan, random_model="tiny-deep")
    return components, generate_video(config, components, PhaseTimer(CPU), progress=False)


@pytest.fixture(scope="module")
def resident(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("resident"), Plan())[1]


@pytest.mark.parametrize(
    "reasoner, generator",
    [
        (GroupPlan(mode="streamed"), GroupPlan(mode="streamed")),
        (GroupPlan(mode="staged"), GroupPlan(mode="streamed", resident_layers=(1, 4), ring=3, prefetch=2)),
        (GroupPlan(mode="streamed", ring=3, prefetch=1), GroupPlan(mode="streamed", resident_layers=(0, 2, 5))),
    ],
    ids=["all-streamed", "two-resident-ring3", "three-resident"],
)
def test_streamed_generation_is_bit_identical(tmp_path, resident, reasoner, generator):
    """Latents and frames equal the all-resident run exactly, whatever the ring, prefetch and resident layers."""
    _, streamed = generate(tmp_path, Plan(reasoner=reasoner, generator=generator, vae=GroupPlan(mode="staged")))
    assert torch.equal(streamed.latents, resident.latents)
    assert (streamed.frames == resident.frames).all()


def test_ring_wraps_from_the_last_layer_to_the_first(tmp_path):
    """Copies follow the streamed layers cyclically across steps; each step moves each streamed layer once."""
    plan = Plan(generator=GroupPlan(mode="streamed", resident_layers=(2,), ring=2, prefetch=1))
    components, _ = generate(tmp_path, plan)
    group = components.engine.placements["generator"]
    assert isinstance(group, Streamed) and group.order == [0, 1, 3, 4, 5]
    cycle = list(itertools.islice(itertools.cycle(group.order), len(group.copied_layers)))
    assert group.copied_layers == cycle
    # STEPS full passes, plus at most the prefetched start of a step that never came.
    assert STEPS * 5 <= len(group.copied_layers) <= STEPS * 5 + group.prefetch


def inside(tensor, buffer):
    return buffer.data_ptr() <= tensor.data_ptr() < buffer.data_ptr() + buffer.numel()


def test_streamed_layers_run_from_the_ring_and_go_back_to_their_host_slabs():
    """A yielded streamed layer's weights are views of the arena; outside its phase, of its own host slab."""
    plan = Plan(generator=GroupPlan(mode="streamed", resident_layers=(3,)))
    components = load_components(None, CPU, torch.float32, plan, random_model="tiny-deep")
    group = components.engine.placements["generator"]
    arena = components.engine.arena
    with components.engine.use("generator"):
        for index, layer in enumerate(group.layers_ready()):
            in_ring = inside(layer.mlp_moe_gen.up_proj.weight, arena.buffer)
            assert in_ring == (index != 3), index
    for index, slab in group.streamed.items():
        start, end = slab.buffer.data_ptr(), slab.buffer.data_ptr() + slab.buffer.numel()
        weight = components.transformer.layers[index].mlp_moe_gen.up_proj.weight
        assert start <= weight.data_ptr() < end


def test_cfg_branches_fused_per_layer_equal_separate_passes(pipeline):
    """Prompts of different lengths through each layer together give exactly their separate results."""
    cond, uncond = joint_case(pipeline, LONG_PROMPT, 5), joint_case(pipeline, "", 5)
    model = pipeline.transformer
    prompts = [(c.packed["input_ids"], c.packed["text_mrope_ids"]) for c in (cond, uncond)]
    fused_memories = prefill_prompts(model, prompts)
    for memory, prompt in zip(fused_memories, prompts):
        alone = prefill(model, *prompt)
        assert all(torch.equal(a, b) for a, b in zip(memory.keys + memory.values, alone.keys + alone.values))
    fused = denoise_branches(model, [(cond.layout, fused_memories[0]), (uncond.layout, fused_memories[1])], cond.inputs)
    assert torch.equal(fused[0].vision, denoise(model, cond.layout, fused_memories[0], cond.inputs).vision)
    assert torch.equal(fused[1].vision, denoise(model, uncond.layout, fused_memories[1], uncond.inputs).vision)


def test_chunked_mlp_matches_the_whole_mlp(pipeline):
    """MLP over token chunks equals the whole-sequence MLP up to float rounding."""
    case = joint_case(pipeline, "a dog", 9)
    model = pipeline.transformer
    memory = prefill(model, case.packed["input_ids"], case.packed["text_mrope_ids"])
    whole = denoise_branches(model, [(case.layout, memory)], case.inputs)[0].vision
    chunked = denoise_branches(model, [(case.layout, memory)], case.inputs, mlp_chunk=37)[0].vision
    assert case.layout.tokens > 37
    assert relative_error(chunked, whole) <= 1e-6


def test_bad_stream_settings_are_refused():
    """A ring under two slots or a prefetch depth the ring cannot hold is refused."""
    from cosmos3_offload.errors import InputError

    with pytest.raises(InputError, match="at least 2 slots"):
        GroupPlan(mode="streamed", ring=1)
    with pytest.raises(InputError, match="prefetch depth"):
        GroupPlan(mode="streamed", ring=2, prefetch=2)
    with pytest.raises(InputError, match="not streamed"):
        Plan(vae=GroupPlan(mode="streamed"))
