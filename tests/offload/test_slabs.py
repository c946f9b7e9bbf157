"""Slab layouts are aligned and exact; slab views hold what is written into them."""

from __future__ import annotations

import torch
from torch import nn

from cosmos3_offload.offload.materialize import group_layouts
from cosmos3_offload.offload.slabs import ALIGNMENT, HostSlab, SlabLayout


def test_layout_is_aligned_dense_and_exact():
    """Entries start on the alignment, never overlap, and the size ends at the last entry's end."""
    layout = SlabLayout.pack(
        [
            ((("a", "w"),), (3, 5), torch.bfloat16),
            ((("b", "w"),), (7,), torch.float32),
            ((("c", "w"),), (2, 2, 2), torch.float16),
        ]
    )
    ends = [e.offset + e.nbytes for e in layout.entries]
    assert all(e.offset % ALIGNMENT == 0 for e in layout.entries)
    assert all(end <= nxt.offset for end, nxt in zip(ends, layout.entries[1:]))
    assert layout.nbytes == ends[-1] and layout.payload_bytes == 30 + 28 + 16
    assert layout.nbytes < layout.payload_bytes + len(layout.entries) * ALIGNMENT


def test_tied_weights_are_stored_once():
    """A parameter shared by two modules gets one entry with both bindings."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    layouts = group_layouts(model, lambda name: "all", lambda name: torch.float32)
    entries = layouts["all"].entries
    assert len(entries) == 3  # one shared weight, two biases
    shared = next(e for e in entries if len(e.bindings) == 2)
    assert set(shared.names) == {"0.weight", "1.weight"}


def test_views_round_trip_every_dtype():
    """Values written through a view read back bit-identically, with the entry's shape and dtype."""
    specs = [((("m", f"t{i}"),), (5, 3), dtype) for i, dtype in enumerate((torch.float32, torch.bfloat16, torch.int64))]
    slab = HostSlab(SlabLayout.pack(specs))
    values = [torch.arange(15).reshape(5, 3).to(dtype) * 3 for _, _, dtype in specs]
    for entry, value in zip(slab.layout.entries, values):
        slab.view(entry).copy_(value)
    for entry, value in zip(slab.layout.entries, values):
        view = slab.view(entry)
        assert view.dtype == value.dtype and torch.equal(view, value)
    assert slab.buffer.numel() == slab.layout.nbytes and not slab.pinned
