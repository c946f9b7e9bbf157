"""Prefill: run the reasoner tower once over a prompt and keep what the generator reads.

The reasoner's text tokens attend causally to each other only, so its per-layer keys/values
depend on the prompt alone. The generator's queries attend to exactly these K/V (keys after
QK-norm, `k_norm_und_for_gen` where the model has it, and rotary), so they are computed once per
prompt and replayed at every denoising step. Only reasoner weights are touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_cosmos3 import Cosmos3OmniTransformer, Cosmos3VLTextMoTDecoderLayer
from torch import nn

from ..kernels.choice import EAGER, Kernels
from . import fused_layer
from .attend import apply_rotary, attend, rotary_tables


@dataclass(frozen=True)
class ReasonerMemory:
    """Per-layer keys and values of one prompt, as the generator attends to them.

    keys[i], values[i]: [prompt_tokens, kv_heads, head_dim] for decoder layer i.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def prompt_tokens(self) -> int:
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@torch.no_grad()
def prefill(
    model: Cosmos3OmniTransformer,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    layers: Iterable[nn.Module] | None = None,
) -> ReasonerMemory:
    """Reasoner pass over one prompt.

    input_ids: [prompt_tokens]; position_ids: the prompt's mRoPE ids [3, prompt_tokens].
    The last layer contributes only its K/V: its attention output, MLP, the final norm and
    `lm_head` would feed nothing the generator reads, so they are skipped.
    """
    return prefill_prompts(model, [(input_ids, position_ids)], layers=layers)[0]


@torch.no_grad()
def prefill_prompts(
    model: Cosmos3OmniTransformer,
    prompts: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    layers: Iterable[nn.Module] | None = None,
    kernels: Kernels = EAGER,
) -> list[ReasonerMemory]:
    """Prefill several prompts (the CFG branches), each layer once for all of them.

    `layers` yields the decoder layers in order, each ready to run when yielded (the default is
    `model.layers`; a streaming placement yields them as their weights arrive).
    """
    hidden, tables = [], []
    for input_ids, position_ids in prompts:
        # The embedding table may stay on the host (model/groups.py): only the prompt's rows travel.
        table = model.embed_tokens.weight
        hidden.append(F.embedding(input_ids.to(table.device), table).to(input_ids.device))  # [tokens, hidden]
        tables.append(rotary_tables(model, position_ids, hidden[-1].dtype))
    keys: list[list[torch.Tensor]] = [[] for _ in prompts]
    values: list[list[torch.Tensor]] = [[] for _ in prompts]
    last = len(model.layers) - 1
    for index, layer in enumerate(model.layers if layers is None else layers):
        for p, (cos, sin) in enumerate(tables):
            hidden[p], key, value = _reasoner_layer(
                layer, hidden[p], cos, sin, with_output=index < last, kernels=kernels
            )
            keys[p].append(key)
            values[p].append(value)
    return [ReasonerMemory(keys=tuple(k), values=tuple(v)) for k, v in zip(keys, values)]


def _reasoner_layer(
    layer: Cosmos3VLTextMoTDecoderLayer,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    with_output: bool,
    kernels: Kernels = EAGER,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder layer's reasoner half: returns (next hidden, K for the generator, V)."""
    if kernels.fused:
        return _fused_reasoner_layer(layer, hidden, cos, sin, with_output=with_output, kernels=kernels)
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    q = attn.norm_q(attn.to_q(normed).view(-1, attn.num_attention_heads, attn.head_dim))
    k = attn.norm_k(attn.to_k(normed).view(-1, attn.num_key_value_heads, attn.head_dim))
    v = attn.to_v(normed).view(-1, attn.num_key_value_heads, attn.head_dim)
    k_for_gen = attn.k_norm_und_for_gen(k) if attn.k_norm_und_for_gen is not None else k
    k_for_gen = apply_rotary(k_for_gen, cos, sin)
    if not with_output:
        return hidden, k_for_gen, v
    out = attend(attn, apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, causal=True, kernels=kernels)
    hidden = hidden + attn.to_out(out)
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, k_for_gen, v


def _fused_reasoner_layer(
    layer: Cosmos3VLTextMoTDecoderLayer,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    with_output: bool,
    kernels: Kernels,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_reasoner_layer` with the norms, QK-norm + rotary, the MLP activation and the residual adds as
    fused kernels; the last layer's queries, which nothing reads, are not computed."""
    attn = layer.self_attn
    normed = fused_layer.norm(layer.input_layernorm, hidden)
    k = attn.to_k(normed).view(-1, attn.num_key_value_heads, attn.head_dim)  # [tokens, kv_heads, head_dim]
    v = attn.to_v(normed).view(-1, attn.num_key_value_heads, attn.head_dim)
    if attn.k_norm_und_for_gen is None:
        k = k_for_gen = fused_layer.norm_rotary(attn.norm_k, k, cos, sin)
    else:
        k = fused_layer.norm(attn.norm_k, k)
        k_for_gen = fused_layer.norm_rotary(attn.k_norm_und_for_gen, k, cos, sin)
        k = fused_layer.rotary(k, cos, sin)
    if not with_output:
        return hidden, k_for_gen, v
    q = attn.to_q(normed).view(-1, attn.num_attention_heads, attn.head_dim)  # [tokens, heads, head_dim]
    del normed
    q = fused_layer.norm_rotary(attn.norm_q, q, cos, sin)
    out = attend(attn, q, k, v, causal=True, kernels=kernels)
    update = attn.to_out(out)  # [tokens, hidden]; receives the layer's output
    del q, out
    hidden = fused_layer.residual_mlp(layer.post_attention_layernorm, layer.mlp, hidden, update, None)
    return hidden, k_for_gen, v
