"""The model as the planner sees it: exact bytes of every weight group in every home the engine
can give it, and the shapes that set FLOPs and activations.

`loading.sizes.model_sizes` measures one from `meta` models with the loader's own grouping and
slab packing, so the bytes here are the bytes the engine allocates; here it is only a value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .tiles import DecoderBlock


@dataclass(frozen=True)
class GroupBytes:
    """One group of weights, in bytes, in each home it can have."""

    payload: int  # tensor data alone: device bytes when resident (one allocation per tensor)
    packed: int  # one host slab or arena region: every tensor at an aligned offset
    slot: int  # `packed` rounded up to the alignment: a streaming ring slot that can hold it

    @classmethod
    def zero(cls) -> GroupBytes:
        return cls(0, 0, 0)


@dataclass(frozen=True)
class TowerBytes:
    """A tower: its weights outside the decoder layers, each layer's share, and all of it in one slab."""

    head: GroupBytes
    layers: tuple[GroupBytes, ...]
    whole: GroupBytes


@dataclass(frozen=True, kw_only=True)
class ModelSizes:
    """Bytes per group and the shapes that set FLOPs and activations."""

    layers: int
    hidden: int
    intermediate: int
    mlp_mats: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    towers: dict[str, TowerBytes]  # reasoner and generator
    embedding: GroupBytes
    vae: GroupBytes  # the decoder side (what the decode holds)
    vae_encoder: GroupBytes
    layer_matmul_params: int  # the generator's matmul weights in one layer
    decoder_blocks: tuple[DecoderBlock, ...]  # the VAE decoder's up blocks and head, as the tiled decode runs them
    # The sound tokenizer's decoder, measured only for a request with sound (zero without), and the
    # channels of its last, full-rate stage (what its largest activations are made of).
    sound: GroupBytes = field(default_factory=GroupBytes.zero)
    sound_channels: int = 0
    # FP8 linears: W8A16 dequantizes one weight at a time into the run's dtype (`dequantized_bytes`,
    # the largest), W8A8 rounds each input to FP8 through a scaled copy (see planning/memory.py).
    fp8: bool = False
    dequantized_bytes: int = 0
    # planning.memory.weight_bytes per placement, filled as the planner asks (not part of the value).
    weight_bytes_memo: dict = field(default_factory=dict, init=False, compare=False, repr=False)
    # planning.memory.decode_bytes_and_share per tile grid and frame size, filled as the planner asks.
    decode_memo: dict = field(default_factory=dict, init=False, compare=False, repr=False)
