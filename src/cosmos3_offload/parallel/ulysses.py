"""Ulysses sequence parallelism: each rank holds an equal row block of the generator tokens, and
attention trades that for a block of heads over all tokens with one all-to-all each way.

Every per-token op (norms, projections, MLP, residuals) runs on the rank's rows alone; attention
needs every token, so q, k and v go from [tokens/n, heads, head_dim] to [tokens, heads/n, head_dim]
(`heads_to_tokens`), attend, and the output comes back (`tokens_to_heads`). Rank j holds rows
[j*tokens/n, (j+1)*tokens/n) and, during attention, heads [j*heads/n, (j+1)*heads/n): with grouped
query attention the j-th block of query heads reads exactly the j-th block of key/value heads.
One code path on every backend: gloo (the CPU, tests) and NCCL both have all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SequenceShards:
    """The `degree` ranks of `group` that share one branch's tokens; this process is `rank` among them."""

    group: dist.ProcessGroup
    degree: int
    rank: int

    def rows(self, tokens: int) -> slice:
        """This rank's row block of `tokens` rows."""
        assert tokens % self.degree == 0, (tokens, self.degree)
        block = tokens // self.degree
        return slice(self.rank * block, (self.rank + 1) * block)

    def heads(self, count: int) -> slice:
        """This rank's block of `count` heads during attention."""
        assert count % self.degree == 0, (count, self.degree)
        block = count // self.degree
        return slice(self.rank * block, (self.rank + 1) * block)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, ...] -> this rank's rows [tokens/n, ...] (a view)."""
        return x[self.rows(x.shape[0])]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows [tokens/n, ...] -> [tokens, ...] on every rank."""
        parts = [torch.empty_like(x) for _ in range(self.degree)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts)

    def heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens/n, heads, head_dim] -> [tokens, heads/n, head_dim]: all tokens, this rank's heads."""
        rows, heads, dim = x.shape
        send = x.reshape(rows, self.degree, heads // self.degree, dim).transpose(0, 1).contiguous()
        received = torch.empty_like(send)  # [n, tokens/n, heads/n, head_dim]: block j from rank j
        dist.all_to_all_single(received, send, group=self.group)
        return received.reshape(self.degree * rows, heads // self.degree, dim)

    def tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, heads/n, head_dim] -> [tokens/n, heads, head_dim]: this rank's rows, every head."""
        tokens, heads, dim = x.shape
        send = x.reshape(self.degree, tokens // self.degree, heads, dim).contiguous()
        received = torch.empty_like(send)  # [n, tokens/n, heads/n, head_dim]: rank j's heads of our rows
        dist.all_to_all_single(received, send, group=self.group)
        return received.transpose(0, 1).reshape(tokens // self.degree, self.degree * heads, dim)
