"""Prefill: run the reasoner tower once over a prompt and keep what the generator reads.

The reasoner's text tokens attend causally to each other only, so its per-layer keys/values
depend on the prompt alone. The generator's queries attend to exactly these K/V (keys after
QK-norm, `k_norm_und_for_gen` where the model has it, and rotary), so they are computed once per
prompt and replayed at every denoising step. Only reasoner weights are touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_cosmos3 import Cosmos3OmniTransformer, Cosmos3VLTextMoTDecoderLayer

from .attention import apply_rotary, attend, rotary_tables


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
def prefill(model: Cosmos3OmniTransformer, input_ids: torch.Tensor, position_ids: torch.Tensor) -> ReasonerMemory:
    """Reasoner pass over one prompt.

    input_ids: [prompt_tokens]; position_ids: the prompt's mRoPE ids [3, prompt_tokens].
    The last layer contributes only its K/V: its attention output, MLP, the final norm and
    `lm_head` would feed nothing the generator reads, so they are skipped.
    """
    # The embedding table may stay on the host (see groups.py): only the prompt's rows travel.
    table = model.embed_tokens.weight
    hidden = F.embedding(input_ids.to(table.device), table).to(input_ids.device)  # [prompt_tokens, hidden]
    cos, sin = rotary_tables(model, position_ids, hidden.dtype)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    last = len(model.layers) - 1
    for index, layer in enumerate(model.layers):
        hidden, key, value = _reasoner_layer(layer, hidden, cos, sin, with_output=index < last)
        keys.append(key)
        values.append(value)
    return ReasonerMemory(keys=tuple(keys), values=tuple(values))


def _reasoner_layer(
    layer: Cosmos3VLTextMoTDecoderLayer,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    with_output: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder layer's reasoner half: returns (next hidden, K for the generator, V)."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    q = attn.norm_q(attn.to_q(normed).view(-1, attn.num_attention_heads, attn.head_dim))
    k = attn.norm_k(attn.to_k(normed).view(-1, attn.num_key_value_heads, attn.head_dim))
    v = attn.to_v(normed).view(-1, attn.num_key_value_heads, attn.head_dim)
    k_for_gen = attn.k_norm_und_for_gen(k) if attn.k_norm_und_for_gen is not None else k
    k_for_gen = apply_rotary(k_for_gen, cos, sin)
    if not with_output:
        return hidden, k_for_gen, v
    out = attend(attn, apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, causal=True)
    hidden = hidden + attn.to_out(out)
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, k_for_gen, v
