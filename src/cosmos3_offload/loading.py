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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import InputError
from .groups import (
    EMBEDDING,
    GENERATOR,
    PHASE_ORDER,
    REASONER,
    UNUSED,
    VAE,
    VAE_ENCODER,
    transformer_group_of,
    vae_group_of,
)
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
from .plan import Plan
from .slabs import HostSlab, SlabEntry, SlabLayout
from .staging import ResidentGroup, StagedGroup, StagingEngine, bind_views
from .streaming import StreamedGroup
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
    plan: Plan


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
    plan: Plan | None = None,
    *,
    random_model: str = "tiny",
    seed: int = TINY_WEIGHT_SEED,
) -> Components:
    """Build, place and fill every component as `plan` says (default: everything resident)."""
    plan = plan or Plan()
    transformer_config, vae_config = model_configs(checkpoint, random_model)
    transformer = build_on_meta(Cosmos3OmniTransformer, transformer_config)
    vae = build_on_meta(AutoencoderKLWan, vae_config)
    layers = transformer.config.num_hidden_layers
    placer = _Placer(device, plan)
    transformer_layouts = group_layouts(
        transformer, _transformer_grouping(plan, layers), keep_fp32_dtype(Cosmos3OmniTransformer, dtype)
    )
    transformer_targets = placer.place(transformer, transformer_layouts)
    vae_targets = placer.place(vae, group_layouts(vae, vae_group_of, keep_fp32_dtype(AutoencoderKLWan, dtype)))
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
        engine=StagingEngine(device, {g: placer.placements[g] for g in PHASE_ORDER}, PHASE_ORDER),
        plan=plan,
    )


def model_configs(checkpoint: Path | None, random_model: str = "tiny") -> tuple[dict, dict]:
    """(transformer config, VAE config) of a checkpoint, or of a registered size for random weights."""
    if checkpoint is None:
        spec = model_spec(random_model)
        return spec.transformer, spec.vae
    check_checkpoint(checkpoint)
    return (
        Cosmos3OmniTransformer.load_config(checkpoint / "transformer"),
        AutoencoderKLWan.load_config(checkpoint / "vae"),
    )


_LAYER = re.compile(r"^layers\.(\d+)\.")
_STREAMED_LAYER = "@"  # group name of a streamed layer: "<tower>@<index>"


def _transformer_grouping(plan: Plan, layers: int):
    """Group names for the transformer's weights; a streamed tower's non-resident layers get one group each."""

    def group_of(name: str) -> str:
        group = transformer_group_of(name, layers)
        match = _LAYER.match(name)
        if group in (REASONER, GENERATOR) and plan.group(group).mode == "streamed" and match:
            if int(match.group(1)) not in plan.group(group).resident_layers:
                return f"{group}{_STREAMED_LAYER}{match.group(1)}"
        return group

    return group_of


class _Placer:
    """Gives each group its home and returns (entry, home) pairs for the values to be written into."""

    def __init__(self, device: torch.device, plan: Plan):
        self.device = device
        self.plan = plan
        self.placements: dict = {}
        # Slabs that are copied to the device are pinned after they are filled (faulting pages in
        # from many threads is faster than pinning untouched memory).
        self.slabs_to_pin: list[HostSlab] = []

    def place(self, root: nn.Module, layouts: dict[str, SlabLayout]) -> list[tuple[SlabEntry, torch.Tensor]]:
        targets: list[tuple[SlabEntry, torch.Tensor]] = []
        streamed: dict[str, dict[int, HostSlab]] = {REASONER: {}, GENERATOR: {}}
        heads: dict[str, SlabLayout] = {}
        for group, layout in layouts.items():
            if group == UNUSED:
                continue  # never read by the split: left on meta, never allocated
            tower, _, index = group.partition(_STREAMED_LAYER)
            if index:
                slab = self._host_slab(layout, pin=True)
                streamed[tower][int(index)] = slab
                view = slab.view
            elif group == EMBEDDING and self.plan.reasoner.mode != "resident":
                # Read row by row on the host (see prefill); never copied, so never pinned.
                view = self._host_slab(layout, pin=False).view
            elif group != EMBEDDING and self.plan.group(group).mode == "staged":
                slab = self._host_slab(layout, pin=True)
                self.placements[group] = StagedGroup(group, root, slab)
                view = slab.view
            else:
                view = self._device_homes(layout)
                heads[group] = layout
            bind_views(root, layout, view)
            targets += [(entry, view(entry)) for entry in layout.entries]
        for tower in (REASONER, GENERATOR, VAE, VAE_ENCODER):
            if tower in self.placements or (tower not in heads and not streamed.get(tower)):
                continue  # staged above, or a tower of another root
            head = heads.get(tower, SlabLayout.pack([]))
            if streamed.get(tower):
                how = self.plan.group(tower)
                self.placements[tower] = StreamedGroup(
                    tower, root, root.layers, streamed[tower], head, ring=how.ring, prefetch=how.prefetch
                )
            else:
                self.placements[tower] = ResidentGroup(tower, head)
        return targets

    def _host_slab(self, layout: SlabLayout, *, pin: bool) -> HostSlab:
        slab = HostSlab(layout)
        if pin and self.device.type == "cuda":
            self.slabs_to_pin.append(slab)
        return slab

    def _device_homes(self, layout: SlabLayout):
        homes = {entry: allocate_on_device(entry, self.device) for entry in layout.entries}
        return homes.__getitem__


def _checkpoint_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path / "text_tokenizer")


def _scheduler_config(path: Path | None) -> dict[str, Any]:
    scheduler_file = None if path is None else path / "scheduler" / "scheduler_config.json"
    return json.loads(scheduler_file.read_text()) if scheduler_file and scheduler_file.is_file() else {}
