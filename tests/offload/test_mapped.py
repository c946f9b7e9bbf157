"""A mapped reasoner (read from the checkpoint's files through a pinned bounce ring) generates exactly
what the all-resident run does, holds no host copy of its layers, and the planner's bytes are the engine's."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_pipeline

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.components import load_components, model_configs
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.offload.mapped import Mapped, ReadInPlace
from cosmos3_offload.offload.placements import HostOnly
from cosmos3_offload.planning.memory import host_memory, weight_bytes
from cosmos3_offload.planning.plan import BOUNCE_SLOTS, GroupPlan, Mode, Plan

CPU = torch.device("cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAPPED = Plan(
    reasoner=GroupPlan(mode=Mode.MAPPED), generator=GroupPlan(mode=Mode.STREAMED), vae=GroupPlan(mode=Mode.STAGED)
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny pipeline saved by diffusers (float32 safetensors), as --checkpoint takes it."""
    folder = tmp_path_factory.mktemp("mapped") / "ckpt"
    tiny_pipeline().save_pretrained(folder)
    return folder


def generate(checkpoint, tmp_path, plan, dtype):
    config = GenerationConfig(prompt="a fox", frames=5, resolution=256, steps=2, output=tmp_path / "o.mp4")
    components = load_components(checkpoint, CPU, dtype, plan)
    return components, generate_video(config, components, PhaseTimer(CPU), progress=False)


@pytest.fixture(scope="module")
def resident(checkpoint, tmp_path_factory):
    """resident(dtype): the all-resident run of the checkpoint in `dtype` (a DTYPES key), made once per dtype."""
    runs = {}

    def run(dtype: str):
        if dtype not in runs:
            runs[dtype] = generate(checkpoint, tmp_path_factory.mktemp("resident"), Plan(), DTYPES[dtype])[1]
        return runs[dtype]

    return run


def inside(tensor: torch.Tensor, start: int, end: int) -> bool:
    return start <= tensor.data_ptr() < end


def file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges of `path` mapped into this process (from /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                start, end = (int(a, 16) for a in line.split()[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.parametrize(
    "reasoner",
    [GroupPlan(mode=Mode.MAPPED), GroupPlan(mode=Mode.MAPPED, resident_layers=(0,), ring=3, prefetch=2)],
    ids=["all-mapped", "one-resident-ring3"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mapped_generation_is_bit_identical(checkpoint, resident, tmp_path, dtype, reasoner):
    """Latents and frames equal the all-resident run's exactly; in bf16 from a float32 file too (the
    bounce copy casts as the load does)."""
    resident = resident(dtype)
    plan = Plan(reasoner=reasoner, generator=GroupPlan(mode=Mode.STREAMED), vae=GroupPlan(mode=Mode.STAGED))
    components, mapped = generate(checkpoint, tmp_path, plan, DTYPES[dtype])
    assert isinstance(components.engine.placements["reasoner"], Mapped)
    assert torch.equal(mapped.latents, resident.latents)
    assert (mapped.frames == resident.frames).all()


def test_mapped_layers_are_read_from_the_file_and_run_from_the_ring(checkpoint):
    """Outside the prefill a mapped layer's weights are views of the mapped file (no host copy); while
    yielded they are views of the arena; the only host slab is the bounce ring."""
    components = load_components(checkpoint, CPU, torch.float32, MAPPED)
    engine = components.engine
    group = engine.placements["reasoner"]
    ranges = [r for f in sorted((checkpoint / "transformer").glob("*.safetensors")) for r in file_mappings(f)]
    assert ranges, "the transformer's weight file is not mapped"
    layers = components.transformer.layers
    for index in group.order:
        weight = layers[index].self_attn.to_q.weight
        assert any(inside(weight, *r) for r in ranges), index
    assert group.host_slabs == (group.bounce,)
    assert group.bounce.buffer.numel() == BOUNCE_SLOTS * group.slot_bytes
    with engine.use("reasoner"):
        arena = (engine.arena.buffer.data_ptr(), engine.arena.buffer.data_ptr() + engine.arena.nbytes)
        for index, layer in enumerate(group.layers_ready()):
            assert inside(layer.self_attn.to_q.weight, *arena) == (index in group.order), index
    table = engine.placements["embedding"]
    assert isinstance(table, ReadInPlace)
    assert any(inside(components.transformer.embed_tokens.weight, *r) for r in ranges)


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_holds_the_predicted_host_bytes(checkpoint, dtype):
    """Pinned (bounce ring and slabs), page-cache and private bytes are the planner's, exactly (float32
    file and run); in bf16 from the float32 file the embedding becomes a private cast copy."""
    sizes = model_sizes(*model_configs(checkpoint), dtype_bytes=DTYPES[dtype].itemsize)
    engine = load_components(checkpoint, CPU, DTYPES[dtype], MAPPED).engine
    predicted, host = weight_bytes(MAPPED, sizes), host_memory(MAPPED, sizes)
    for group, nbytes in predicted.arena.items():
        assert engine.placements[group].arena_bytes == nbytes, group
    assert engine.resident_bytes == predicted.resident
    private = sum(s.buffer.numel() for p in engine.placements.values() if isinstance(p, HostOnly) for s in p.host_slabs)
    pinned = engine.host_bytes - private
    if dtype == "fp32":
        assert (pinned, engine.mapped_bytes, private) == (host.pinned, host.page_cache, host.private)
        assert host.private == 0 and host.page_cache > 0
    else:
        embedding = sizes.embedding
        assert pinned == host.pinned and private == embedding.packed
        assert engine.mapped_bytes == 2 * (host.page_cache - embedding.payload)  # float32 file bytes


def test_mapping_needs_a_checkpoint():
    """Random weights have no file to map: a mapped plan is refused before anything is allocated."""
    with pytest.raises(InputError, match="random weights .* pass --checkpoint DIR, or stream or stage the reasoner"):
        load_components(None, CPU, torch.float32, MAPPED)


@pytest.mark.parametrize("group", ["generator", "vae"])
def test_only_the_reasoner_can_be_mapped(group):
    """The generator runs every step and the VAE is staged whole: mapping either is refused."""
    with pytest.raises(InputError, match="mapped"):
        Plan(**{group: GroupPlan(mode=Mode.MAPPED)})
