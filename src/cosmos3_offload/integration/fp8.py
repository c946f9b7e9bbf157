"""`enable(pipe, quantize="fp8")`: the transformer's decoder-layer linears in FP8, as the CLI's --quantize fp8.

Each such linear of the loaded pipeline becomes an `Fp8Linear` (quant/linear.py) before it is
placed, and its weight is rounded to FP8 as it is written into its home (loading/quantization.py's
`QuantizingFill`, reading the pipeline's own tensor, which is then let go): one byte a weight element
on the device and in host slabs. Every FP8 linear of a tower reads its tower's precision switch,
which the call sets before the prefill and before each denoising step (`fp8_mode`, see quant/policy.py).
The output is then the CLI's for the same request, not the unquantized pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..app.doors import Fp8Steps
from ..errors import InputError
from ..loading.quantization import NO_FP8_FLAGS, Fp8Options, Quantization, apply_quantization, quantization_of
from ..quant.fp8 import has_fp8_matmul
from ..quant.linear import fp8_linear_paths
from ..quant.policy import StepPolicy, TowerSwitches, Uniform, step_schedule


@dataclass(frozen=True)
class Fp8Linears:
    """The transformer's FP8 linears: how they are quantized, their towers' switches, and the schedule that
    sets the switches per call and step."""

    quantization: Quantization
    switches: TowerSwitches
    schedule: StepPolicy | Uniform

    @property
    def steps(self) -> Fp8Steps:
        """The switches and their schedule, as the generation path sets them (app/doors.py)."""
        return Fp8Steps(self.switches, self.schedule)


def fp8_linears(transformer_config: dict, options: Fp8Options, device: torch.device) -> Fp8Linears | None:
    """The FP8 linears `options` asks for (None: the weights stay as loaded); `fp8_mode` and `fp8_scales`
    without `quantize` are refused, as the CLI refuses them."""
    quantization = quantization_of(transformer_config, None, quantize=options.quantize, scales=options.scales)
    if not quantization.quantized:
        if (options.mode, options.scales) != (NO_FP8_FLAGS.mode, NO_FP8_FLAGS.scales):
            raise InputError("fp8_mode and fp8_scales apply to FP8 weights: pass quantize='fp8' too")
        return None
    schedule = step_schedule(options.mode, quantization.policy, fp8_cores=has_fp8_matmul(device))
    return Fp8Linears(quantization, TowerSwitches(), schedule)


def make_fp8_linears(transformer: nn.Module, fp8: Fp8Linears) -> frozenset[str]:
    """Replace the linears `fp8` quantizes by `Fp8Linear`s on `meta` (the caller keeps their current values to
    quantize from); returns their module paths."""
    for path in fp8.quantization.layouts(transformer):
        linear = transformer.get_submodule(path)
        for name, param in list(linear.named_parameters(recurse=False)):
            # on meta first, so the FP8 module is built on meta too and allocates nothing
            linear._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
    apply_quantization(transformer, fp8.quantization, fp8.switches)
    return frozenset(fp8_linear_paths(transformer))
