"""One host copy per node for processes that start at different times: the first fills it once, later ones
map the complete copy (host memory ~ one copy), a dead owner's share is taken over, and only
`remove_node_share` deletes it."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from share_memory import share_memory_kib

from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.offload.node_share import (
    LOCK,
    NodeFiles,
    NodeShare,
    node_share_folder,
    node_share_name,
    remove_node_share,
)
from cosmos3_offload.planning.plan import Plan

CPU = torch.device("cpu")
FORK = multiprocessing.get_context("fork")  # children inherit the imports: spawning re-imports diffusers (slow)
TIMEOUT = 60.0
STAGED = Plan.from_offload(["reasoner", "generator", "vae"])
NAME = "run1-tiny-staged"


@pytest.fixture
def shm():
    """A folder on the node's tmpfs (where shares live), removed after the test."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="test-node-share-", dir=base))
    yield folder
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()


def load(share=None):
    return load_components(None, CPU, torch.float32, STAGED, random_model="tiny", host_share=share)


def weights(components) -> dict[str, bytes]:
    """Every materialized parameter's bytes, by name."""
    named = [("transformer." + n, p) for n, p in components.transformer.named_parameters()]
    named += [("vae." + n, p) for n, p in components.vae.named_parameters()]
    return {n: bytes(p.detach().reshape(-1).view(torch.uint8).numpy()) for n, p in named if not p.is_meta}


def _replica(folder, out, loaded, measured) -> None:
    """One replica: load with the node share, save its weights and whether it filled the share, stay alive
    until the test has measured it."""
    torch.set_num_threads(1)  # CI's two cores
    opened: list[NodeFiles] = []
    open_files = NodeShare.open_files
    NodeShare.open_files = lambda share: opened.append(open_files(share)) or opened[-1]  # this child's only
    components = load(NodeShare(NAME, directory=folder, timeout_s=TIMEOUT))
    torch.save({"weights": weights(components), "filled": [files.owner for files in opened]}, out)
    loaded.set()
    measured.wait(TIMEOUT)


def _owner_killed_before_marker(folder, started) -> None:
    """An owner that fills the share with wrong values and is killed before its marker."""
    torch.set_num_threads(1)

    def die(self):
        for path in self.paths:
            path.write_bytes(b"\xff" * path.stat().st_size)  # garbage the next owner must not keep
        started.set()
        time.sleep(0.5)  # the next process is already waiting on the lock
        os.kill(os.getpid(), signal.SIGKILL)

    NodeFiles.wait_filled = die
    load(NodeShare(NAME, directory=folder, timeout_s=TIMEOUT))


def start(target, *args) -> multiprocessing.Process:
    process = FORK.Process(target=target, args=args)
    process.start()
    return process


def test_a_late_replica_maps_the_complete_copy_and_the_node_holds_it_once(shm):
    """The first replica fills the share; one started after it maps it without refilling; both hold a plain
    load's weights bit for bit, and their summed Pss of the share is one copy (each maps all of it)."""
    outs, measured = [shm / "first.pt", shm / "late.pt"], FORK.Event()
    loaded = [FORK.Event(), FORK.Event()]
    first = start(_replica, shm, outs[0], loaded[0], measured)
    assert loaded[0].wait(TIMEOUT)
    folder = node_share_folder(NAME, shm)
    slab_files = [p for p in folder.iterdir() if p.name.startswith("slab-")]
    filled_at = {p.name: p.stat().st_mtime_ns for p in slab_files}
    late = start(_replica, shm, outs[1], loaded[1], measured)
    try:
        assert loaded[1].wait(TIMEOUT)
        copy_kib = sum(p.stat().st_size for p in slab_files) / 1024
        (rss_first, pss_first), (rss_late, pss_late) = (share_memory_kib(p.pid, folder) for p in (first, late))
    finally:
        measured.set()
    for p in (first, late):
        p.join(TIMEOUT)
        assert p.exitcode == 0
    assert copy_kib > 1024  # the tiny model's staged slabs: a few MiB
    assert rss_first >= 0.95 * copy_kib and rss_late >= 0.95 * copy_kib  # each maps the whole copy...
    assert abs((pss_first + pss_late) - copy_kib) <= 0.05 * copy_kib + 64  # ...and the node holds it once
    first_run, late_run = torch.load(outs[0]), torch.load(outs[1])
    assert first_run["filled"] + late_run["filled"] == [True, False]  # one load each, one fill in all
    assert {p.name: p.stat().st_mtime_ns for p in slab_files} == filled_at
    assert json.loads((folder / "complete").read_text())["filled_by"] == first.pid
    expected = weights(load())
    assert first_run["weights"] == expected and late_run["weights"] == expected


def test_an_owner_killed_before_its_marker_is_taken_over_and_refilled(shm):
    """The owner dies (SIGKILL) after writing garbage but before its marker: a process waiting on the share
    takes it over, refills it, and holds a plain load's weights."""
    started, loaded, measured = FORK.Event(), FORK.Event(), FORK.Event()
    doomed = start(_owner_killed_before_marker, shm, started)
    assert started.wait(TIMEOUT)
    out = shm / "next.pt"
    successor = start(_replica, shm, out, loaded, measured)
    assert loaded.wait(TIMEOUT)
    measured.set()
    for p in (doomed, successor):
        p.join(TIMEOUT)
    assert doomed.exitcode == -signal.SIGKILL and successor.exitcode == 0
    result = torch.load(out)
    assert result["filled"] == [True]
    assert json.loads((node_share_folder(NAME, shm) / "complete").read_text())["filled_by"] == successor.pid
    assert result["weights"] == weights(load())


def owner_files(folder: Path, name: str = "unit", **slabs: int) -> NodeFiles:
    """An owner of share `name` that has mapped `slabs` (key -> bytes), filled with their size mod 256."""
    files = NodeShare(name, directory=folder).open_files()
    assert files.owner
    for key, nbytes in slabs.items():
        files.map(key, nbytes).fill_(nbytes % 256)
    return files


def test_a_reader_waits_for_the_owner_and_maps_its_values(shm):
    """While an owner fills the share, another process's open blocks; once published, it reads the values."""
    owner = owner_files(shm, a=4097)
    opened: list[NodeFiles] = []
    reader = threading.Thread(target=lambda: opened.append(NodeShare("unit", directory=shm).open_files()))
    reader.start()
    time.sleep(0.3)
    assert not opened  # still waiting: no marker yet
    owner.wait_filled()
    reader.join(TIMEOUT)
    (files,) = opened
    assert not files.owner and torch.equal(files.map("a", 4097), torch.full((4097,), 1, dtype=torch.uint8))


def test_waiting_past_the_timeout_names_the_filling_process(shm):
    """A share whose owner is alive but never finishes: one clear error after the timeout, naming its pid."""
    owner = owner_files(shm, a=4096)  # holds the lock, never publishes
    with pytest.raises(InputError, match=f"still being filled by process {os.getpid()} after 0 s"):
        NodeShare("unit", directory=shm, timeout_s=0.2).open_files()
    owner.abandon()


def test_a_failed_load_leaves_the_share_to_the_next_claimant(shm):
    """An owner whose load fails removes its files and lets go: the next process owns an empty share."""
    owner_files(shm, a=4096, b=100).abandon()
    folder = node_share_folder("unit", shm)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK]
    assert owner_files(shm).owner


def test_a_share_of_other_slab_sizes_is_refused(shm):
    """A complete share whose slab sizes differ from this load's: an InputError, not wrong weights."""
    owner_files(shm, a=4096).wait_filled()
    reader = NodeShare("unit", directory=shm).open_files()
    with pytest.raises(InputError, match="holds another load.*slab a: 4096 bytes, this load's 8192"):
        reader.map("a", 8192)


def test_only_remove_node_share_deletes_it_and_a_later_process_fills_anew(shm):
    """Published and let go, the share stays (mappings keep working); removed, the next process owns a new one."""
    owner = owner_files(shm, a=4097)
    owner.wait_filled()
    mapped = NodeShare("unit", directory=shm).open_files().map("a", 4097)
    assert node_share_folder("unit", shm).is_dir()
    remove_node_share("unit", shm)
    assert not node_share_folder("unit", shm).exists()
    assert int(mapped.sum()) == 4097 and owner_files(shm).owner


def test_share_names_follow_the_load_and_must_name_a_folder(shm):
    """One name per model load and run; a name with a slash is refused."""
    assert node_share_name("r1", "tiny", STAGED) == node_share_name("r1", "tiny", STAGED)
    assert node_share_name("r1", "tiny", STAGED) != node_share_name("r1", "tiny", Plan())
    assert node_share_name("r1", "tiny", STAGED) != node_share_name("r2", "tiny", STAGED)
    with pytest.raises(InputError, match="letters, digits"):
        NodeShare("run/1", directory=shm)
