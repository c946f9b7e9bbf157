"""Load the model components into the homes a staging plan gives them.

A checkpoint is the folder `Cosmos3OmniPipeline.save_pretrained` writes (model_index.json,
transformer/, vae/, text_tokenizer/, scheduler/). Without one, a model from `model_specs` (by
default the embedded tiny model) gets seeded random weights and the byte-level tokenizer.

Both go through the two-phase load of `materialize`: the transformer and the VAE are built on
`meta`, each group gets its home (device, or a host slab when its stage is offloaded), and every
weight is written once into that home.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import InputError
from .groups import EMBEDDING, PHASES, REASONER, UNUSED, VAE, transformer_group_of
from .materialize import (
    CheckpointValues,
    RandomValues,
    allocate_on_device,
    build_on_meta,
    group_layouts,
    keep_fp32_dtype,
    move_buffers,
)
from .model_specs import model_spec
from .slabs import HostSlab, SlabEntry, SlabLayout
from .staging import Placement, ResidentGroup, StagedGroup, StagingEngine, bind_views
from .tiny_tokenizer import build_tiny_tokenizer

logger = logging.getLogger(__name__)

PIPELINE_CLASS = "Cosmos3OmniPipeline"
REQUIRED_PARTS = ("transformer", "vae", "text_tokenizer")
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
    engine: StagingEngine


def check_checkpoint(path: Path) -> None:
    """Raise a ValueError saying what is missing unless `path` is a Cosmos3 diffusers folder."""
    index = path / "model_index.json"
    if not path.is_dir():
        raise InputError(f"checkpoint {str(path)!r} is not a folder; pass a diffusers-layout Cosmos3 folder")
    if not index.is_file():
        raise InputError(f"checkpoint {str(path)!r} has no model_index.json; it is not a diffusers pipeline folder")
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise InputError(f"checkpoint {str(path)!r} has an unreadable model_index.json") from None
    if class_name != PIPELINE_CLASS:
        raise InputError(f"checkpoint {str(path)!r} holds a {class_name!r}, not a {PIPELINE_CLASS}")
    missing = [part for part in REQUIRED_PARTS if not (path / part).is_dir()]
    if missing:
        raise InputError(f"checkpoint {str(path)!r} lacks the folder(s) {', '.join(missing)}")


def load_components(
    checkpoint: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    offload: frozenset[str] = frozenset(),
    *,
    random_model: str = "tiny",
    seed: int = TINY_WEIGHT_SEED,
) -> Components:
    """Build, place and fill every component; groups named in `offload` live in pinned host slabs."""
    if checkpoint is None:
        spec = model_spec(random_model)
        transformer_config, vae_config = spec.transformer, spec.vae
    else:
        check_checkpoint(checkpoint)
        transformer_config = Cosmos3OmniTransformer.load_config(checkpoint / "transformer")
        vae_config = AutoencoderKLWan.load_config(checkpoint / "vae")
    transformer = build_on_meta(Cosmos3OmniTransformer, transformer_config)
    vae = build_on_meta(AutoencoderKLWan, vae_config)
    layers = transformer.config.num_hidden_layers
    placer = _Placer(device, offload)
    transformer_targets = placer.place(
        transformer,
        group_layouts(
            transformer,
            lambda name: transformer_group_of(name, layers),
            keep_fp32_dtype(Cosmos3OmniTransformer, dtype),
        ),
    )
    vae_targets = placer.place(vae, group_layouts(vae, lambda name: VAE, keep_fp32_dtype(AutoencoderKLWan, dtype)))
    if checkpoint is None:
        RandomValues(seed).fill(transformer_targets + vae_targets)
    else:
        CheckpointValues(checkpoint / "transformer", lambda k: transformer_group_of(k, layers) == UNUSED).fill(
            transformer_targets
        )
        CheckpointValues(checkpoint / "vae", lambda k: False).fill(vae_targets)
    for slab in placer.slabs_to_pin:
        slab.pin()
    move_buffers(transformer, device)
    move_buffers(vae, device)
    return Components(
        transformer=transformer,
        vae=vae,
        tokenizer=build_tiny_tokenizer() if checkpoint is None else _checkpoint_tokenizer(checkpoint),
        scheduler_config=_scheduler_config(checkpoint),
        source=f"{random_model} model (random weights)" if checkpoint is None else str(checkpoint),
        random_weights=checkpoint is None,
        engine=StagingEngine(device, placer.placements, PHASES),
    )


class _Placer:
    """Gives each group its home and returns (entry, home) pairs for the values to be written into."""

    def __init__(self, device: torch.device, offload: frozenset[str]):
        self.device = device
        self.offload = offload
        self.placements: dict[str, Placement] = {}
        # Staged slabs are pinned after they are filled (faulting pages in from many threads is faster).
        self.slabs_to_pin: list[HostSlab] = []

    def place(self, root: nn.Module, layouts: dict[str, SlabLayout]) -> list[tuple[SlabEntry, torch.Tensor]]:
        targets: list[tuple[SlabEntry, torch.Tensor]] = []
        for group, layout in layouts.items():
            if group == UNUSED:
                continue  # never read by the split: left on meta, never allocated
            if group in self.offload or (group == EMBEDDING and REASONER in self.offload):
                slab = HostSlab(layout)
                view = slab.view
                # The embedding table is read row by row on the host; it is never staged, so never pinned.
                if group != EMBEDDING:
                    self.placements[group] = StagedGroup(group, root, slab)
                    if self.device.type == "cuda":
                        self.slabs_to_pin.append(slab)
            else:
                homes = {entry: allocate_on_device(entry, self.device) for entry in layout.entries}
                view = homes.__getitem__
                if group != EMBEDDING:
                    self.placements[group] = ResidentGroup(group, layout)
            bind_views(root, layout, view)
            targets += [(entry, view(entry)) for entry in layout.entries]
        return targets


def _checkpoint_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path / "text_tokenizer")


def _scheduler_config(path: Path | None) -> dict[str, Any]:
    scheduler_file = None if path is None else path / "scheduler" / "scheduler_config.json"
    return json.loads(scheduler_file.read_text()) if scheduler_file and scheduler_file.is_file() else {}
