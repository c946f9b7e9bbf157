"""FP8 (e4m3) weights and activations: quantize, dequantize, and the two ways to run a linear layer.

A weight is stored as float8_e4m3fn with a float32 scale: `weight ≈ fp8 * scale`, the scale one
scalar (per tensor) or one per output row (per channel), `amax / 448`.

- W8A16: the weight is dequantized to the activations' dtype as it is used and the GEMM runs in
  that dtype (`dense = fp8.to(dtype) * scale.to(dtype)`, then `F.linear`).
- W8A8: the activations are quantized too, with a static scale from the checkpoint (ModelOpt's
  calibrated `input_scale`) or, without one, a dynamic scale per row; the GEMM then runs on FP8
  tensor cores (`torch._scaled_mm`) where the device has them (compute capability 8.9 and up), and
  is emulated elsewhere: the same quantized values, dequantized, in a GEMM of the activations' dtype.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .. import caches
from ..errors import first_line

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_SCALE = 1e-12  # an all-zero weight or row still gets a usable scale
QUANTIZE_CHUNK_ROWS = 4096  # rows of activations scaled at a time without a fused kernel
_GEMM_MULTIPLE = 16  # _scaled_mm needs both matrix dimensions of the weight divisible by 16


def weight_scales(weight: torch.Tensor, *, per_channel: bool) -> torch.Tensor:
    """float32 scales of `weight` [out, in]: [out] per channel, [] per tensor (amax / 448)."""
    magnitude = weight.abs()
    amax = magnitude.amax(dim=1) if per_channel else magnitude.amax()
    return (amax.float() / FP8_MAX).clamp_min(MIN_SCALE)


def quantize(value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`value / scale` saturated to ±448 and rounded to e4m3; a [out] scale divides each row."""
    scale = _rows(scale, value)
    return (value.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`: both factors cast to `dtype` first, then multiplied (as diffusers' W8A16),
    in place, so a weight costs one temporary of its size in `dtype`."""
    return stored.to(dtype).mul_(_rows(scale, stored).to(dtype))


def w8a16_linear(
    inputs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`inputs @ dequantize(weight).T + bias` in the inputs' dtype."""
    return F.linear(inputs, dequantize(weight, weight_scale, inputs.dtype), bias)


def w8a8_linear(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The linear layer with both operands in FP8; `input_scale` None: a dynamic scale per row."""
    flat = inputs.reshape(-1, inputs.shape[-1])  # [tokens, in]
    quantized, input_scale = quantize_activations(flat, input_scale)
    if _runs_on_fp8_cores(weight):
        out = _scaled_matmul(quantized, weight, input_scale, weight_scale, inputs.dtype)
    else:
        dense_inputs = quantized.to(inputs.dtype) * input_scale.to(inputs.dtype)
        out = F.linear(dense_inputs, dequantize(weight, weight_scale, inputs.dtype))
    if bias is not None:
        out = out + bias
    return out.view(*inputs.shape[:-1], weight.shape[0])


def quantize_activations(flat: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[tokens, in] -> (FP8 [tokens, in], its scale: the static scalar, or [tokens, 1] amax / 448).

    On a GPU one fused kernel (torch.compile) reads the activations once and writes one byte an
    element; elsewhere, or when compiling fails, rows are quantized a chunk at a time, so the
    float32 copy is never larger than a chunk. Both divide in float32, saturate at ±448 and round
    to e4m3 once (so the two give the same bytes).
    """
    if flat.is_cuda and (compiled := _compiled_quantizer()) is not None:
        return compiled(flat, scale)
    out = torch.empty(flat.shape, dtype=FP8, device=flat.device)
    scales = torch.empty(flat.shape[0], 1, dtype=torch.float32, device=flat.device) if scale is None else scale
    for start in range(0, flat.shape[0], QUANTIZE_CHUNK_ROWS):
        rows = flat[start : start + QUANTIZE_CHUNK_ROWS]
        if scale is None:
            scales[start : start + rows.shape[0]] = _row_scales(rows)
        row_scale = scales[start : start + rows.shape[0]] if scale is None else scale
        out[start : start + rows.shape[0]].copy_((rows.float() / row_scale).clamp_(-FP8_MAX, FP8_MAX))
    return out, scales


def _row_scales(rows: torch.Tensor) -> torch.Tensor:
    return (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(MIN_SCALE)  # [rows, 1]


def _fused_quantize(flat: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if scale is None:
        scale = _row_scales(flat)
    return (flat.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.cache
def _compiled_quantizer():
    """`_fused_quantize` compiled for the GPU once per process, with Inductor's cache kept across
    processes (caches.py); None where torch.compile cannot run."""
    caches.use_persistent_compile_cache()
    try:
        return caches.run_compiled(_compile_quantizer)
    except Exception as error:  # no triton, no compiler: the chunked path does the same math
        logger.warning("FP8 activations are quantized unfused (torch.compile failed: %s)", first_line(error))
        return None


def _compile_quantizer():
    compiled = torch.compile(_fused_quantize, dynamic=True)
    probe = torch.ones(32, 32, device="cuda", dtype=torch.bfloat16)
    compiled(probe, None)
    compiled(probe, torch.ones((), device="cuda"))
    return compiled


def has_fp8_matmul(device: torch.device) -> bool:
    """Whether `device` runs FP8 GEMMs on tensor cores (CUDA compute capability 8.9 and up)."""
    return device.type == "cuda" and _capability(device.index) >= (8, 9)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    """Asked once per device: every W8A8 linear call wants to know."""
    return torch.cuda.get_device_capability(index)


def _runs_on_fp8_cores(weight: torch.Tensor) -> bool:
    out_features, in_features = weight.shape
    aligned = out_features % _GEMM_MULTIPLE == 0 and in_features % _GEMM_MULTIPLE == 0
    return aligned and has_fp8_matmul(weight.device)


def _scaled_matmul(
    quantized: torch.Tensor,
    weight: torch.Tensor,
    input_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[tokens, in] x [out, in]^T on FP8 tensor cores. Both scales scalar: tensorwise; otherwise
    rowwise, which needs a [tokens, 1] input scale and a [1, out] weight scale."""
    scale_a, scale_b = input_scale.float(), weight_scale.float()
    if scale_a.numel() != 1 or scale_b.numel() != 1:
        scale_a = scale_a.reshape(-1, 1).expand(quantized.shape[0], 1).contiguous()
        scale_b = scale_b.reshape(1, -1).expand(1, weight.shape[0]).contiguous()
    else:
        scale_a, scale_b = scale_a.reshape(()), scale_b.reshape(())
    return torch._scaled_mm(quantized, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=dtype)


def _rows(scale: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """A per-row scale shaped to broadcast over `matrix`'s rows; a scalar one as it is."""
    return scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
