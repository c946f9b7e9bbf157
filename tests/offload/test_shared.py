"""Shared host slabs: one exact-size file per slab, mapped by every process of a host, gone once unlinked;
a folder that cannot hold them is refused with a message that says how to fix it."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from cosmos3_offload.errors import InputError
from cosmos3_offload.offload.shared import HostShare, SharedFiles
from cosmos3_offload.offload.slabs import HostSlab, SlabLayout

FORK = multiprocessing.get_context("fork")  # children inherit the imports: spawning re-imports torch (slow on CI)
TIMEOUT = 30.0


def no_wait() -> None:
    pass


def share(directory, owner=True, wait=no_wait) -> HostShare:
    return HostShare(name="test", owner=owner, wait=wait, directory=directory)


def _map_write_read(directory, owner: bool, barrier, results) -> None:
    """One process of the host: map the slab, the owner writes it, then both read it."""
    files = SharedFiles(share(directory, owner, barrier.wait))
    buffer = files.map("slab", 4096)
    barrier.wait()  # both mapped
    files.unlink()
    if owner:
        buffer.copy_(torch.arange(4096, dtype=torch.int32).to(torch.uint8))
    barrier.wait()  # the owner wrote
    results.put((owner, bytes(buffer.numpy())))  # bytes: a tensor would travel by a handle to this process


def test_a_value_the_owner_writes_is_read_by_the_other_process(tmp_path):
    """Both processes map the same file: the other reads what the owner wrote, and the file is gone after."""
    barrier, results = FORK.Barrier(2, timeout=TIMEOUT), FORK.Queue()
    processes = [
        FORK.Process(target=_map_write_read, args=(tmp_path, owner, barrier, results)) for owner in (True, False)
    ]
    for p in processes:
        p.start()
    read = dict(results.get(timeout=TIMEOUT) for _ in processes)
    for p in processes:
        p.join(TIMEOUT)
        assert p.exitcode == 0
    expected = bytes(torch.arange(4096, dtype=torch.int32).to(torch.uint8).numpy())
    assert read[True] == expected and read[False] == expected
    assert list(tmp_path.iterdir()) == []


def test_files_are_exact_size_and_mappings_outlive_the_unlink(tmp_path):
    """Each key gets one file of exactly its size; after unlink the folder is empty and the buffers still work."""
    files = SharedFiles(share(tmp_path))
    a, b = files.map("reasoner", 1000), files.map("generator@3", 256)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cosmos3-offload-test-generator@3",
        "cosmos3-offload-test-reasoner",
    ]
    assert (tmp_path / "cosmos3-offload-test-reasoner").stat().st_size == 1000
    files.unlink()
    assert list(tmp_path.iterdir()) == []
    a.fill_(3)
    b.fill_(4)
    assert int(a.sum()) == 3000 and int(b.sum()) == 1024


def test_two_maps_of_one_key_see_the_same_memory(tmp_path):
    """A second process's mapping (here a second SharedFiles) of an existing file shares its pages."""
    owner, other = SharedFiles(share(tmp_path)), SharedFiles(share(tmp_path, owner=False))
    written, read = owner.map("vae", 512), other.map("vae", 512)
    owner.unlink()
    other.unlink()
    written.fill_(9)
    assert torch.equal(read, torch.full((512,), 9, dtype=torch.uint8))


def a_file(path):
    path.write_text("")
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "is not a folder"),
        (lambda d: a_file(d / "file"), "is not a folder"),
    ],
    ids=["missing", "a-file"],
)
def test_a_folder_that_is_not_there_is_refused(tmp_path, make, message):
    """No folder to hold the files: an InputError that says how to fix it."""
    with pytest.raises(InputError, match=f"{message}.*shm-size.*one GPU"):
        SharedFiles(share(make(tmp_path))).map("vae", 4096)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_an_unwritable_folder_is_refused(tmp_path):
    """A folder this process cannot write: an InputError, not a PermissionError."""
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not writable.*shm-size"):
            SharedFiles(share(tmp_path)).map("vae", 4096)
    finally:
        tmp_path.chmod(0o700)


def test_too_little_room_is_refused_before_any_file_is_made(tmp_path):
    """A share larger than the folder's free space is refused up front (a full tmpfs would SIGBUS the owner)."""
    stat = os.statvfs(tmp_path)
    free = stat.f_bavail * stat.f_frsize
    files = SharedFiles(share(tmp_path))
    with pytest.raises(InputError, match="free.*needs.*shm-size"):
        files.map("generator", free + 2**30)
    assert list(tmp_path.iterdir()) == [] and files.paths == []


def test_the_room_check_counts_every_file_of_the_share(tmp_path, monkeypatch):
    """Files are sparse until filled, so the check adds up all the files this process has made."""
    free = 10_000
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((0, 1, 0, 0, free, 0, 0, 0, 0, 255)))
    files = SharedFiles(share(tmp_path))
    files.map("a", 6000)
    with pytest.raises(InputError, match="needs"):
        files.map("b", 6000)
    files.unlink()
    assert list(tmp_path.iterdir()) == []


def test_a_name_that_is_not_a_file_name_is_refused(tmp_path):
    """The name becomes part of a file name: a slash is refused with the allowed characters."""
    with pytest.raises(InputError, match="letters, digits"):
        HostShare(name="run/1", owner=True, wait=no_wait, directory=tmp_path)


def test_a_slab_in_a_shared_buffer_holds_its_layout_and_says_so(tmp_path):
    """A HostSlab over a shared mapping is marked shared and round-trips its views; a private one is not shared."""
    layout = SlabLayout.pack([((("a", "w"),), (3, 5), torch.bfloat16), ((("b", "w"),), (7,), torch.float32)])
    files = SharedFiles(share(tmp_path))
    slab = HostSlab(layout, shared_buffer=files.map("a", layout.nbytes))
    files.unlink()
    values = [torch.randn(e.shape).to(e.dtype) for e in layout.entries]
    for entry, value in zip(layout.entries, values):
        slab.view(entry).copy_(value)
    assert slab.shared and all(torch.equal(slab.view(e), v) for e, v in zip(layout.entries, values))
    private = HostSlab(layout)
    assert not private.shared and private.buffer.numel() == layout.nbytes
