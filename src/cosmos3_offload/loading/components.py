"""Load the model components into the homes a plan gives them.

A checkpoint is the folder `Cosmos3OmniPipeline.save_pretrained` writes (see checkpoint.py).
Without one, a model from `model.specs` (by default the embedded tiny model) gets seeded random
weights and the byte-level tokenizer.

Both go through the two-phase load: the transformer and the VAE (and, for a request with sound,
the sound tokenizer's decoder) are built on `meta`, each group gets its home (device, or a host
slab when it is offloaded), and every weight is written once into that home, straight from the
safetensors file, with a progress bar over bytes. A checkpoint's files are checked against the
model before any home is allocated. What generation never reads (see layout.py) is never opened.

With a `HostShare` (several processes on one host, one GPU each), every host slab is one file the
host's processes all map, written by the owner alone, so host memory does not grow with the number
of processes; the load follows the protocol in offload/shared.py. A `NodeShare` does the same for
processes that start at different times (serve's replicas; see offload/node_share.py).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer
from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..errors import InputError, first_line
from ..model.groups import UNUSED, USE_ORDER, sound_group_of, vae_group_of
from ..model.specs import model_spec
from ..model.tiny_tokenizer import build_tiny_tokenizer
from ..offload.engine import OffloadEngine
from ..offload.materialize import build_on_meta, group_layouts, keep_fp32_dtype, move_buffers
from ..offload.node_share import NodeShare
from ..offload.shared import HostShare
from ..offload.slabs import SlabEntry, SlabLayout
from ..planning.plan import Plan
from ..quant.fp8 import has_fp8_matmul
from ..quant.linear import Precision, fp8_linear_paths, stored_dtypes
from ..quant.policy import StepPolicy, TowerSwitches, Uniform, step_schedule
from .checkpoint import model_configs_of
from .files import CheckpointWeights
from .layout import SOUND_TOKENIZER, PipelineOptions, has_sound_tokenizer, pipeline_options, sound_config
from .mapped_files import MappedFiles
from .mapped_reasoner import check_mapped_reasoner
from .placer import Placer, weight_grouping
from .quantization import (
    NO_FP8_FLAGS,
    NONE,
    Fp8Options,
    Quantization,
    QuantizingFill,
    apply_quantization,
    check_scales,
    is_unstored,
    quantization_of,
    stored_skip,
)
from .random_weights import RandomValues, random_value
from .scheduler import scheduler_config

logger = logging.getLogger(__name__)

TINY_WEIGHT_SEED = 0
PROGRESS_BATCH_BYTES = 256 * 2**20  # the load's progress bar moves at least this often


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
    options: PipelineOptions = PipelineOptions()
    sound_tokenizer: Cosmos3AVAEAudioTokenizer | None = None
    quantization: Quantization = NONE
    # Each tower's FP8 linears read their precision here, set per request and denoising step as
    # `schedule` says (see quant/policy.py); both do nothing without FP8 linears.
    switches: TowerSwitches = field(default_factory=TowerSwitches)
    schedule: StepPolicy | Uniform = Uniform(Precision.W8A16)


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
    sound: bool = False,
    actions: bool = False,
    progress: bool = False,
    fp8: Fp8Options = NO_FP8_FLAGS,
    host_share: HostShare | NodeShare | None = None,
) -> Components:
    """Build, place and fill every component as `plan` says (default: everything resident).

    `sound` loads the checkpoint's sound tokenizer too (its decoder only); `actions` the transformer's
    action heads, with the generator (see model/actions.py). An FP8 checkpoint's
    linears load as FP8; `fp8.quantize` quantizes a bf16 one's as they load (see quantization.py);
    `fp8.mode` picks W8A8 or W8A16 per step (see quant/policy.py). `host_share`: the host slabs are
    shared with the host's other processes, and filled by its owner (see offload/shared.py, and
    offload/node_share.py for processes that start at different times); every process of the host
    must call this with the same model, plan and share.
    """
    plan = plan or Plan()
    if sound and not has_sound_tokenizer(checkpoint):
        raise InputError("sound needs a checkpoint with a sound_tokenizer/ folder")
    transformer_config, vae_config = model_configs(checkpoint, random_model)
    if actions and not transformer_config.get("action_gen", False):
        raise InputError("action runs need a transformer with action heads (action_gen), and this one has none")
    stored_transformer = None if checkpoint is None else CheckpointWeights(checkpoint / "transformer")
    quantization = quantization_of(transformer_config, stored_transformer, quantize=fp8.quantize, scales=fp8.scales)
    if not quantization.quantized and (fp8.mode != NO_FP8_FLAGS.mode or fp8.scales != NO_FP8_FLAGS.scales):
        raise InputError(
            "--fp8-mode and --fp8-scales apply to FP8 weights: add --quantize fp8, or use an FP8 checkpoint"
        )
    schedule = step_schedule(fp8.mode, quantization.policy, fp8_cores=has_fp8_matmul(device))
    check_mapped_reasoner(plan, has_files=checkpoint is not None, rewrites_weights=quantization.on_load)
    transformer = _build(Cosmos3OmniTransformer, transformer_config)
    switches = TowerSwitches()
    apply_quantization(transformer, quantization, switches)
    vae = _build(AutoencoderKLWan, vae_config)
    layers = transformer.config.num_hidden_layers
    transformer_dtypes = stored_dtypes(transformer, keep_fp32_dtype(Cosmos3OmniTransformer, dtype))
    parts = [
        _Part(transformer, weight_grouping(plan, layers, actions), transformer_dtypes, "transformer"),
        _Part(vae, vae_group_of, keep_fp32_dtype(AutoencoderKLWan, dtype), "vae"),
    ]
    sound_tokenizer = None
    if sound:
        sound_tokenizer = _build(Cosmos3AVAEAudioTokenizer, sound_config(checkpoint))
        parts.append(
            _Part(sound_tokenizer, sound_group_of, keep_fp32_dtype(Cosmos3AVAEAudioTokenizer, dtype), SOUND_TOKENIZER)
        )
    layouts = [group_layouts(part.root, part.group_of, part.dtype_of) for part in parts]
    if checkpoint is not None:
        weights = [stored_transformer] + [CheckpointWeights(checkpoint / part.folder) for part in parts[1:]]
        for part, stored, layout in zip(parts, weights, layouts):
            expected = [
                (names, shape)
                for names, shape in _shapes(layout, skip=UNUSED)
                if not is_unstored(names[0], quantization)
            ]
            stored.check_against(expected, stored_skip(part.group_of, UNUSED))
        check_scales(MappedFiles(stored_transformer).view, quantization)
    # The tokenizer and the scheduler are cheap: read them before any weight memory exists, so a broken one
    # costs nothing.
    tokenizer = build_tiny_tokenizer() if checkpoint is None else _checkpoint_tokenizer(checkpoint)
    options = pipeline_options(checkpoint)
    # A node share's reader waits here until the node's copy is complete (or claims it, see node_share.py).
    shared = None if host_share is None else host_share.open_files()
    # A mapped reasoner reads weights[0].
    placer = Placer(device, plan, None if checkpoint is None else weights[0], shared_files=shared)
    try:
        targets = [placer.place(part.root, layout) for part, layout in zip(parts, layouts)]
        if shared is not None:
            shared.wait_all_mapped()  # a host share's files can go once every process has mapped them
        _fill(targets, None if checkpoint is None else weights, seed, quantization, transformer, device, progress)
        if shared is not None:
            shared.wait_filled()  # the owner has filled the shared slabs: no process reads or pins one before
    except BaseException:
        if shared is not None:
            shared.abandon()  # nothing half-filled is left for another process to map
        raise
    for slab in placer.slabs_to_pin:
        slab.pin()
    for part in parts:
        move_buffers(part.root, device)
    _return_freed_heap()
    return Components(
        transformer=transformer,
        vae=vae,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config(checkpoint, options.distilled_sigmas),
        source=f"{random_model} model (random weights)" if checkpoint is None else str(checkpoint),
        random_weights=checkpoint is None,
        engine=OffloadEngine(device, placer.placements, tuple(g for g in USE_ORDER if g in placer.placements)),
        plan=plan,
        options=options,
        sound_tokenizer=sound_tokenizer,
        quantization=quantization,
        switches=switches,
        schedule=schedule,
    )


def _fill(
    targets: list[list[tuple[SlabEntry, torch.Tensor]]],
    weights: list[CheckpointWeights] | None,
    seed: int,
    quantization: Quantization,
    transformer: Cosmos3OmniTransformer,
    device: torch.device,
    progress: bool,
) -> None:
    """Write every (entry, home) pair of each part: from the checkpoint's files, or seeded random values
    (quantized to FP8 as they load where `quantization.on_load`)."""
    with tqdm(
        total=sum(_nbytes(t) for t in targets), desc="load", unit="B", unit_scale=True, disable=not progress
    ) as bar:
        for index, part_targets in enumerate(targets):
            files = None if weights is None else MappedFiles(weights[index])
            fill = RandomValues(seed).fill if files is None else files.fill
            if index == 0 and quantization.on_load:
                value_of = files.view if files is not None else _random_value_of(seed)
                fill = QuantizingFill(
                    fill,
                    value_of,
                    frozenset(fp8_linear_paths(transformer)),
                    part_targets,
                    per_channel=quantization.per_channel,
                    device=device,
                )
            for batch in _batches(part_targets):
                fill(batch)
                bar.update(_nbytes(batch))


def _return_freed_heap() -> None:
    """Give the fill's freed scratch back to the system (glibc keeps freed chunks in per-thread arenas:
    gigabytes after a many-threaded fill, counted against every process of a multi-GPU run)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _random_value_of(seed: int) -> Callable[[SlabEntry], torch.Tensor]:
    """A random weight's full float32 value (what `--quantize` rounds to FP8 without a checkpoint)."""
    return lambda entry: random_value(entry.names[0], entry.shape, seed)


@dataclass(frozen=True)
class _Part:
    """One model of the pipeline as the load sees it: its groups, dtypes and folder in a checkpoint."""

    root: torch.nn.Module
    group_of: Callable[[str], str]
    dtype_of: Callable[[str], torch.dtype]
    folder: str


def _nbytes(targets: list[tuple[SlabEntry, torch.Tensor]]) -> int:
    return sum(home.numel() * home.element_size() for _, home in targets)


def _batches(targets: list[tuple[SlabEntry, torch.Tensor]]) -> list[list[tuple[SlabEntry, torch.Tensor]]]:
    """`targets` in runs of about PROGRESS_BATCH_BYTES, in order (each file still read in one pass per run)."""
    batches: list[list[tuple[SlabEntry, torch.Tensor]]] = [[]]
    size = 0
    for target in targets:
        if size >= PROGRESS_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(target)
        size += _nbytes([target])
    return [b for b in batches if b]


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
