"""Denoise: one generator-tower pass that attends to a prompt's ReasonerMemory.

The generator's tokens (vision, and sound/action where the model has them) are embedded with
the model's own patchify/pack helpers, run through the generator half of every decoder layer
with queries attending non-causally to [memory K/V ; generator K/V], and read out with the
model's own unpack helpers. Only generator weights are touched.

With `sequence` shards (Ulysses, parallel/ulysses.py) the decoder stack runs on this rank's row
block of the generator tokens; attention trades rows for heads and back, and reads this rank's
block of the memory's key/value heads. `denoise_branches` shards after the embedding and gathers
before the read-out, so its predictions are those of the whole sequence on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.transformers.transformer_cosmos3 import Cosmos3OmniTransformer, Cosmos3VLTextMoTDecoderLayer
from torch import nn

from ..kernels.choice import EAGER, Kernels
from ..parallel.ulysses import SequenceShards
from . import fused_layer
from .attend import apply_rotary, attend, rotary_tables
from .prefill import ReasonerMemory


@dataclass(frozen=True)
class ModalityLayout:
    """Where one modality's tokens sit in the generator segment (indexes relative to its start)."""

    token_shapes: list[tuple[int, int, int]]
    positions: torch.Tensor  # [tokens] rows of the generator segment holding this modality
    readout: torch.Tensor  # [noisy tokens] rows whose outputs are predictions
    noisy_frame_indexes: list[torch.Tensor]

    @property
    def noisy_tokens(self) -> int:
        return sum(len(n) * math.prod(s[1:]) for n, s in zip(self.noisy_frame_indexes, self.token_shapes))


@dataclass(frozen=True)
class GeneratorLayout:
    """The step-invariant layout of one CFG branch's generator segment.

    position_ids: [3, generator tokens], the mRoPE ids that follow this branch's prompt.
    """

    prompt_tokens: int
    position_ids: torch.Tensor
    vision: ModalityLayout
    sound: ModalityLayout | None = None
    action: ModalityLayout | None = None

    @property
    def tokens(self) -> int:
        return self.position_ids.shape[1]

    @classmethod
    def from_packed(cls, packed: dict[str, Any]) -> GeneratorLayout:
        """From the static pack `Cosmos3OmniPipeline.__call__` builds for one branch."""
        start = packed["und_len"]

        def modality(name: str) -> ModalityLayout | None:
            if f"{name}_sequence_indexes" not in packed:
                return None
            return ModalityLayout(
                token_shapes=packed[f"{name}_token_shapes"],
                positions=packed[f"{name}_sequence_indexes"] - start,
                readout=packed[f"{name}_mse_loss_indexes"] - start,
                noisy_frame_indexes=packed[f"{name}_noisy_frame_indexes"],
            )

        return cls(
            prompt_tokens=start,
            position_ids=packed["position_ids"][:, start : packed["sequence_length"]],
            vision=modality("vision"),
            sound=modality("sound"),
            action=modality("action"),
        )


@dataclass(frozen=True)
class GeneratorInputs:
    """What changes every step: the noisy latents (in the model's dtype) and the timestep."""

    vision: torch.Tensor  # [1, C, T, H, W]
    timestep: float
    sound: torch.Tensor | None = None  # [C, T]
    action: torch.Tensor | None = None  # [T, D]
    action_domain_id: torch.Tensor | None = None  # [1]


@dataclass(frozen=True)
class GeneratorPrediction:
    """Velocity predictions, zero at conditioned frames: vision [1, C, T, H, W], sound [C, T], action [T, D]."""

    vision: torch.Tensor
    sound: torch.Tensor | None = None
    action: torch.Tensor | None = None


@torch.no_grad()
def denoise(
    model: Cosmos3OmniTransformer, layout: GeneratorLayout, memory: ReasonerMemory, inputs: GeneratorInputs
) -> GeneratorPrediction:
    """One generator pass for one CFG branch; equals the joint forward's predictions."""
    return denoise_branches(model, [(layout, memory)], inputs)[0]


@torch.no_grad()
def denoise_branches(
    model: Cosmos3OmniTransformer,
    branches: list[tuple[GeneratorLayout, ReasonerMemory]],
    inputs: GeneratorInputs,
    *,
    layers: Iterable[nn.Module] | None = None,
    mlp_chunk: int | None = None,
    kernels: Kernels = EAGER,
    sequence: SequenceShards | None = None,
) -> list[GeneratorPrediction]:
    """Generator passes for several CFG branches sharing the latents, each layer once for all of them.

    Each branch's result is exactly what `denoise` gives it alone. `layers` yields the decoder
    layers in order, each ready when yielded (default `model.layers`); `mlp_chunk` bounds the MLP's
    intermediate activations to that many tokens at a time; with `sequence` the stack runs on this
    rank's rows (every rank of the group calls this with the same inputs).
    """
    hidden = embed_branches(model, [layout for layout, _ in branches], inputs, branches[0][1].keys[0].dtype)
    if sequence is not None:
        hidden = [sequence.shard(h) for h in hidden]
    outputs = run_decoder_stack(
        model, branches, hidden, layers=layers, mlp_chunk=mlp_chunk, kernels=kernels, sequence=sequence
    )
    if sequence is not None:
        outputs = [sequence.gather(out) for out in outputs]
    return [read_out_predictions(model, layout, inputs, out) for (layout, _), out in zip(branches, outputs)]


def embed_branches(
    model: Cosmos3OmniTransformer, layouts: list[GeneratorLayout], inputs: GeneratorInputs, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Each branch's decoder-stack input [generator tokens, hidden] (see `embed_generator_tokens`)."""
    return [embed_generator_tokens(model, layout, inputs, dtype) for layout in layouts]


@torch.no_grad()
def run_decoder_stack(
    model: Cosmos3OmniTransformer,
    branches: list[tuple[GeneratorLayout, ReasonerMemory]],
    hidden: list[torch.Tensor],
    *,
    layers: Iterable[nn.Module] | None = None,
    mlp_chunk: int | None = None,
    kernels: Kernels = EAGER,
    sequence: SequenceShards | None = None,
) -> list[torch.Tensor]:
    """The generator half of every decoder layer and the final norm, for each branch's `hidden`:
    the span `Cosmos3OmniTransformer._run_decoder_stack` covers (and step caches skip). With
    `sequence`, `hidden` holds this rank's rows of each branch and so does the result.

    The entries of `hidden` are replaced as the layers run, so the list holds no input alive that
    the caller does not hold itself.
    """
    tables = [rotary_tables(model, layout.position_ids, h.dtype) for (layout, _), h in zip(branches, hidden)]
    if sequence is not None:
        tables = [(sequence.shard(cos), sequence.shard(sin)) for cos, sin in tables]
    for index, layer in enumerate(model.layers if layers is None else layers):
        for b, ((_, memory), (cos, sin)) in enumerate(zip(branches, tables)):
            hidden[b] = generator_layer(
                layer,
                hidden[b],
                memory.keys[index],
                memory.values[index],
                cos,
                sin,
                mlp_chunk=mlp_chunk,
                kernels=kernels,
                sequence=sequence,
            )
    return [model.norm_moe_gen(h) for h in hidden]


def generator_layer(
    layer: Cosmos3VLTextMoTDecoderLayer,
    hidden: torch.Tensor,
    memory_key: torch.Tensor,
    memory_value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    mlp_chunk: int | None = None,
    kernels: Kernels = EAGER,
    sequence: SequenceShards | None = None,
) -> torch.Tensor:
    """One decoder layer's generator half. hidden: [generator tokens (this rank's rows), hidden]."""
    if kernels.fused:
        return _fused_generator_layer(layer, hidden, memory_key, memory_value, cos, sin, mlp_chunk, kernels, sequence)
    attn = layer.self_attn
    normed = layer.input_layernorm_moe_gen(hidden)
    q = attn.norm_added_q(attn.add_q_proj(normed).view(-1, attn.num_attention_heads, attn.head_dim))
    k = attn.norm_added_k(attn.add_k_proj(normed).view(-1, attn.num_key_value_heads, attn.head_dim))
    v = attn.add_v_proj(normed).view(-1, attn.num_key_value_heads, attn.head_dim)
    del normed
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if sequence is not None:
        q, k, v, memory_key, memory_value = _exchange_heads(sequence, q, k, v, memory_key, memory_value)
    # Non-causal: every generator query sees the whole prompt and every generator token.
    out = attend(attn, q, torch.cat([memory_key, k]), torch.cat([memory_value, v]), causal=False, kernels=kernels)
    del q, k, v
    if sequence is not None:
        out = _rows_back(sequence, out, attn.head_dim)
    hidden = hidden + attn.to_add_out(out)
    del out
    return _mlp_residual(layer, hidden, mlp_chunk)


def _fused_generator_layer(
    layer: Cosmos3VLTextMoTDecoderLayer,
    hidden: torch.Tensor,
    memory_key: torch.Tensor,
    memory_value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mlp_chunk: int | None,
    kernels: Kernels,
    sequence: SequenceShards | None = None,
) -> torch.Tensor:
    """`generator_layer` with the norms, QK-norm + rotary, the K/V join, the MLP activation and the
    residual adds as fused kernels (attention-out add and post-attention norm in one). With
    `sequence` the keys are normed and rotated on this rank's rows and joined after the exchange."""
    attn = layer.self_attn
    normed = fused_layer.norm(layer.input_layernorm_moe_gen, hidden)
    q = attn.add_q_proj(normed).view(-1, attn.num_attention_heads, attn.head_dim)  # [tokens, heads, head_dim]
    k = attn.add_k_proj(normed).view(-1, attn.num_key_value_heads, attn.head_dim)  # [tokens, kv_heads, head_dim]
    v = attn.add_v_proj(normed).view(-1, attn.num_key_value_heads, attn.head_dim)
    del normed
    q = fused_layer.norm_rotary(attn.norm_added_q, q, cos, sin)
    if sequence is None:
        k, v = fused_layer.join_memory(attn.norm_added_k, memory_key, memory_value, k, v, cos, sin)  # [memory+tokens]
    else:
        k = fused_layer.norm_rotary(attn.norm_added_k, k, cos, sin)
        q, k, v, memory_key, memory_value = _exchange_heads(sequence, q, k, v, memory_key, memory_value)
        k, v = torch.cat([memory_key, k]), torch.cat([memory_value, v])
    out = attend(attn, q, k, v, causal=False, kernels=kernels)
    del q, k, v
    if sequence is not None:
        out = _rows_back(sequence, out, attn.head_dim)
    update = attn.to_add_out(out)  # [tokens, hidden]; receives the layer's output
    del out
    post_norm, mlp = layer.post_attention_layernorm_moe_gen, layer.mlp_moe_gen
    return fused_layer.residual_mlp(post_norm, mlp, hidden, update, mlp_chunk)


def _exchange_heads(
    sequence: SequenceShards,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    memory_key: torch.Tensor,
    memory_value: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """This rank's rows of q, k, v [tokens/n, heads, head_dim] -> all tokens of its head block
    [tokens, heads/n, head_dim], and the memory's matching key/value heads [prompt, kv_heads/n, head_dim]."""
    heads = sequence.heads(memory_key.shape[1])
    q, k, v = (sequence.heads_to_tokens(t) for t in (q, k, v))
    return q, k, v, memory_key[:, heads], memory_value[:, heads]


def _rows_back(sequence: SequenceShards, out: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Attention output [tokens, heads/n * head_dim] -> this rank's rows [tokens/n, heads * head_dim]."""
    return sequence.tokens_to_heads(out.view(out.shape[0], -1, head_dim)).flatten(-2, -1)


def _mlp_residual(layer: Cosmos3VLTextMoTDecoderLayer, hidden: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """hidden + mlp(norm(hidden)), over at most `chunk` tokens at a time (all rows are independent)."""
    if chunk is None or hidden.shape[0] <= chunk:
        return hidden + layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(hidden))
    for part in hidden.split(chunk):  # views: each part is updated in place
        part += layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(part))
    return hidden


def _timestep_embedding(model: Cosmos3OmniTransformer, timestep: float, device: torch.device) -> torch.Tensor:
    """[1, hidden] embedding of the step's timestep; every noisy token gets this same row."""
    t = torch.full((1,), timestep, device=device) * model.config.timestep_scale
    embedder_dtype = model.time_embedder.linear_1.weight.dtype
    return model.time_embedder(model.time_proj(t).to(embedder_dtype))


def embed_generator_tokens(
    model: Cosmos3OmniTransformer, layout: GeneratorLayout, inputs: GeneratorInputs, dtype: torch.dtype
) -> torch.Tensor:
    """[generator tokens, hidden]: projected latents plus timestep embeddings on noisy frames."""
    device = inputs.vision.device
    hidden = torch.zeros(layout.tokens, model.config.hidden_size, device=device, dtype=dtype)
    t_embed = _timestep_embedding(model, inputs.timestep, device).to(dtype)

    def add_time(tokens: torch.Tensor, modality: ModalityLayout) -> torch.Tensor:
        return model._apply_timestep_embeds_to_noisy_tokens(
            packed_tokens=tokens,
            packed_timestep_embeds=t_embed.expand(modality.noisy_tokens, -1),
            noisy_frame_indexes=modality.noisy_frame_indexes,
            token_shapes=modality.token_shapes,
        )

    packed, _ = model._patchify_and_pack_latents([inputs.vision])
    hidden[layout.vision.positions] = add_time(model.proj_in(packed), layout.vision)
    if layout.sound is not None:
        tokens = model._pack_sound_latents([inputs.sound], layout.sound.token_shapes).to(dtype)
        tokens = model.audio_proj_in(tokens) + model.audio_modality_embed
        hidden[layout.sound.positions] = add_time(tokens, layout.sound)
    if layout.action is not None:
        tokens, domain_ids = model._pack_action_latents(
            [inputs.action], layout.action.token_shapes, [inputs.action_domain_id]
        )
        tokens = model.action_proj_in(tokens.to(dtype), domain_ids.to(device)) + model.action_modality_embed
        if layout.action.readout.numel() > 0:
            tokens = add_time(tokens, layout.action)
        hidden[layout.action.positions] = tokens
    return hidden


def read_out_predictions(
    model: Cosmos3OmniTransformer, layout: GeneratorLayout, inputs: GeneratorInputs, hidden: torch.Tensor
) -> GeneratorPrediction:
    """Project the final generator states back to latent velocities with the model's unpack helpers."""
    vision = model._unpatchify_and_unpack_latents(
        model.proj_out(hidden[layout.vision.readout]),
        token_shapes_vision=layout.vision.token_shapes,
        noisy_frame_indexes_vision=layout.vision.noisy_frame_indexes,
        original_latent_shapes=[tuple(inputs.vision.shape[-3:])],
    )[0]
    sound = action = None
    if layout.sound is not None:
        sound = model._unpack_sound_latents(
            model.audio_proj_out(hidden[layout.sound.readout]),
            layout.sound.token_shapes,
            layout.sound.noisy_frame_indexes,
        )[0]
    if layout.action is not None:
        noisy = layout.action.noisy_frame_indexes[0]
        domain_ids = inputs.action_domain_id.reshape(1).expand(len(noisy)).to(hidden.device)
        action = model._unpack_action_latents(
            model.action_proj_out(hidden[layout.action.readout], domain_ids),
            layout.action.token_shapes,
            layout.action.noisy_frame_indexes,
        )[0]
    return GeneratorPrediction(vision=vision, sound=sound, action=action)
