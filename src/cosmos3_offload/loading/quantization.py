"""How the transformer's linears are stored and where their FP8 weights come from.

Three cases, one `Quantization` value each, decided before any weight memory exists:

- none: a bf16 checkpoint (or random weights) run as it is;
- checkpoint: an FP8 checkpoint in NVIDIA's ModelOpt layout (the `fp8` revision of the Hub repos).
  `transformer/config.json` has a `quantization_config` with `quant_method: modelopt` and
  `quant_algo: FP8`; each quantized linear stores `weight` (F8_E4M3), `weight_scale` and a static
  `input_scale` (float32 scalars). ModelOpt's own buffers (`*_quantizer._amax`, `._scale`) are
  never read, nor is `modelopt_state.pth` (a pickle). The FP8 weights and scales go into their
  homes as they are: one byte a weight element.
- load (`--quantize fp8`): a bf16 checkpoint (or random weights) whose decoder-layer linears
  (model/quantized.py) are quantized one weight at a time as they are written into their homes,
  with a float32 scale per output channel (or per tensor) and dynamic activation scales.

Which linears are FP8 in a checkpoint is read from the stored dtypes, and every one must have
its scales: an FP8 weight without them would run as noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import Cosmos3OmniTransformer
from torch import nn

from ..errors import InputError
from ..model.quantized import KEPT_IN_BF16, is_quantized_linear
from ..model.towers import tower_of
from ..offload.materialize import build_on_meta
from ..offload.slabs import SlabEntry
from ..quant.fp8 import quantize, weight_scales
from ..quant.linear import Fp8Layout, apply_fp8_linears, fp8_linear_paths
from ..quant.policy import FP8_MODES, StepPolicy, TowerSwitches, parse_step_policy
from ..units import format_bytes
from .files import CheckpointWeights, dtype_name, is_fp8
from .mapped_files import FILL_THREADS

QUANTIZE_CHOICES = ("fp8",)  # what --quantize takes
SCALE_CHOICES = ("channel", "tensor")  # what --fp8-scales takes
STORED_FP8 = "F8_E4M3"
MODELOPT_BUFFERS = ("_quantizer.",)  # `weight_quantizer._amax`, `input_quantizer._scale`, ...
WEIGHT, WEIGHT_SCALE, INPUT_SCALE = "weight", "weight_scale", "input_scale"


@dataclass(frozen=True)
class Quantization:
    """Which linears are stored in FP8 and how, and the checkpoint's step policy (None: run W8A8)."""

    kind: str = "none"  # "none", "checkpoint" or "load"
    stored: dict[str, Fp8Layout] = field(default_factory=dict)  # a checkpoint's FP8 linears
    per_channel: bool = True  # --quantize: one weight scale per output channel (else per tensor)
    policy: StepPolicy | None = None

    @property
    def quantized(self) -> bool:
        return self.kind != "none"

    @property
    def on_load(self) -> bool:
        return self.kind == "load"

    def layouts(self, transformer: nn.Module) -> dict[str, Fp8Layout]:
        """The FP8 linears of `transformer` (built on meta) by module path."""
        if self.kind == "checkpoint":
            return self.stored
        if self.kind == "none":
            return {}
        return {
            path: Fp8Layout(weight_scale_shape=(module.out_features,) if self.per_channel else (), static_input=False)
            for path, module in transformer.named_modules()
            if isinstance(module, nn.Linear) and is_quantized_linear(path)
        }


NONE = Quantization()


@dataclass(frozen=True, kw_only=True)
class Fp8Options:
    """The FP8 flags: `quantize` ("fp8" or None), `mode` (see quant/policy.py), `scales` for --quantize."""

    quantize: str | None = None
    mode: str = "auto"
    scales: str = "channel"

    def __post_init__(self):
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise InputError(f"unknown --quantize {self.quantize!r}; choose from {' '.join(QUANTIZE_CHOICES)}")
        if self.mode not in FP8_MODES:
            raise InputError(f"unknown --fp8-mode {self.mode!r}; choose from {' '.join(FP8_MODES)}")
        if self.scales not in SCALE_CHOICES:
            raise InputError(f"unknown --fp8-scales {self.scales!r}; choose from {' '.join(SCALE_CHOICES)}")


NO_FP8_FLAGS = Fp8Options()  # no flags: a bf16 checkpoint runs as it is, an FP8 one by its policy


def quantization_for(checkpoint: Path | None, transformer_config: dict, options: Fp8Options) -> Quantization:
    """The quantization a run of `checkpoint` (None: random weights) with `options` gets."""
    stored = None if checkpoint is None else CheckpointWeights(checkpoint / "transformer")
    return quantization_of(transformer_config, stored, quantize=options.quantize, scales=options.scales)


def quantization_of(
    transformer_config: dict,
    stored: CheckpointWeights | None,
    *,
    quantize: str | None = None,
    scales: str = "channel",
) -> Quantization:
    """The quantization of a checkpoint's transformer (`stored` None: random weights), or of
    `--quantize` applied to a bf16 one (a no-op for an FP8 checkpoint); `Fp8Options` validated both."""
    config = transformer_config.get("quantization_config")
    fp8_weights = [] if stored is None else sorted(k for k, s in stored.tensors.items() if is_fp8(s.dtype))
    if config is None and not fp8_weights:
        if quantize is None:
            return NONE
        # No checkpoint policy to follow: the official FP8 releases' (W8A16 first and last 3 steps).
        return Quantization("load", per_channel=scales == "channel", policy=StepPolicy())
    if config is None:
        file = stored.tensors[fp8_weights[0]].file
        raise InputError(
            f"{file.name} in {str(stored.folder)!r} stores {fp8_weights[0]!r} in FP8, but its config.json has no "
            "quantization_config saying how; use the checkpoint's own config (an FP8 revision has one)"
        )
    _check_method(config)
    if stored is None:
        raise InputError("an FP8 transformer config needs its checkpoint's weights")
    return Quantization("checkpoint", _stored_layouts(stored, fp8_weights), policy=_policy_of(config))


def apply_quantization(transformer: nn.Module, quantization: Quantization, switches: TowerSwitches) -> None:
    """Make the FP8 linears of `transformer` (on meta) `Fp8Linear`s; each reads its tower's switch."""
    layouts = quantization.layouts(transformer)
    for path in layouts:
        if not isinstance(_module(transformer, path), nn.Linear):
            raise InputError(f"the checkpoint stores {path}.weight in FP8, but {path} is no linear layer of the model")
    apply_fp8_linears(
        transformer,
        layouts,
        switch_of=lambda path: getattr(switches, tower_of(f"{path}.weight")),
        layout_of=layouts.get,
    )


def is_modelopt_buffer(key: str) -> bool:
    """ModelOpt's restore state stored beside the weights (`*.weight_quantizer._amax`, ...): never read."""
    return any(part in key for part in MODELOPT_BUFFERS)


class QuantizingFill:
    """Writes values into their homes, quantizing the FP8 linears' weights on the way (`--quantize`).

    `fill` writes plain values; `value_of(entry)` gives a weight's full-precision value on the host.
    Each quantized weight is read, scaled and rounded on its own (never a whole group at once),
    a few at a time, and its scale written into the scale's home alongside."""

    def __init__(
        self,
        fill: Callable[[list[tuple[SlabEntry, torch.Tensor]]], None],
        value_of: Callable[[SlabEntry], torch.Tensor],
        linears: frozenset[str],
        targets: list[tuple[SlabEntry, torch.Tensor]],
        *,
        per_channel: bool,
        device: torch.device,
    ):
        self.fill_plain, self.value_of, self.per_channel = fill, value_of, per_channel
        self.device = device  # where the rounding runs (the GPU when there is one: the CPU is ~5x slower)
        self.linears = linears
        self.scale_home = {
            name.removesuffix(f".{WEIGHT_SCALE}"): home
            for entry, home in targets
            for name in entry.names
            if name.endswith(f".{WEIGHT_SCALE}") and name.removesuffix(f".{WEIGHT_SCALE}") in linears
        }

    def __call__(self, targets: list[tuple[SlabEntry, torch.Tensor]]) -> None:
        quantized = [(e, h) for e, h in targets if self._linear_of(e) is not None]
        self.fill_plain([(e, h) for e, h in targets if self._linear_of(e) is None and not self._is_scale(e)])
        with torch.no_grad(), ThreadPoolExecutor(FILL_THREADS) as pool:
            list(pool.map(self._quantize_into, quantized))

    def _quantize_into(self, target: tuple[SlabEntry, torch.Tensor]) -> None:
        entry, home = target
        value = self.value_of(entry).to(self.device)  # [out, in], full precision
        scale = weight_scales(value, per_channel=self.per_channel)
        home.copy_(quantize(value, scale))
        self.scale_home[self._linear_of(entry)].copy_(scale.reshape(self.scale_home[self._linear_of(entry)].shape))

    def _linear_of(self, entry: SlabEntry) -> str | None:
        path = entry.names[0].removesuffix(f".{WEIGHT}")
        return path if entry.names[0].endswith(f".{WEIGHT}") and path in self.linears else None

    def _is_scale(self, entry: SlabEntry) -> bool:
        return entry.names[0].removesuffix(f".{WEIGHT_SCALE}") in self.scale_home


def _check_method(config: object) -> None:
    """Only ModelOpt FP8 runs; any other method is named in a one-line error."""
    if not isinstance(config, dict):
        raise InputError(f"transformer/config.json's quantization_config must be a mapping, got {config!r}")
    method = str(config.get("quant_method", "")).lower()
    algo = str(config.get("quant_algo") or config.get("quant_type") or "").upper()
    if method != "modelopt" or algo != "FP8":
        raise InputError(
            f"the transformer is quantized with {method or 'an unnamed method'} ({algo or 'no algorithm named'}); "
            "cosmos3-offload runs bf16 checkpoints and ModelOpt FP8 ones (quant_method modelopt, quant_algo FP8)"
        )


def _stored_layouts(stored: CheckpointWeights, fp8_weights: list[str]) -> dict[str, Fp8Layout]:
    """Each FP8 linear's layout from its stored tensors; an FP8 weight without its scales is refused."""
    layouts = {}
    where = str(stored.folder)
    for key in fp8_weights:
        tensor = stored.tensors[key]
        if tensor.dtype != STORED_FP8 or not key.endswith(f".{WEIGHT}"):
            raise InputError(
                f"{tensor.file.name} in {where!r} stores {key!r} as {dtype_name(tensor.dtype)}; FP8 checkpoints "
                f"store linear weights as {STORED_FP8}"
            )
        path = key.removesuffix(f".{WEIGHT}")
        out_features = tensor.shape[0]
        weight_scale = stored.tensors.get(f"{path}.{WEIGHT_SCALE}")
        input_scale = stored.tensors.get(f"{path}.{INPUT_SCALE}")
        if (
            weight_scale is None
            or weight_scale.dtype != "F32"
            or math.prod(weight_scale.shape) not in (1, out_features)
        ):
            raise InputError(
                f"{where!r} stores {key!r} in FP8 without a float32 {WEIGHT_SCALE} (a scalar or one per output "
                "channel); without it the weights would be noise: the checkpoint is incomplete"
            )
        if input_scale is not None and (input_scale.dtype != "F32" or math.prod(input_scale.shape) != 1):
            raise InputError(
                f"{where!r} stores {path}.{INPUT_SCALE} as {input_scale.dtype} {list(input_scale.shape)}; "
                "it must be a float32 scalar"
            )
        layouts[path] = Fp8Layout(weight_scale_shape=tuple(weight_scale.shape), static_input=input_scale is not None)
    return layouts


def _policy_of(config: dict) -> StepPolicy | None:
    runtime = config.get("runtime")
    if runtime is None:
        return None
    if not isinstance(runtime, dict):
        raise InputError("transformer/config.json's quantization_config.runtime must be a mapping")
    policy = runtime.get("diffusion_step_policy")
    return None if policy is None else parse_step_policy(policy)


def _module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def stored_skip(group_of: Callable[[str], str], unused: str) -> Callable[[str], bool]:
    """Stored tensors the load never reads: weights of `unused` groups and ModelOpt's buffers."""
    return lambda key: is_modelopt_buffer(key) or group_of(key) == unused


def is_unstored(name: str, quantization: Quantization) -> bool:
    """A tensor of the model that its checkpoint does not hold: the scales `--quantize` computes."""
    return quantization.on_load and name.endswith(f".{WEIGHT_SCALE}")


def check_scales(view: Callable[[SlabEntry], torch.Tensor], quantization: Quantization) -> None:
    """Every stored scale finite and positive (read from the files: a few bytes per linear)."""
    for path, layout in quantization.stored.items():
        names = [WEIGHT_SCALE] + ([INPUT_SCALE] if layout.static_input else [])
        for name in names:
            shape = layout.weight_scale_shape if name == WEIGHT_SCALE else ()
            value = view(SlabEntry(0, shape, torch.float32, ((path, name),)))
            if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
                raise InputError(
                    f"{path}.{name} is {value.flatten()[:4].tolist()}: FP8 scales are finite and positive; "
                    "the checkpoint is damaged"
                )


def describe_quantization(transformer_config: dict, quantization: Quantization, dtype_bytes: int = 2) -> str:
    """One line: which linears are FP8, from where, and the bytes that saves against the run's dtype."""
    if not quantization.quantized:
        return "weights: bf16 as stored (--quantize fp8 would halve the decoder layers' linears)"
    transformer = build_on_meta(Cosmos3OmniTransformer, transformer_config)
    apply_quantization(transformer, quantization, TowerSwitches())
    linears = [transformer.get_submodule(path) for path in fp8_linear_paths(transformer)]
    elements = sum(linear.weight.numel() for linear in linears)
    scales = sum(p.numel() * 4 for linear in linears for n, p in linear.named_parameters() if n.endswith("_scale"))
    saved = elements * (dtype_bytes - 1) - scales
    source = (
        "ModelOpt FP8 checkpoint"
        if quantization.kind == "checkpoint"
        else (f"--quantize fp8, {'per-channel' if quantization.per_channel else 'per-tensor'} weight scales")
    )
    policy = quantization.policy
    steps = (
        "no step policy: W8A8 at every step"
        if policy is None
        else f"W8A16 first {policy.first_steps} and last {policy.last_steps} steps, W8A8 between, "
        f"reasoner {policy.reasoner.value}"
    )
    return (
        f"weights: {len(linears)} linears in FP8 ({source}; {KEPT_IN_BF16} stay bf16): "
        f"{format_bytes(elements)} instead of {format_bytes(elements * dtype_bytes)}, {format_bytes(saved)} saved; "
        f"{steps}"
    )
