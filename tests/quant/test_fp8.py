"""FP8 math: scales, rounding, the W8A16 and W8A8 linears."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cosmos3_offload.planning.memory import FP8_QUANTIZE_CHUNK_ROWS
from cosmos3_offload.quant import fp8
from cosmos3_offload.quant.fp8 import (
    FP8,
    FP8_MAX,
    QUANTIZE_CHUNK_ROWS,
    dequantize,
    quantize,
    w8a8_linear,
    w8a16_linear,
    weight_scales,
)


def weight(out_features: int = 48, in_features: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator) / in_features**0.5


def test_scales_map_each_rows_or_the_tensors_largest_magnitude_to_448():
    """Per channel: one scale per output row, amax/448; per tensor: one scalar; the largest value rounds to ±448."""
    w = weight()
    rows, whole = weight_scales(w, per_channel=True), weight_scales(w, per_channel=False)
    assert rows.shape == (48,) and whole.shape == () and rows.dtype == whole.dtype == torch.float32
    assert torch.allclose(rows, w.abs().amax(dim=1) / FP8_MAX) and torch.isclose(whole, w.abs().max() / FP8_MAX)
    stored = quantize(w, rows)
    assert stored.dtype == FP8 and torch.equal(stored.float().abs().amax(dim=1), torch.full((48,), FP8_MAX))


def test_quantization_saturates_and_survives_a_zero_row():
    """Values beyond the scale saturate at ±448 instead of overflowing; an all-zero row gets a usable scale."""
    w = weight()
    w[3] = 0
    scale = weight_scales(w, per_channel=True)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(dequantize(quantize(w, scale), scale, torch.float32)[3], torch.zeros(64))
    loud = quantize(w * 10, scale)  # ten times the range the scale was made for
    assert torch.isfinite(loud.float()).all() and loud.float().abs().max() == FP8_MAX


@pytest.mark.parametrize("per_channel", [True, False])
def test_dequantized_weights_are_within_fp8_rounding(per_channel):
    """e4m3 keeps 3 mantissa bits: every weight comes back within 1/16 of its magnitude (plus the subnormal floor)."""
    w = weight()
    scale = weight_scales(w, per_channel=per_channel)
    back = dequantize(quantize(w, scale), scale, torch.float32)
    floor = (scale.reshape(-1, 1) if per_channel else scale) * 2**-9
    assert ((back - w).abs() <= w.abs() / 16 + floor).all()


def test_w8a16_is_the_linear_of_the_dequantized_weight_in_the_inputs_dtype():
    """W8A16 is exactly F.linear with the weight cast to the inputs' dtype and scaled there (diffusers' W8A16)."""
    w, x, bias = weight(), torch.randn(5, 7, 64).bfloat16(), torch.randn(48).bfloat16()
    scale = weight_scales(w, per_channel=False)
    stored = quantize(w, scale)
    expected = F.linear(x, stored.to(torch.bfloat16) * scale.to(torch.bfloat16), bias)
    out = w8a16_linear(x, stored, scale, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 7, 48) and torch.equal(out, expected)


@pytest.mark.parametrize("static", [True, False])
def test_w8a8_rounds_the_inputs_to_fp8_too(static):
    """W8A8 equals the linear of FP8-rounded inputs (static scale or one per row) and close to full precision."""
    w, x = weight(), torch.randn(2, 9, 64)
    scale = weight_scales(w, per_channel=True)
    stored = quantize(w, scale)
    input_scale = x.abs().max() / FP8_MAX if static else None
    out = w8a8_linear(x, stored, scale, input_scale, None)
    flat = x.reshape(-1, 64)
    rows = input_scale if static else flat.abs().amax(dim=1, keepdim=True) / FP8_MAX
    rounded = (flat / rows).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * rows  # float32: rounded once
    expected = F.linear(rounded, dequantize(stored, scale, torch.float32)).view(2, 9, 48)
    assert out.shape == (2, 9, 48) and torch.allclose(out, expected, atol=1e-6)
    exact = F.linear(x, w)
    assert F.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.995
    assert not torch.equal(out, w8a16_linear(x, stored, scale, None))  # the inputs really were rounded


def test_the_planner_counts_the_chunk_the_unfused_quantization_scales():
    """The planner's FP8 working set assumes the chunk size the quantization really uses."""
    assert FP8_QUANTIZE_CHUNK_ROWS == QUANTIZE_CHUNK_ROWS


def test_chunked_activation_quantization_equals_the_whole_at_once():
    """Rows quantized a chunk at a time (static or per-row scales) equal quantizing them all at once."""
    x = torch.randn(fp8.QUANTIZE_CHUNK_ROWS * 2 + 5, 16).bfloat16()
    for scale in (x.abs().max().float() / FP8_MAX, None):
        chunked, scales = fp8.quantize_activations(x, scale)
        whole, whole_scales = fp8._fused_quantize(x, scale)
        assert torch.equal(chunked.view(torch.uint8), whole.view(torch.uint8)) and torch.equal(scales, whole_scales)
