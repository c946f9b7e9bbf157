"""The planner's step-time model: attention at the request's probed rate, GEMMs at the linear rate, and
the memory-bound elementwise kernels (norms, rotary, the K/V join, the MLP gate, residual adds)."""

from __future__ import annotations

import dataclasses

import pytest

from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.planning.request import DeviceProfile, Request
from cosmos3_offload.planning.timing import (
    FP8_LINEAR_SPEEDUP,
    ELEMENTWISE_GBps,
    elementwise_bytes_per_token,
    layer_seconds,
    times,
)

NANO = model_spec("nano")
SIZES = model_sizes(NANO.transformer, NANO.vae, dtype_bytes=2)
PROFILE = DeviceProfile(linear_TFLOPs=800.0, attention_TFLOPs=600.0, h2d_GBps=50.0)


def test_elementwise_bytes_count_each_fused_kernel_of_a_nano_layer():
    """Nano (hidden 4096, 32/8 heads of 128, SwiGLU 12288), bf16: input norm 2h, query norm + rotary 2 x 4096,
    K/V join 4 x 1024, residual add + norm 4h, SiLU gate 3 x 12288, MLP residual add 3h elements."""
    h = 4096
    expected = (2 * h + 2 * 4096 + 4 * 1024 + 4 * h + 3 * 12288 + 3 * h) * 2
    assert elementwise_bytes_per_token(SIZES) == expected == 172032


def test_relu2_mlp_moves_one_intermediate_less():
    """Edge's relu^2 MLP reads and writes its up projection only: one intermediate row less than SwiGLU's."""
    edge = model_spec("edge")
    sizes = model_sizes(edge.transformer, edge.vae, dtype_bytes=2)
    swiglu_like = dataclasses.replace(sizes, mlp_mats=3)
    assert elementwise_bytes_per_token(swiglu_like) - elementwise_bytes_per_token(sizes) == sizes.intermediate * 2


def test_a_layer_is_its_gemms_its_attention_and_its_elementwise_kernels():
    """720p x 189f, two branches: each term over its own rate, summed per branch."""
    request = Request.for_video(189, 720, 1280)
    tokens, keys = request.tokens, request.tokens + request.prompt_tokens
    linear = 2 * tokens * SIZES.layer_matmul_params / 800e12
    attention = 4 * tokens * keys * SIZES.heads * SIZES.head_dim / 600e12
    elementwise = tokens * elementwise_bytes_per_token(SIZES) / (ELEMENTWISE_GBps * 1e9)
    assert layer_seconds(SIZES, request, PROFILE, tokens) == pytest.approx(2 * (linear + attention + elementwise))
    assert times(Plan(), SIZES, request, PROFILE).step == pytest.approx(
        SIZES.layers * 2 * (linear + attention + elementwise)
    )


def test_fp8_linears_shorten_only_the_gemm_term():
    """FP8 weights run the GEMMs FP8_LINEAR_SPEEDUP faster; attention and the elementwise kernels stay."""
    request = Request.for_video(189, 720, 1280)
    fp8 = dataclasses.replace(SIZES, fp8=True)
    linear = 2 * request.tokens * SIZES.layer_matmul_params / 800e12
    saved = layer_seconds(SIZES, request, PROFILE, request.tokens) - layer_seconds(
        fp8, request, PROFILE, request.tokens
    )
    assert saved == pytest.approx(2 * linear * (1 - 1 / FP8_LINEAR_SPEEDUP))
