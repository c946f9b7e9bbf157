"""Stored tensors are read as zero-copy views of the mapped safetensors file, in the file's dtype."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.files import CheckpointWeights
from cosmos3_offload.loading.mapped_files import MappedFiles
from cosmos3_offload.offload.slabs import SlabLayout

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.weight": torch.linspace(-1, 1, 10).to(torch.bfloat16),
}


def entries(names):
    """Slab entries for `names` as the loader lays them out (a tied weight has several names)."""
    specs = [
        (tuple(tuple(n.rsplit(".", 1)) for n in group), tuple(TENSORS[group[-1]].shape), torch.float32)
        for group in names
    ]
    return SlabLayout.pack(specs).entries


def test_views_equal_the_stored_values_without_a_copy(tmp_path):
    """Each view has the stored values and dtype; two views of one file share its mapping (no private copy)."""
    save_file(TENSORS, tmp_path / "model.safetensors")
    files = MappedFiles(CheckpointWeights(tmp_path))
    a, b = (files.view(e) for e in entries([("a.weight",), ("tied.weight", "b.weight")]))
    assert torch.equal(a, TENSORS["a.weight"]) and torch.equal(b, TENSORS["b.weight"]) and b.dtype == torch.bfloat16
    mapping = files._open(tmp_path / "model.safetensors").mapping
    base = files.view(entries([("a.weight",)])[0]).data_ptr()
    assert a.data_ptr() == base  # the same file bytes, not a fresh copy
    assert abs(b.data_ptr() - a.data_ptr()) < len(mapping)


def test_a_tensor_that_does_not_fit_its_offsets_is_refused(tmp_path):
    """A header whose shape disagrees with the tensor's byte range gives an InputError naming the file."""
    file = tmp_path / "model.safetensors"
    save_file({"a.weight": TENSORS["a.weight"]}, file)
    weights = CheckpointWeights(tmp_path)
    raw = file.read_bytes()
    assert raw.count(b"[3,4]") == 1
    file.write_bytes(raw.replace(b"[3,4]", b"[3,5]"))  # same header length, 15 elements in 12 elements' bytes
    with pytest.raises(InputError, match="model.safetensors.*does not fit its offsets"):
        MappedFiles(weights).view(entries([("a.weight",)])[0])
