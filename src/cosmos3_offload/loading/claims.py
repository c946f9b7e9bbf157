"""What a model's config claims about sizes, checked against its shards' headers before the model is built.

Building a model on `meta` still costs what its config says: a Python object per layer (a config
claiming 1e9 layers grows memory for minutes) and a few real tensors (the transformer's modality
embeddings, the VAE's norm scales: `z_dim: 1e9` asks the allocator for terabytes). So every size a
config states is first compared with what the safetensors headers hold, and a config that claims
more than its weights is refused in one line that names the field and what the shards hold.

Three kinds of claim, per model folder (`CLAIMS`):

- a `Width` is one axis of one named weight (`hidden_size` is `embed_tokens.weight`'s second axis);
  it must equal that axis. When that weight is not among the headers read (a damaged shard, a
  missing weight: the file checks say so), the width must at least not exceed the largest axis any
  stored weight has, since every width shapes some weight;
- a `Count` is how many numbered blocks the names show (`layers.0.`, `layers.1.`, ...); claiming
  more than the names show is refused (fewer is the shape check's: it names the extra weights);
- a `Bound` is a size no single weight pins down (a list of channel multiples, a block count of
  the sound encoder): each number must not exceed the largest stored axis and each list or count
  not the number of stored weights, which is all the model could have.

Values that are not numbers are left to the model's constructor, which refuses them cheaply.
This module reads no file and imports no torch: it is given the folder's headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .files import CheckpointWeights


@dataclass(frozen=True)
class Width:
    """`field` (divided by the config's `per`, when given) is axis `axis` of the weight `key`."""

    field: str
    key: str
    axis: int
    per: str | None = None


@dataclass(frozen=True)
class Count:
    """`field` (the length of the list `field`, with `of_list`) is at most the number of `noun`s whose names
    match `pattern` (its group: the block's number)."""

    field: str
    pattern: str
    noun: str
    of_list: bool = False


@dataclass(frozen=True)
class Bound:
    """`field` is a size, or a list of sizes, that no weight pins down alone (see the module docstring)."""

    field: str
    count: bool = False  # a number of blocks: bounded by the number of stored weights, not by an axis


Claim = Width | Count | Bound

CLAIMS: dict[str, tuple[Claim, ...]] = {
    "transformer": (
        Count("num_hidden_layers", r"layers\.(\d+)\.", "layers"),
        Width("vocab_size", "embed_tokens.weight", 0),
        Width("hidden_size", "embed_tokens.weight", 1),
        Width("intermediate_size", "layers.0.mlp.up_proj.weight", 0),
        Width("head_dim", "layers.0.self_attn.norm_added_q.weight", 0),
        Width("num_attention_heads", "layers.0.self_attn.to_q.weight", 0, per="head_dim"),
        Width("num_key_value_heads", "layers.0.self_attn.to_k.weight", 0, per="head_dim"),
        Width("patch_latent_dim", "proj_in.weight", 1),
        Width("sound_dim", "audio_proj_in.weight", 1),
        Width("action_dim", "action_proj_out.bias.weight", 1),
        Width("num_embodiment_domains", "action_proj_out.bias.weight", 0),
        Bound("rope_axes_dim"),
    ),
    "vae": (
        Width("z_dim", "post_quant_conv.weight", 0),
        Width("base_dim", "encoder.conv_in.weight", 0),
        Width("in_channels", "encoder.conv_in.weight", 1),
        Width("decoder_base_dim", "decoder.conv_out.weight", 1),
        Width("out_channels", "decoder.conv_out.weight", 0),
        Count("dim_mult", r"decoder\.up_blocks\.(\d+)\.", "decoder up blocks", of_list=True),
        Bound("dim_mult"),
        Bound("num_res_blocks", count=True),
        Bound("temperal_downsample", count=True),
        Bound("attn_scales", count=True),
    ),
    "sound_tokenizer": (
        Width("vocoder_input_dim", "decoder.conv1.weight_v", 1),
        Width("dec_out_channels", "decoder.conv2.weight_v", 0),
        Width("dec_dim", "decoder.conv2.weight_v", 1),
        Count("dec_strides", r"decoder\.block\.(\d+)\.", "decoder blocks", of_list=True),
        Bound("dec_strides"),
        Bound("dec_c_mults"),
        Bound("enc_dim"),
        Bound("enc_latent_dim"),
        Bound("enc_n_fft"),
        Bound("input_channels"),
        Bound("enc_c_mults"),
        Bound("enc_strides"),
        Bound("enc_num_blocks", count=True),
    ),
}


def claim_problem(part: str, config: dict, weights: CheckpointWeights) -> str | None:
    """Why `config` (of the model folder `part`) claims more than `weights` hold (None: it does not).

    With no weight readable at all nothing can be compared, and the config must not be built on
    trust: the first problem of the files is the answer then."""
    if not weights.names:
        if weights.problems:
            return weights.problems[0]
        return f"{str(weights.folder)!r} holds no weights to check its config against"
    held = _Held(weights)
    for claim in CLAIMS.get(part, ()):
        problem = _problem(claim, config, held)
        if problem is not None:
            return f"{part} config {str(weights.folder / 'config.json')!r} says {problem}"
    return None


class _Held:
    """What the headers of one model folder show: every weight's shape, every name, the largest axis."""

    def __init__(self, weights: CheckpointWeights):
        self.tensors = weights.tensors
        self.names = weights.names
        self.largest = max((n for t in weights.tensors.values() for n in t.shape), default=0)


def _problem(claim: Claim, config: dict, held: _Held) -> str | None:
    value = config.get(claim.field)
    if isinstance(claim, Count):
        value = len(value) if claim.of_list and isinstance(value, list) else value
        if not _is_number(value):
            return None
        numbers = {match.group(1) for name in held.names if (match := re.match(claim.pattern, name))}
        if value > len(numbers):
            return f"{claim.field} {_has(claim, value)}, but its shards hold {len(numbers)} {claim.noun}"
        return None
    if isinstance(claim, Width):
        return _width_problem(claim, value, config, held)
    return _bound_problem(claim, value, held)


def _width_problem(claim: Width, value: object, config: dict, held: _Held) -> str | None:
    if not _is_number(value):
        return None
    stored = held.tensors.get(claim.key)
    if stored is None or len(stored.shape) <= claim.axis:  # not read: the file checks say why
        return _bound_problem(Bound(claim.field), value, held)
    size = stored.shape[claim.axis]
    if claim.per is not None:
        per = config.get(claim.per)
        if not _is_number(per) or per <= 0 or size % per:
            return None  # the claim of `per` itself is checked on its own
        size //= int(per)
    if value == size:
        return None
    evidence = f"{claim.key} in {stored.file.name} has shape {list(stored.shape)}"
    if claim.per is not None:
        evidence += f", {claim.per} {config[claim.per]}"
    return f"{claim.field} is {value!r}, but its shards hold {size} ({evidence})"


def _bound_problem(claim: Bound, value: object, held: _Held) -> str | None:
    """A size at most the largest stored axis; a count, or a list's length, at most the number of weights."""
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) > len(held.names):
        return f"{claim.field} has {len(value)} entries, but its shards hold only {len(held.names)} weights"
    for number in values:
        if not _is_number(number):
            continue
        if claim.count and number > len(held.names):
            return f"{claim.field} is {number!r}, but its shards hold only {len(held.names)} weights"
        if not claim.count and number > held.largest:
            return (
                f"{claim.field} is {_listed(value, number)}, but no weight in its shards has an axis that large "
                f"(the largest is {held.largest})"
            )
    return None


def _has(claim: Count, value: object) -> str:
    return f"has {value} entries" if claim.of_list else f"is {value!r}"


def _listed(value: object, number: object) -> str:
    return f"{value!r}" if not isinstance(value, list) else f"{_short(value)} (with {number!r})"


def _short(values: list) -> str:
    text = repr(values)
    return text if len(text) <= 60 else text[:57] + "...]"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
