"""Processes of one host share one host copy of the weights: each loads what one process alone loads,
only the owner writes the shared slabs, and nothing is left in the share's folder."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.loading.quantization import NO_FP8_FLAGS, Fp8Options
from cosmos3_offload.offload.shared import HostShare
from cosmos3_offload.planning.plan import GroupPlan, Plan

CPU = torch.device("cpu")
FORK = multiprocessing.get_context("fork")  # children inherit the imports: spawning re-imports diffusers (slow)
TIMEOUT = 60.0
STAGED = Plan.from_offload(["reasoner", "generator", "vae"])
# The reasoner staged, the generator's layer 0 streamed (layer 1 and its head on the device), the VAE staged.
STREAMED = Plan(
    reasoner=GroupPlan(mode="staged"),
    generator=GroupPlan(mode="streamed", resident_layers=(1,)),
    vae=GroupPlan(mode="staged"),
)
FP8 = Fp8Options(quantize="fp8")


def no_wait() -> None:
    pass


def load(plan, fp8=NO_FP8_FLAGS, share=None, seed=0):
    return load_components(None, CPU, torch.float32, plan, random_model="tiny", seed=seed, fp8=fp8, host_share=share)


def weights(components) -> dict[str, torch.Tensor]:
    """Every materialized parameter's bytes (FP8 included), by name."""
    named = [("transformer." + n, p) for n, p in components.transformer.named_parameters()]
    named += [("vae." + n, p) for n, p in components.vae.named_parameters()]
    return {n: p.detach().reshape(-1).view(torch.uint8).clone() for n, p in named if not p.is_meta}


def slab_names(components, *, shared_only: bool = True) -> set[str]:
    """Names of the parameters that live in (shared) host slabs."""
    names = set()
    for placement in components.engine.placements.values():
        root = "vae" if placement.name.startswith("vae") else "transformer"
        for slab in placement.host_slabs:
            if slab.shared or not shared_only:
                names.update(f"{root}.{name}" for entry in slab.layout.entries for name in entry.names)
    return names


def _rank(directory, owner: bool, barrier, plan, fp8, out) -> None:
    """One process of the host: load with the share, save its weights for the test to compare."""
    torch.set_num_threads(1)  # two ranks on CI's two cores
    share = HostShare(name="two-ranks", owner=owner, wait=barrier.wait, directory=directory)
    components = load(plan, fp8, share)
    torch.save({"weights": weights(components), "shared": slab_names(components)}, out)


@pytest.mark.parametrize("plan, fp8", [(STAGED, NO_FP8_FLAGS), (STREAMED, FP8)], ids=["staged", "streamed-fp8"])
def test_two_processes_load_what_one_process_loads(tmp_path, plan, fp8):
    """Owner and non-owner both hold every weight of a single-process load, bit for bit, with every host
    slab shared, and leave no file in the share's folder."""
    folder = tmp_path / "shm"
    folder.mkdir()
    barrier = FORK.Barrier(2, timeout=TIMEOUT)
    outs = [tmp_path / "owner.pt", tmp_path / "other.pt"]
    processes = [
        FORK.Process(target=_rank, args=(folder, owner, barrier, plan, fp8, out))
        for owner, out in zip((True, False), outs)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(TIMEOUT)
    assert [p.exitcode for p in processes] == [0, 0]
    expected = load(plan, fp8)
    for out in outs:
        loaded = torch.load(out)
        assert loaded["shared"] == slab_names(expected, shared_only=False)
        assert loaded["weights"].keys() == weights(expected).keys()
        for name, value in weights(expected).items():
            assert torch.equal(loaded["weights"][name], value), (out.name, name)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("fp8", [NO_FP8_FLAGS, FP8], ids=["plain", "fp8"])
def test_a_non_owner_writes_only_its_device_homes(tmp_path, fp8):
    """Alone, a non-owner leaves the shared slabs as it found them (zeros: nobody filled them) and still fills
    its device-resident weights, through the quantizing fill too."""
    alone = load(STREAMED, fp8, HostShare(name="alone", owner=False, wait=no_wait, directory=tmp_path))
    expected = weights(load(STREAMED, fp8))
    shared = slab_names(alone)
    assert shared and len(shared) < len(expected)  # some weights on the device, some in shared slabs
    for name, value in weights(alone).items():
        if name in shared:
            assert not value.any(), name
        else:
            assert torch.equal(value, expected[name]), name
    assert list(tmp_path.iterdir()) == []


def test_a_share_without_room_is_refused_and_leaves_no_file(tmp_path, monkeypatch):
    """When the folder fills up partway through placing, the load stops with an InputError and the files
    already made are removed."""
    room = 2**20  # the embedding, reasoner and generator slabs fit; the VAE encoder's does not
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((0, 1, 0, 0, room, 0, 0, 0, 0, 255)))
    made = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a: made.append(path) or real_open(path, *a))
    with pytest.raises(InputError, match="shm-size"):
        load(STAGED, share=HostShare(name="full", owner=True, wait=no_wait, directory=tmp_path))
    assert any(os.path.dirname(path) == str(tmp_path) for path in made) and list(tmp_path.iterdir()) == []


def test_a_missing_share_folder_is_refused(tmp_path):
    """A share folder that does not exist: an InputError saying how to fix it, before any weight is written."""
    with pytest.raises(InputError, match="is not a folder.*shm-size"):
        load(STAGED, share=HostShare(name="nowhere", owner=True, wait=no_wait, directory=tmp_path / "missing"))


def test_without_a_share_nothing_is_shared_and_the_summary_is_unchanged(tmp_path):
    """No share: private slabs and the summary without a shared total; with one, the summary gives it."""
    private = load(STAGED)
    shared = load(STAGED, share=HostShare(name="summary", owner=True, wait=no_wait, directory=tmp_path))
    assert not any(s.shared for p in private.engine.placements.values() for s in p.host_slabs)
    assert private.engine.shared_bytes == 0 and "shared" not in private.engine.summary()
    assert shared.engine.shared_bytes == shared.engine.host_bytes == private.engine.host_bytes > 0
    assert "host slabs shared by this host's processes 3.8 MiB" in shared.engine.summary()
