"""Load the model components into the homes a plan gives them.

A checkpoint is the folder `Cosmos3OmniPipeline.save_pretrained` writes (see checkpoint.py).
Without one, a model from `model.specs` (by default the embedded tiny model) gets seeded random
weights and the byte-level tokenizer.

Both go through the two-phase load: the transformer and the VAE are built on `meta`, each group
gets its home (device, or a host slab when it is offloaded), and every weight is written once
into that home. A checkpoint's files are checked against the model before any home is allocated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..errors import InputError, first_line
from ..model.groups import UNUSED, USE_ORDER, transformer_group_of, vae_group_of
from ..model.specs import model_spec
from ..model.tiny_tokenizer import build_tiny_tokenizer
from ..offload.engine import OffloadEngine
from ..offload.materialize import build_on_meta, group_layouts, keep_fp32_dtype, move_buffers
from ..offload.slabs import SlabLayout
from ..planning.plan import Plan
from .checkpoint import CheckpointWeights, model_configs_of, read_json
from .placer import Placer, weight_grouping
from .random_weights import RandomValues

logger = logging.getLogger(__name__)

TINY_WEIGHT_SEED = 0


@dataclass
class Components:
    """The loaded parts of one model; `random_weights` is true without a checkpoint."""

    transformer: Cosmos3OmniTransformer
    vae: AutoencoderKLWan
    tokenizer: PreTrainedTokenizerBase
    scheduler_config: dict[str, Any]
    source: str
    random_weights: bool
    engine: OffloadEngine
    plan: Plan


def model_configs(checkpoint: Path | None, random_model: str = "tiny") -> tuple[dict, dict]:
    """(transformer config, VAE config) of a checkpoint, or of a registered size for random weights."""
    if checkpoint is None:
        spec = model_spec(random_model)
        return spec.transformer, spec.vae
    return model_configs_of(checkpoint)


def load_components(
    checkpoint: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    plan: Plan | None = None,
    *,
    random_model: str = "tiny",
    seed: int = TINY_WEIGHT_SEED,
) -> Components:
    """Build, place and fill every component as `plan` says (default: everything resident)."""
    plan = plan or Plan()
    transformer_config, vae_config = model_configs(checkpoint, random_model)
    transformer = _build(Cosmos3OmniTransformer, transformer_config)
    vae = _build(AutoencoderKLWan, vae_config)
    layers = transformer.config.num_hidden_layers
    transformer_layouts = group_layouts(
        transformer, weight_grouping(plan, layers), keep_fp32_dtype(Cosmos3OmniTransformer, dtype)
    )
    vae_layouts = group_layouts(vae, vae_group_of, keep_fp32_dtype(AutoencoderKLWan, dtype))
    if checkpoint is not None:
        skip_unused = lambda key: transformer_group_of(key, layers) == UNUSED  # noqa: E731 - names the rule
        transformer_weights = CheckpointWeights(checkpoint / "transformer")
        vae_weights = CheckpointWeights(checkpoint / "vae")
        transformer_weights.check_against(_shapes(transformer_layouts, skip=UNUSED), skip_unused)
        vae_weights.check_against(_shapes(vae_layouts), lambda key: False)
    # The tokenizer is cheap: load it before any weight memory exists, so a broken one costs nothing.
    tokenizer = build_tiny_tokenizer() if checkpoint is None else _checkpoint_tokenizer(checkpoint)
    placer = Placer(device, plan)
    transformer_targets = placer.place(transformer, transformer_layouts)
    vae_targets = placer.place(vae, vae_layouts)
    if checkpoint is None:
        RandomValues(seed).fill(transformer_targets + vae_targets)
    else:
        transformer_weights.fill(transformer_targets)
        vae_weights.fill(vae_targets)
    for slab in placer.slabs_to_pin:
        slab.pin()
    move_buffers(transformer, device)
    move_buffers(vae, device)
    return Components(
        transformer=transformer,
        vae=vae,
        tokenizer=tokenizer,
        scheduler_config=_scheduler_config(checkpoint),
        source=f"{random_model} model (random weights)" if checkpoint is None else str(checkpoint),
        random_weights=checkpoint is None,
        engine=OffloadEngine(device, placer.placements, USE_ORDER),
        plan=plan,
    )


def _build(model_cls: type, config: dict):
    try:
        return build_on_meta(model_cls, config)
    except (ValueError, TypeError, KeyError, AssertionError, RuntimeError) as error:
        raise InputError(f"the {model_cls.__name__} config cannot build a model: {first_line(error)}") from None


def _shapes(layouts: dict[str, SlabLayout], skip: str | None = None) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(names, shape) of every tensor of the layouts, leaving out group `skip`."""
    return [(e.names, e.shape) for g, layout in layouts.items() if g != skip for e in layout.entries]


def _checkpoint_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path / "text_tokenizer")
    except Exception as error:  # transformers raises many kinds of errors for a folder it cannot use
        raise InputError(
            f"the tokenizer in {str(path / 'text_tokenizer')!r} cannot be loaded: {first_line(error)}"
        ) from None


def _scheduler_config(path: Path | None) -> dict[str, Any]:
    scheduler_file = None if path is None else path / "scheduler" / "scheduler_config.json"
    if scheduler_file is None or not scheduler_file.is_file():
        return {}
    return read_json(scheduler_file, "scheduler config")
