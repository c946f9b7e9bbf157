"""Fused kernels: run uncompiled, each equals the diffusers module it replaces bit for bit, and so does
a whole fused decoder layer; compiled on the CPU it stays within a few roundings of eager and
compiles once for every token count and every layer."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_cosmos3 import Cosmos3NemotronRMSNorm, Cosmos3VLTextMLP
from joint_cases import joint_case
from tiny_models import relative_error, tiny_transformer

from cosmos3_offload.kernels import fused, fused_ops
from cosmos3_offload.kernels.choice import EAGER, Kernels
from cosmos3_offload.split import fused_layer
from cosmos3_offload.split.attend import apply_rotary, rotary_tables
from cosmos3_offload.split.denoise import denoise_branches, generator_layer
from cosmos3_offload.split.prefill import _reasoner_layer, prefill_prompts

FUSED = Kernels(fused=True)
DTYPES = [torch.float32, torch.bfloat16]
VARIANTS = ["qwen", "und_k_norm", "edge_relu2"]
HAS_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None
# Compiled vs eager in bf16. Pointwise kernels round exactly as eager; a compiled RMSNorm mean sums
# in another order (a last-bit float32 difference) that moves a rare output by one bf16 ulp (about
# 5e-5 of them at hidden 4096; without emulate_precision_casts, half of them).
MAX_FLIPPED = 0.01
# A layer's output: rare flipped inputs of its GEMMs and attention move many outputs by an ulp
# (2e-3 relative L2 at Nano size on the CPU); this bound catches wiring errors, not roundings.
LAYER_TOLERANCE = 2e-2


@pytest.fixture
def uncompiled(monkeypatch):
    """The fused functions run their plain eager math (COSMOS3_FUSED_EAGER=1)."""
    monkeypatch.setenv(fused.FORCE_EAGER_ENV, "1")


def randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def random_norm(cls: type, dim: int, dtype: torch.dtype) -> torch.nn.Module:
    norm = cls(dim, eps=1e-6) if cls is Cosmos3NemotronRMSNorm else cls(dim, eps=1e-6, elementwise_affine=True)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * randn(dim, dtype=torch.float32, seed=7))
    return norm.to(dtype)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("cls", [RMSNorm, Cosmos3NemotronRMSNorm])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_equals_diffusers_module(uncompiled, cls, dtype):
    """rms_norm and add_rms_norm give the diffusers norm's bits (casts in the same order)."""
    norm = random_norm(cls, 48, dtype)
    x, update = randn(37, 48, dtype=dtype, seed=1), randn(37, 48, dtype=dtype, seed=2)
    assert_bitwise(fused_layer.norm(norm, x), norm(x))
    weight, eps, nemotron = norm.weight, norm.eps, cls is Cosmos3NemotronRMSNorm
    total, normed = fused.add_rms_norm(x, update, weight, eps, float32_scale=nemotron)
    assert_bitwise(total, x + update)
    assert_bitwise(normed, norm(x + update))


def test_rms_norm_float32_weight_on_bf16_rows(uncompiled):
    """diffusers' RMSNorm with a float32 weight returns float32 for bf16 rows; so does rms_norm."""
    norm = random_norm(RMSNorm, 48, torch.float32)
    x = randn(5, 48, dtype=torch.bfloat16)
    assert_bitwise(fused_layer.norm(norm, x), norm(x))


@pytest.mark.parametrize("cls", [RMSNorm, Cosmos3NemotronRMSNorm, torch.nn.Identity])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_rotary_equals_qk_norm_then_rotary(uncompiled, cls, dtype):
    """norm_rotary gives apply_rotary(norm(x)) (the Cosmos3 processor's expression) bit for bit."""
    model = tiny_transformer()
    norm = torch.nn.Identity() if cls is torch.nn.Identity else random_norm(cls, 16, dtype)
    cos, sin = rotary_tables(model, torch.arange(3 * 29).view(3, 29), dtype)
    x = randn(29, 4, 16, dtype=dtype)
    assert_bitwise(fused_layer.norm_rotary(norm, x, cos, sin), apply_rotary(norm(x), cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_join_memory_equals_cat(uncompiled, dtype):
    """join_memory gives [memory ; rotary(norm(k))] and [memory ; v] as torch.cat does."""
    model = tiny_transformer()
    norm = random_norm(RMSNorm, 16, dtype)
    cos, sin = rotary_tables(model, torch.arange(3 * 11).view(3, 11), dtype)
    memory_key, memory_value = randn(6, 2, 16, dtype=dtype, seed=1), randn(6, 2, 16, dtype=dtype, seed=2)
    key, value = randn(11, 2, 16, dtype=dtype, seed=3), randn(11, 2, 16, dtype=dtype, seed=4)
    keys, values = fused_layer.join_memory(norm, memory_key, memory_value, key, value, cos, sin)
    assert_bitwise(keys, torch.cat([memory_key, apply_rotary(norm(key), cos, sin)]))
    assert_bitwise(values, torch.cat([memory_value, value]))


@pytest.mark.parametrize("act", ["silu", "relu2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_equals_diffusers_mlp(uncompiled, act, dtype):
    """The fused activation (silu(gate) * up, relu(up)^2) leaves the Cosmos3 MLP's output unchanged."""
    torch.manual_seed(0)
    mlp = Cosmos3VLTextMLP(32, 64, hidden_act=act).to(dtype)
    x = randn(13, 32, dtype=dtype)
    with torch.no_grad():
        assert_bitwise(fused_layer.mlp(mlp, x), mlp(x))


@pytest.mark.parametrize("chunk", [None, 5])
def test_residual_mlp_equals_eager_and_keeps_hidden(uncompiled, chunk):
    """h + mlp(norm(h)), h = hidden + update, equals the eager expression; `hidden` is not written."""
    torch.manual_seed(0)
    mlp = Cosmos3VLTextMLP(32, 64).to(torch.bfloat16)
    norm = random_norm(RMSNorm, 32, torch.bfloat16)
    hidden, update = randn(13, 32, dtype=torch.bfloat16, seed=1), randn(13, 32, dtype=torch.bfloat16, seed=2)
    before = hidden.clone()
    with torch.no_grad():
        expected = (hidden + update) + mlp(norm(hidden + update))
        actual = fused_layer.residual_mlp(norm, mlp, hidden, update.clone(), chunk)
    assert_bitwise(actual, expected)
    assert_bitwise(hidden, before)


def layer_inputs(model, dtype: torch.dtype, tokens: int = 24, prompt: int = 9, seed: int = 0):
    """Random hidden states, a prompt's memory K/V and mRoPE tables for one layer call."""
    config = model.config
    kv = (prompt, config.num_key_value_heads, config.head_dim)
    hidden = randn(tokens, config.hidden_size, dtype=dtype, seed=seed)
    memory = randn(*kv, dtype=dtype, seed=seed + 1), randn(*kv, dtype=dtype, seed=seed + 2)
    position_ids = torch.arange(prompt, prompt + tokens).expand(3, tokens)
    return hidden, memory, rotary_tables(model, position_ids, dtype)


def run_generator_layer(model, dtype, kernels, *, index=0, mlp_chunk=None, **shape):
    hidden, (memory_key, memory_value), (cos, sin) = layer_inputs(model, dtype, **shape)
    with torch.no_grad():
        return generator_layer(
            model.layers[index], hidden, memory_key, memory_value, cos, sin, mlp_chunk=mlp_chunk, kernels=kernels
        )


def run_reasoner_layer(model, dtype, kernels, *, with_output=True, tokens=17):
    hidden, _, (cos, sin) = layer_inputs(model, dtype, tokens=tokens)
    with torch.no_grad():
        return _reasoner_layer(model.layers[0], hidden, cos, sin, with_output=with_output, kernels=kernels)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mlp_chunk", [None, 7], ids=["whole", "chunked"])
def test_fused_generator_layer_equals_eager(uncompiled, variant, dtype, mlp_chunk):
    """generator_layer with Kernels(fused=True), uncompiled, gives EAGER's output bit for bit."""
    model = tiny_transformer(variant).to(dtype)
    expected = run_generator_layer(model, dtype, EAGER, mlp_chunk=mlp_chunk)
    assert_bitwise(run_generator_layer(model, dtype, FUSED, mlp_chunk=mlp_chunk), expected)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_output", [True, False], ids=["layer", "last"])
def test_fused_reasoner_layer_equals_eager(uncompiled, variant, dtype, with_output):
    """_reasoner_layer with Kernels(fused=True), uncompiled, gives EAGER's hidden, K and V bit for bit."""
    model = tiny_transformer(variant).to(dtype)
    expected = run_reasoner_layer(model, dtype, EAGER, with_output=with_output)
    for actual, reference in zip(run_reasoner_layer(model, dtype, FUSED, with_output=with_output), expected):
        assert_bitwise(actual, reference)


def test_fused_prefill_and_denoise_equal_eager(uncompiled, pipeline, monkeypatch):
    """prefill_prompts + denoise_branches with Kernels(fused=True), uncompiled, give EAGER's velocity bit
    for bit, and the choice reaches every layer of both towers."""
    model, case = pipeline.transformer, joint_case(pipeline, "a dog", 5)
    calls = []
    spied = fused.add_rms_norm
    monkeypatch.setattr(fused, "add_rms_norm", lambda *a, **k: calls.append(a[0].shape[0]) or spied(*a, **k))

    def velocity(kernels: Kernels) -> torch.Tensor:
        prompt = (case.packed["input_ids"], case.packed["text_mrope_ids"])
        memory = prefill_prompts(model, [prompt], kernels=kernels)[0]
        return denoise_branches(model, [(case.layout, memory)], case.inputs, mlp_chunk=64, kernels=kernels)[0].vision

    assert_bitwise(velocity(FUSED), velocity(EAGER))
    # The reasoner's first layer (the last one skips its MLP), then 2 generator layers x 2 chunks.
    prompt_tokens, generator_tokens = case.layout.prompt_tokens, case.layout.tokens
    assert generator_tokens == 120
    assert calls == [prompt_tokens] + [64, 56] * 2


def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    """When torch.compile fails, the eager math runs and one warning says so."""
    monkeypatch.delenv(fused.FORCE_EAGER_ENV, raising=False)
    monkeypatch.setattr(fused._clock, "failed", False)

    def broken(fn, **options):
        def run(*args, **kwargs):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(fused.torch, "compile", broken)
    silu_mul = fused._LazilyCompiled(fused_ops.silu_mul)
    gate, up = randn(4, 8, dtype=torch.float32, seed=1), randn(4, 8, dtype=torch.float32, seed=2)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        first, second = silu_mul(gate, up), silu_mul(gate, up)
    assert_bitwise(first, fused_ops.silu_mul(gate, up))
    assert_bitwise(second, first)
    assert len(caplog.records) == 1 and "no compiler here" in caplog.records[0].getMessage()


needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="torch.compile's CPU backend needs a C++ compiler (g++)")


def assert_one_ulp_apart_at_most(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16: at most MAX_FLIPPED of the elements differ, each by one ulp at most."""
    assert actual.dtype == expected.dtype == torch.bfloat16 and actual.shape == expected.shape
    differ = actual != expected
    assert differ.float().mean().item() <= MAX_FLIPPED
    ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs()  # spacing is eps x |x| or finer
    assert bool(((actual.float() - expected.float()).abs() <= ulp)[differ].all())


@needs_cxx
def test_compiled_ops_round_as_eager(monkeypatch):
    """Compiled on the CPU in bf16 (the tiny model's sizes, so the layer tests reuse these kernels),
    pointwise functions equal their eager math and norms differ by a rare one-ulp flip at most."""
    monkeypatch.delenv(fused.FORCE_EAGER_ENV, raising=False)
    bf16, tokens = torch.bfloat16, 300
    x, update = randn(tokens, 64, dtype=bf16, seed=1), randn(tokens, 64, dtype=bf16, seed=2)
    weight, head_weight = 1 + 0.2 * randn(64, dtype=bf16, seed=3), 1 + 0.2 * randn(16, dtype=bf16, seed=4)
    q = randn(tokens, 4, 16, dtype=bf16, seed=5)
    k, v = randn(tokens, 2, 16, dtype=bf16, seed=6), randn(tokens, 2, 16, dtype=bf16, seed=7)
    memory_key, memory_value = randn(40, 2, 16, dtype=bf16, seed=9), randn(40, 2, 16, dtype=bf16, seed=10)
    cos, sin = rotary_tables(tiny_transformer(), torch.arange(3 * tokens).view(3, tokens), bf16)
    gate, up = randn(tokens, 128, dtype=bf16, seed=11), randn(tokens, 128, dtype=bf16, seed=12)
    with torch.no_grad():
        assert_bitwise(fused.silu_mul(gate, up), fused_ops.silu_mul(gate, up))
        assert_one_ulp_apart_at_most(fused.rms_norm(x, weight, 1e-6), fused_ops.rms_norm(x, weight, 1e-6))
        total, normed = fused.add_rms_norm(x, update, weight, 1e-6)
        assert_bitwise(total, x + update)
        assert_one_ulp_apart_at_most(normed, fused_ops.rms_norm(x + update, weight, 1e-6))
        rotated = fused_ops.norm_rotary(q, head_weight, 1e-6, cos, sin)
        assert_one_ulp_apart_at_most(fused.norm_rotary(q, head_weight, 1e-6, cos, sin), rotated)
        keys, values = fused.prepend_keys_values(memory_key, memory_value, k, v, head_weight, 1e-6, cos, sin)
        expected_keys, expected_values = fused_ops.prepend_keys_values(
            memory_key, memory_value, k, v, head_weight, 1e-6, cos, sin
        )
        assert_one_ulp_apart_at_most(keys, expected_keys)
        assert_bitwise(values, expected_values)


@needs_cxx
def test_compiled_layers_match_eager(monkeypatch):
    """Compiled on the CPU, the fused bf16 generator and reasoner layers stay within a few propagated
    roundings of EAGER. One variant: compiling is the slow part."""
    monkeypatch.delenv(fused.FORCE_EAGER_ENV, raising=False)
    dtype = torch.bfloat16
    model = tiny_transformer("qwen").to(dtype)
    generator = run_generator_layer(model, dtype, FUSED)
    assert generator.dtype == dtype
    assert relative_error(generator, run_generator_layer(model, dtype, EAGER)) <= LAYER_TOLERANCE
    for actual, expected in zip(run_reasoner_layer(model, dtype, FUSED), run_reasoner_layer(model, dtype, EAGER)):
        assert relative_error(actual, expected) <= LAYER_TOLERANCE
    assert not fused.compile_failed()


@needs_cxx
def test_compiled_layer_compiles_once_for_all_token_counts_and_layers(monkeypatch):
    """After one generator layer call, other token counts, prompt lengths, MLP chunks and another layer's
    weights reuse the compiled kernels: no recompilation."""
    monkeypatch.delenv(fused.FORCE_EAGER_ENV, raising=False)
    model = tiny_transformer().to(torch.bfloat16)
    run_generator_layer(model, torch.bfloat16, FUSED, tokens=24, prompt=9)
    compiled = fused.compile_count()
    assert compiled > 0 and fused.compile_seconds() > 0
    run_generator_layer(model, torch.bfloat16, FUSED, tokens=40, prompt=5, index=1)
    run_generator_layer(model, torch.bfloat16, FUSED, tokens=31, prompt=12, mlp_chunk=8)
    assert fused.compile_count() == compiled
