"""Cosmos3's weight groups: which weight goes with which part of a request.

The offload engine moves groups of weights without knowing what they are; this module says what
they are for Cosmos3 (pure string rules, no torch). Each weight of the transformer and the VAE is
put in one of:

- `reasoner`: what `prefill` reads, except the embedding table;
- `generator`: what `denoise` reads;
- `vae`: the VAE's decoder side (`decoder`, `post_quant_conv`): what the decode reads;
- `vae_encoder`: the VAE's encoder side (`encoder`, `quant_conv`): what encoding conditioning
  frames reads. It is placed as the plan places `vae` but moved in on its own, so the decode
  never holds the encoder's weights (0.28 GiB of Wan2.2's 1.31) and the encode not the decoder's;
- `sound`: the sound tokenizer's decoder (`Cosmos3AVAEAudioTokenizer`, loaded only for a request
  with sound): what the audio decode reads. It is placed as the plan places `vae`; its encoder is
  `unused` (generation never encodes audio);
- `embedding`: `embed_tokens`, which stays on the host when the reasoner is offloaded (prefill
  looks up only the prompt's rows there) and goes with the reasoner otherwise;
- `unused`: what the split never reads (`lm_head`, the final `norm`, the last layer's reasoner
  output path: its `to_out`, `post_attention_layernorm` and `mlp`, and the action heads: this
  tool generates video and sound, not actions). These are never materialized or read at all.
"""

from __future__ import annotations

from ..errors import InputError
from .towers import GENERATOR, REASONER, tower_of

VAE = "vae"
VAE_ENCODER = "vae_encoder"
SOUND = "sound"
EMBEDDING = "embedding"
UNUSED = "unused"
# Groups a plan places (the names `--offload-stages` takes), in the order a request uses them.
PLANNED_GROUPS: tuple[str, ...] = (REASONER, GENERATOR, VAE)
# Groups placed as another group is.
PLACED_LIKE = {VAE_ENCODER: VAE, SOUND: VAE}
# Every group the engine moves in for a part of the request, in the order the request uses them:
# encode the conditioning frames, prefill, denoise, decode the video, decode the sound.
USE_ORDER: tuple[str, ...] = (VAE_ENCODER, REASONER, GENERATOR, VAE, SOUND)
__all__ = [
    "EMBEDDING",
    "GENERATOR",
    "PLACED_LIKE",
    "PLANNED_GROUPS",
    "REASONER",
    "SOUND",
    "UNUSED",
    "USE_ORDER",
    "VAE",
    "VAE_ENCODER",
]


def vae_group_of(name: str) -> str:
    """The group of one `AutoencoderKLWan` weight name."""
    return VAE_ENCODER if name.startswith(("encoder.", "quant_conv.")) else VAE


def sound_group_of(name: str) -> str:
    """The group of one `Cosmos3AVAEAudioTokenizer` weight name: generation only decodes audio."""
    return UNUSED if name.startswith("encoder.") else SOUND


def transformer_group_of(name: str, num_layers: int, actions: bool = False) -> str:
    """The group of one `Cosmos3OmniTransformer` weight name. The action heads (`action_*`) are the
    generator's for a model loaded for action runs (`actions`), and unused otherwise."""
    if name.startswith("embed_tokens."):
        return EMBEDDING
    last = f"layers.{num_layers - 1}."
    tail = ("self_attn.to_out.", "post_attention_layernorm.", "mlp.")
    if name.startswith("action_"):
        return GENERATOR if actions else UNUSED
    if name.startswith(("lm_head.", "norm.")):
        return UNUSED
    if name.startswith(last) and name[len(last) :].startswith(tail):
        return UNUSED
    return tower_of(name)


def check_offload_groups(groups: tuple[str, ...] | list[str]) -> frozenset[str]:
    """Validate a user's `--offload-stages` list; unknown names list the choices."""
    unknown = sorted(set(groups) - set(PLANNED_GROUPS))
    if unknown:
        raise InputError(f"unknown offload stage(s) {', '.join(unknown)}; choose from {' '.join(PLANNED_GROUPS)}")
    return frozenset(groups)
