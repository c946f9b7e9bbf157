"""Staged weights round-trip exactly and staged generation equals all-resident generation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.runner import generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading import placer as loading
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.model.groups import PLANNED_GROUPS, SOUND, USE_ORDER, check_offload_groups
from cosmos3_offload.offload.placements import HostOnly, Staged
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.split.prefill import prefill

CPU = torch.device("cpu")
ALL = frozenset(PLANNED_GROUPS)


def roots(components):
    return {
        "reasoner": components.transformer,
        "generator": components.transformer,
        "vae": components.vae,
        "vae_encoder": components.vae,
    }


def inside(tensor, buffer):
    start = buffer.data_ptr()
    return start <= tensor.data_ptr() < start + buffer.numel()


def group_tensors(components, group):
    placement = components.engine.placements[group]
    root = roots(components)[group]
    return {name: root.get_parameter(name) for e in placement.layout.entries for name in e.names}


def test_staged_weights_round_trip_exactly_over_many_cycles():
    """Over repeated stage/unstage cycles each weight stays bit-identical: in the arena staged, in its slab after."""
    components = load_components(None, CPU, torch.float32, Plan.from_offload(ALL))
    engine = components.engine
    order = engine.use_order  # USE_ORDER without the sound group, which only a request with sound loads
    assert order == tuple(g for g in USE_ORDER if g != SOUND)
    originals = {g: {n: t.clone() for n, t in group_tensors(components, g).items()} for g in order}
    for _ in range(3):
        for group in order:
            slab = engine.placements[group].slab.buffer
            with engine.use(group):
                for name, tensor in group_tensors(components, group).items():
                    assert inside(tensor, engine.arena.buffer) and torch.equal(tensor, originals[group][name])
            for name, tensor in group_tensors(components, group).items():
                assert inside(tensor, slab) and torch.equal(tensor, originals[group][name])


def test_arena_holds_only_the_group_in_use():
    """The arena fits the staged group in use, never a larger one still to come; it is released once the
    rest of the request needs less."""
    engine = load_components(None, CPU, torch.float32, Plan.from_offload(ALL)).engine
    sizes = {g: engine.placements[g].layout.nbytes for g in PLANNED_GROUPS}
    for group in PLANNED_GROUPS:
        with engine.use(group):
            assert engine.arena.nbytes == sizes[group]
    assert engine.arena.nbytes == 0
    assert engine.arena.peak_bytes == max(sizes.values())


def generate(tmp_path, offload):
    config = GenerationConfig(prompt="a fox", frames=5, resolution=256, steps=2, output=tmp_path / "o.mp4")
    components = load_components(None, CPU, torch.float32, Plan.from_offload(offload))
    return generate_video(config, components, PhaseTimer(CPU), progress=False)


@pytest.mark.parametrize(
    "offload",
    [frozenset(c) for n in range(1, 4) for c in itertools.combinations(PLANNED_GROUPS, n)],
    ids=lambda o: "+".join(sorted(o)),
)
def test_generation_with_staged_groups_equals_all_resident(tmp_path, offload):
    """Latents and frames are bit-identical to the all-resident run for every combination of staged groups."""
    resident = generate(tmp_path, frozenset())
    staged = generate(tmp_path, offload)
    assert torch.equal(staged.latents, resident.latents)
    assert np.array_equal(staged.frames, resident.frames)


def test_offloaded_groups_are_never_allocated_on_the_device(monkeypatch):
    """Device allocations during load are exactly the resident groups' weights; offloaded ones live in their slabs."""
    allocated = []
    real = loading.allocate_on_device

    def record(entry, device):
        allocated.extend(entry.names)
        return real(entry, device)

    monkeypatch.setattr(loading, "allocate_on_device", record)
    components = load_components(None, CPU, torch.float32, Plan.from_offload({"generator", "vae"}))
    staged = {n for g in ("generator", "vae") for n in group_tensors(components, g)}
    assert allocated and not staged.intersection(allocated)
    assert set(group_tensors(components, "reasoner")) <= set(allocated)
    for group in ("generator", "vae"):
        placement = components.engine.placements[group]
        assert isinstance(placement, Staged)
        assert all(inside(t, placement.slab.buffer) for t in group_tensors(components, group).values())


def test_embedding_stays_on_the_host_when_the_reasoner_is_offloaded():
    """The embedding table lives in an unpinned host slab outside the arena, and the prefill that
    gathers the prompt's rows there equals the all-resident prefill exactly."""
    resident = load_components(None, CPU, torch.float32, Plan())
    offloaded = load_components(None, CPU, torch.float32, Plan.from_offload({"reasoner"}))
    engine = offloaded.engine
    table = engine.placements["embedding"]
    assert isinstance(table, HostOnly) and not table.slab.pinned and table.arena_bytes == 0
    assert inside(offloaded.transformer.embed_tokens.weight, table.slab.buffer)
    staged_names = {n for e in engine.placements["reasoner"].layout.entries for n in e.names}
    assert "embed_tokens.weight" not in staged_names
    ids = torch.tensor([3, 70, 101, 250, 7, 7, 256])
    positions = torch.arange(len(ids)).expand(3, -1)
    expected = prefill(resident.transformer, ids, positions)
    with engine.use("reasoner"):
        assert not inside(offloaded.transformer.embed_tokens.weight, engine.arena.buffer)
        actual = prefill(offloaded.transformer, ids, positions, layers=engine.layers("reasoner"))
    for got, want in zip(actual.keys + actual.values, expected.keys + expected.values, strict=True):
        assert torch.equal(got, want)


def test_unknown_stage_is_refused():
    """Unknown stage names list the choices."""
    with pytest.raises(InputError, match="choose from reasoner generator vae"):
        check_offload_groups(["reasoner", "text"])


def test_encoder_and_decoder_sides_are_staged_apart():
    """The decode holds the decoder side only and the encode the encoder side only."""
    components = load_components(None, CPU, torch.float32, Plan.from_offload({"vae"}))
    engine, vae = components.engine, components.vae
    decoder = engine.placements["vae"].layout.nbytes
    encoder = engine.placements["vae_encoder"].layout.nbytes
    with engine.use("vae"):
        assert engine.arena.nbytes == decoder
        assert inside(vae.decoder.conv_in.weight, engine.arena.buffer)
        assert not inside(vae.encoder.conv_in.weight, engine.arena.buffer)
    with engine.use("vae_encoder"):
        assert inside(vae.encoder.conv_in.weight, engine.arena.buffer)
        assert not inside(vae.decoder.conv_in.weight, engine.arena.buffer)
    payload = engine.placements["vae"].payload_bytes + engine.placements["vae_encoder"].payload_bytes
    assert payload == sum(p.numel() * p.element_size() for p in vae.parameters()) and 0 < encoder < decoder
