"""Measure a model for the planner: exact bytes of every group from `meta` models, laid out by the
loader's own grouping and slab packing, so the planner predicts the bytes the engine allocates."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer
from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer

from ..model.groups import EMBEDDING, GENERATOR, REASONER, SOUND, VAE, VAE_ENCODER, sound_group_of, vae_group_of
from ..offload.materialize import build_on_meta, group_layouts, keep_fp32_dtype
from ..offload.slabs import SlabLayout, align
from ..planning.plan import GroupPlan, Mode, Plan
from ..planning.sizes import GroupBytes, ModelSizes, TowerBytes
from ..quant.linear import fp8_linear_paths, stored_dtypes
from ..quant.policy import TowerSwitches
from ..vae.structure import decoder_blocks
from .placer import LAYER_MARK, weight_grouping
from .quantization import NONE, Quantization, apply_quantization

DTYPES = {2: torch.bfloat16, 4: torch.float32}


def group_bytes(layout: SlabLayout | None) -> GroupBytes:
    if layout is None:
        return GroupBytes.zero()
    return GroupBytes(payload=layout.payload_bytes, packed=layout.nbytes, slot=align(layout.nbytes))


def model_sizes(
    transformer_config: dict,
    vae_config: dict,
    dtype_bytes: int = 2,
    sound_config: dict | None = None,
    quantization: Quantization = NONE,
    actions: bool = False,
) -> ModelSizes:
    """Exact sizes from `meta` models grouped and packed the way the loader does it; with
    `sound_config` (see loading/layout.py), the sound tokenizer's decoder too; with `quantization`,
    the FP8 linears at one byte a weight element (and their scales); with `actions`, the action heads in
    the generator's head (a model loaded for action runs)."""
    dtype = DTYPES[dtype_bytes]
    transformer = build_on_meta(Cosmos3OmniTransformer, transformer_config)
    apply_quantization(transformer, quantization, TowerSwitches())
    config = transformer.config
    layers = config.num_hidden_layers
    dtype_of = stored_dtypes(transformer, keep_fp32_dtype(Cosmos3OmniTransformer, dtype))
    # Every layer streamed: each layer's share of a tower is its own layout, the head stays apart.
    per_layer = Plan(reasoner=GroupPlan(mode=Mode.STREAMED), generator=GroupPlan(mode=Mode.STREAMED))
    split = group_layouts(transformer, weight_grouping(per_layer, layers, actions), dtype_of)
    whole = group_layouts(transformer, weight_grouping(Plan(), layers, actions), dtype_of)
    towers = {
        tower: TowerBytes(
            head=group_bytes(split.get(tower)),
            layers=tuple(group_bytes(split.get(f"{tower}{LAYER_MARK}{i}")) for i in range(layers)),
            whole=group_bytes(whole[tower]),
        )
        for tower in (REASONER, GENERATOR)
    }
    matmul = sum(
        p.numel()
        for name, p in transformer.named_parameters()
        if p.ndim == 2 and weight_grouping(per_layer, layers)(name) == f"{GENERATOR}{LAYER_MARK}0"
    )
    vae = build_on_meta(AutoencoderKLWan, vae_config)
    vae_layouts = group_layouts(vae, vae_group_of, keep_fp32_dtype(AutoencoderKLWan, dtype))
    return ModelSizes(
        layers=layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        mlp_mats=3 if config.hidden_act == "silu" else 2,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        dtype_bytes=dtype_bytes,
        towers=towers,
        embedding=group_bytes(whole.get(EMBEDDING)),
        vae=group_bytes(vae_layouts[VAE]),
        vae_encoder=group_bytes(vae_layouts[VAE_ENCODER]),
        layer_matmul_params=matmul,
        decoder_blocks=decoder_blocks(vae.decoder),
        fp8=quantization.quantized,
        dequantized_bytes=max(
            (transformer.get_submodule(p).weight.numel() * dtype_bytes for p in fp8_linear_paths(transformer)),
            default=0,
        ),
        **({} if sound_config is None else _sound_sizes(sound_config, dtype)),
    )


def _sound_sizes(config: dict, dtype: torch.dtype) -> dict:
    tokenizer = build_on_meta(Cosmos3AVAEAudioTokenizer, config)
    layouts = group_layouts(tokenizer, sound_group_of, keep_fp32_dtype(Cosmos3AVAEAudioTokenizer, dtype))
    channels = tokenizer.config.dec_dim * tokenizer.config.dec_c_mults[0]
    return {"sound": group_bytes(layouts.get(SOUND)), "sound_channels": channels}
