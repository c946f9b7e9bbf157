"""Ulysses: the head/token exchanges, and the generator's decoder stack over two ranks (gloo)."""

from __future__ import annotations

import pytest
import torch
from joint_cases import joint_case
from ranks import run_ranks
from tiny_models import tiny_pipeline

from cosmos3_offload.kernels.choice import EAGER, Kernels
from cosmos3_offload.parallel.mesh import Environment, ProcessMesh
from cosmos3_offload.planning.parallel import ParallelLayout
from cosmos3_offload.split.denoise import denoise_branches
from cosmos3_offload.split.prefill import prefill


def _exchanges() -> dict:
    """On each rank: rank-stamped rows through heads_to_tokens and back."""
    mesh = ProcessMesh.start(ParallelLayout(sequence=2), Environment.read(), torch.device("cpu"))
    try:
        rank = mesh.rank
        full = torch.arange(6 * 4 * 3, dtype=torch.float32).view(6, 4, 3)  # [tokens, heads, head_dim]
        mine = mesh.sequence.shard(full)
        by_heads = mesh.sequence.heads_to_tokens(mine)
        back = mesh.sequence.tokens_to_heads(by_heads)
        return {
            "rank": rank,
            "by_heads_ok": torch.equal(by_heads, full[:, mesh.sequence.heads(4)]),
            "back_ok": torch.equal(back, mine),
            "gathered_ok": torch.equal(mesh.sequence.gather(mine), full),
        }
    finally:
        mesh.close()


def test_exchanges_trade_rows_for_heads_and_back(tmp_path):
    """heads_to_tokens gives all tokens of the rank's heads; tokens_to_heads undoes it; gather joins rows."""
    outcomes = run_ranks(_exchanges, 2, tmp_path)
    for outcome in outcomes:
        assert outcome["exitcode"] == 0, outcome.get("trace")
        result = outcome["result"]
        assert result["by_heads_ok"] and result["back_ok"] and result["gathered_ok"], result


def _stack(fused: bool) -> list[torch.Tensor]:
    """The tiny model's generator predictions for two branches, with this rank's half of the tokens."""
    pipe = tiny_pipeline()
    mesh = ProcessMesh.start(ParallelLayout(sequence=2), Environment.read(), torch.device("cpu"))
    try:
        kernels = Kernels(fused=True) if fused else EAGER
        return _predictions(pipe, kernels, mesh.sequence)
    finally:
        mesh.close()


def _predictions(pipe, kernels, sequence=None) -> list[torch.Tensor]:
    cases = [joint_case(pipe, "a red fox", 9), joint_case(pipe, "", 9)]
    branches = []
    for case in cases:
        memory = prefill(pipe.transformer, case.packed["input_ids"], case.packed["text_mrope_ids"])
        branches.append((case.layout, memory))
    out = denoise_branches(pipe.transformer, branches, cases[0].inputs, kernels=kernels, sequence=sequence)
    return [p.vision for p in out]


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_sequence_parallel_stack_equals_one_process(tmp_path, monkeypatch, fused):
    """Ulysses degree 2 gives every rank the single-process predictions of both branches (float32, 1e-5)."""
    monkeypatch.setenv("COSMOS3_FUSED_EAGER", "1")  # the fused math uncompiled; the ranks inherit it
    outcomes = run_ranks(_stack, 2, tmp_path, fused)
    expected = _predictions(tiny_pipeline(), Kernels(fused=True) if fused else EAGER)
    for outcome in outcomes:
        assert outcome["exitcode"] == 0, outcome.get("trace")
        for got, want in zip(outcome["result"], expected):
            assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
