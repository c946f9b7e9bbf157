"""A loaded pipeline's own modules placed as a plan says: the same module objects, each weight moved
into the home the plan gives it, the old tensor freed once copied.

This is the two-phase load of loading/components.py with the pipeline's live modules in place of
modules built on `meta`, and their current tensors in place of the checkpoint's files. One tower at
a time (a group with its streamed layers) is given its homes and filled before the next is
allocated, so the weights exist twice only for the tower being moved. A weight kept on the device it
already lives on, in its dtype and aligned, keeps its tensor: nothing is allocated or copied (a
pipeline moved to the GPU before `enable`, run resident there; a CPU pipeline's weights left at the
byte offsets of the file they were read from are copied into aligned homes, see module_weights.py). Weights
that generation never reads (`unused`: lm_head, the final norm, the sound tokenizer's encoder, the action
heads of a transformer without action_gen) are released: their parameters become `meta` tensors; a
transformer's action heads are the generator's (a call may ask for actions). So are the copies torch's
(old) `weight_norm` computed from its parameters at load time (the sound tokenizer's convolutions):
the hook computes them again before every forward, from the placed parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import Cosmos3OmniPipeline
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm

from ..loading.module_weights import ModuleWeights
from ..loading.placer import LAYER_MARK, Placer, weight_grouping
from ..loading.quantization import QuantizingFill
from ..model.groups import UNUSED, USE_ORDER, sound_group_of, vae_group_of
from ..offload.engine import OffloadEngine
from ..offload.materialize import group_layouts, move_buffers
from ..offload.placements import Placement, bind_views
from ..offload.slabs import SlabEntry, SlabLayout
from ..planning.plan import Plan
from ..quant.linear import stored_dtypes
from .fp8 import Fp8Linears, make_fp8_linears


def place_pipeline(
    pipe: Cosmos3OmniPipeline, plan: Plan, device: torch.device, fp8: Fp8Linears | None = None
) -> OffloadEngine:
    """Place `pipe`'s transformer, VAE and sound tokenizer (if any) on `device` and host as `plan` says
    (with `fp8`, the transformer's decoder-layer linears quantized as they are written); the pipeline keeps
    its module objects, now bound to their homes. Returns the engine that moves them."""
    config = pipe.transformer.config
    # The action heads stay (a few MiB) when the transformer has them: a later call may ask for actions.
    grouping = weight_grouping(plan, config.num_hidden_layers, actions=bool(getattr(config, "action_gen", False)))
    placements = _place_part(pipe.transformer, grouping, plan, device, fp8)
    placements.update(_place_part(pipe.vae, vae_group_of, plan, device))
    if pipe.sound_tokenizer is not None:
        placements.update(_place_part(pipe.sound_tokenizer, sound_group_of, plan, device))
    return OffloadEngine(device, placements, tuple(g for g in USE_ORDER if g in placements))


def _place_part(
    root: nn.Module,
    group_of: Callable[[str], str],
    plan: Plan,
    device: torch.device,
    fp8: Fp8Linears | None = None,
) -> dict[str, Placement]:
    """One model's groups placed and filled tower by tower; its buffers moved to `device`."""
    weights = ModuleWeights(root)  # holds the old tensors: taken before the placer rebinds the parameters
    dtype_of = weights.dtype_of
    linears: frozenset[str] = frozenset()
    if fp8 is not None:
        linears = make_fp8_linears(root, fp8)
        dtype_of = stored_dtypes(root, weights.dtype_of)  # FP8 weights, float32 scales
    layouts = group_layouts(root, group_of, dtype_of)
    placer = Placer(device, plan, reuse=weights.reusable(device))
    for tower, tower_layouts in _by_tower(layouts).items():
        if tower == UNUSED:
            _release(root, tower_layouts[UNUSED], weights)
            continue
        targets = placer.place(root, tower_layouts)
        fill = weights.fill
        if linears:  # FP8 weights rounded from the module's own values, on the device, as they are written
            per_channel = fp8.quantization.per_channel
            fill = QuantizingFill(fill, weights.take, linears, targets, per_channel=per_channel, device=device)
        fill(targets)
    assert not weights.remaining, weights.remaining[:4]
    for slab in placer.slabs_to_pin:
        slab.pin()  # filled: its pages exist, so page-locking them is cheap
    _release_computed_weights(root)
    move_buffers(root, device)
    return placer.placements


def _by_tower(layouts: dict[str, SlabLayout]) -> dict[str, dict[str, SlabLayout]]:
    """The layouts grouped by tower: a streamed tower's head and its layers ("<tower>@<i>") go together,
    as the placer builds one placement over them."""
    towers: dict[str, dict[str, SlabLayout]] = {}
    for group, layout in layouts.items():
        towers.setdefault(group.partition(LAYER_MARK)[0], {})[group] = layout
    return towers


def _release(root: nn.Module, layout: SlabLayout, weights: ModuleWeights) -> None:
    """Rebind weights nobody reads to `meta` tensors and drop their values: their memory goes back."""
    bind_views(root, layout, _meta_tensor)
    weights.drop(layout.entries)


def _release_computed_weights(root: nn.Module) -> None:
    """Drop the weights `weight_norm` computed at load time: plain attributes, not parameters, recomputed
    from `weight_g` and `weight_v` before every forward (so a stale copy is never read)."""
    for module in root.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                setattr(module, hook.name, torch.empty_like(getattr(module, hook.name), device="meta"))


def _meta_tensor(entry: SlabEntry) -> torch.Tensor:
    return torch.empty(entry.shape, dtype=entry.dtype, device="meta")
