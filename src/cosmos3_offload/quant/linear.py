"""`Fp8Linear`: a linear layer whose weight is stored in FP8, and the pass that puts it in a model.

Its weight, scales and bias are ordinary parameters, so the offload engine lays them out, stages
and streams them like any other weight (one byte a weight element; the scales travel with it).
Which precision its activations run in is not its own state: every layer of a tower reads one
shared `PrecisionSwitch`, which the denoising loop sets before each step (see policy.py).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .fp8 import FP8, w8a8_linear, w8a16_linear


class Precision(enum.Enum):
    """How a quantized linear runs: activations in bf16 (W8A16) or quantized to FP8 too (W8A8)."""

    W8A16 = "W8A16"
    W8A8 = "W8A8"


@dataclass
class PrecisionSwitch:
    """The precision every quantized linear of one tower runs in right now (mutable on purpose)."""

    precision: Precision = Precision.W8A16


class Fp8Linear(nn.Module):
    """`y = x W^T + b` with W stored as float8_e4m3fn times `weight_scale` ([] or [out] float32).

    `input_scale` (a float32 scalar) is the static activation scale of a calibrated checkpoint;
    without one, W8A8 scales each row of the activations on the fly.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        bias_dtype: torch.dtype,
        switch: PrecisionSwitch,
        weight_scale_shape: tuple[int, ...] = (),
        static_input: bool = True,
        device: torch.device | str = "meta",
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.switch = switch

        def parameter(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)

        self.weight = parameter((out_features, in_features), FP8)
        self.weight_scale = parameter(weight_scale_shape, torch.float32)
        self.input_scale = parameter((), torch.float32) if static_input else None
        self.bias = parameter((out_features,), bias_dtype) if bias else None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.switch.precision is Precision.W8A16:
            return w8a16_linear(inputs, self.weight, self.weight_scale, self.bias)
        return w8a8_linear(inputs, self.weight, self.weight_scale, self.input_scale, self.bias)

    def extra_repr(self) -> str:
        scales = "per-channel" if self.weight_scale.numel() > 1 else "per-tensor"
        inputs = "static" if self.input_scale is not None else "dynamic"
        return f"in={self.in_features}, out={self.out_features}, {scales} weight scale, {inputs} input scale"


@dataclass(frozen=True)
class Fp8Layout:
    """How one linear's FP8 weight is stored: its scale's shape and whether it has a static input scale."""

    weight_scale_shape: tuple[int, ...] = ()
    static_input: bool = True


def apply_fp8_linears(
    root: nn.Module,
    paths: Iterable[str],
    *,
    switch_of: Callable[[str], PrecisionSwitch],
    layout_of: Callable[[str], Fp8Layout],
) -> None:
    """Replace each `nn.Linear` at `paths` (module paths under `root`, on `meta`) by an `Fp8Linear`."""
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        parent = root.get_submodule(parent_path)
        linear = getattr(parent, attr)
        assert isinstance(linear, nn.Linear), f"{path} is a {type(linear).__name__}, not a Linear"
        layout = layout_of(path)
        bias = linear.bias
        replacement = Fp8Linear(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            bias_dtype=torch.float32 if bias is None else bias.dtype,
            switch=switch_of(path),
            weight_scale_shape=layout.weight_scale_shape,
            static_input=layout.static_input,
            device=linear.weight.device,
        )
        setattr(parent, attr, replacement)


def fp8_linear_paths(root: nn.Module) -> list[str]:
    """Module paths of every `Fp8Linear` under `root`."""
    return [path for path, module in root.named_modules() if isinstance(module, Fp8Linear)]


def stored_dtypes(root: nn.Module, dtype_of: Callable[[str], torch.dtype]) -> Callable[[str], torch.dtype]:
    """`dtype_of` for every weight, except an `Fp8Linear`'s FP8 weight and float32 scales, which keep
    the dtype they are stored in (its bias follows `dtype_of`, as a plain linear's does)."""
    fixed = {
        f"{path}.{name}": param.dtype
        for path in fp8_linear_paths(root)
        for name, param in root.get_submodule(path).named_parameters()
        if name != "bias"
    }
    return lambda name: fixed.get(name) or dtype_of(name)
