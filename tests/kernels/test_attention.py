"""The attention registry: every implementation honours `AttentionFn`'s contract (GQA, causal at the
top left), "sdpa" is diffusers' dispatcher call exactly, and a name that cannot run says why."""

from __future__ import annotations

import pytest
import torch
from tiny_models import relative_error, tiny_transformer

from cosmos3_offload.errors import InputError
from cosmos3_offload.kernels import attention as attention_module
from cosmos3_offload.kernels.attention import (
    ATTENTION_BACKENDS,
    attention_spec,
    available_attention,
    flash_attn_4_attention,
    flash_attn_4_problem,
    sdpa_attention,
)
from cosmos3_offload.kernels.choice import Kernels
from cosmos3_offload.split.attend import attend

CPU = torch.device("cpu")
ON_CPU = [name for name, spec in ATTENTION_BACKENDS.items() if spec.unavailable_reason(CPU, torch.bfloat16) is None]
GPU_ONLY = [name for name in ATTENTION_BACKENDS if name not in ON_CPU]
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 32
BF16_TOLERANCE = 1e-2  # relative L2 error: a few bf16 roundings (unit roundoff 2**-8)


def gqa_inputs(queries: int, keys: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """q [queries, heads, head_dim], k/v [keys, kv_heads, head_dim]."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(queries, HEADS, HEAD_DIM, generator=generator)
    k, v = (torch.randn(keys, KV_HEADS, HEAD_DIM, generator=generator) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_cpu_runs_sdpa_and_math_only():
    """On the CPU, exactly torch's own SDPA and its math kernel are available; the rest need a GPU."""
    assert ON_CPU == ["sdpa", "math"]


@pytest.mark.parametrize("name", ON_CPU)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_backends_equal_math_on_gqa_inputs(name, causal):
    """Each CPU implementation gives SDPA math's GQA attention (run in float64) within a few bf16
    roundings in bf16, and within float32 rounding in float32."""
    keys = 77 if causal else 131
    q, k, v = gqa_inputs(77, keys, torch.float64)
    exact = attention_spec("math").run(q, k, v, causal=causal)
    run = ATTENTION_BACKENDS[name].run
    assert relative_error(run(*(x.bfloat16() for x in (q, k, v)), causal=causal), exact) < BF16_TOLERANCE
    assert relative_error(run(*(x.float() for x in (q, k, v)), causal=causal), exact) < 1e-6


def test_gqa_query_heads_share_kv_heads_in_groups():
    """Query heads 0..3 read kv head 0 and 4..7 kv head 1 (contiguous groups, as repeat_interleave)."""
    q, k, v = gqa_inputs(5, 9, torch.float32)
    out = sdpa_attention(q, k, v, causal=False)
    expanded = sdpa_attention(q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), causal=False)
    torch.testing.assert_close(out, expanded)
    assert out.shape == (5, HEADS, HEAD_DIM)


@pytest.mark.parametrize("name", ON_CPU)
def test_causal_mask_is_aligned_at_the_top_left(name):
    """With 3 queries and 5 keys, query 0 sees only key 0, so its output is that key's value."""
    q, k, v = gqa_inputs(3, 5, torch.float32)
    out = ATTENTION_BACKENDS[name].run(q, k, v, causal=True)
    torch.testing.assert_close(out[0], v[0].repeat_interleave(HEADS // KV_HEADS, dim=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_is_diffusers_dispatcher_bit_for_bit(dtype, causal):
    """`attend` with "sdpa" gives exactly what it gives through diffusers' dispatcher (EAGER) on the CPU."""
    model = tiny_transformer()
    attn, config = model.layers[0].self_attn, model.config
    generator = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = torch.randn(23, heads, head_dim, generator=generator).to(dtype)
    keys = 23 if causal else 41
    k, v = (torch.randn(keys, kv_heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    sdpa = Kernels(attention=attention_spec("sdpa").run, attention_name="sdpa")
    assert torch.equal(attend(attn, q, k, v, causal=causal, kernels=sdpa), attend(attn, q, k, v, causal=causal))


def test_unknown_name_lists_the_choices():
    """A name that is not registered is refused with every registered name in the message."""
    with pytest.raises(InputError, match="unknown attention 'flash3'") as error:
        attention_spec("flash3")
    assert all(name in str(error.value) for name in ATTENTION_BACKENDS)


@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_only_backend_on_cpu_says_why_in_one_line(name):
    """cudnn, flash, efficient and flash-attn-4 on the CPU: an InputError naming the device, one line."""
    with pytest.raises(InputError, match="runs on CUDA GPUs only and this run is on cpu") as error:
        available_attention(name, CPU, torch.bfloat16)
    assert "\n" not in str(error.value) and name in str(error.value)


def test_half_only_backend_refuses_float32():
    """The fused GPU kernels run in bf16/fp16 only; float32 is refused with that reason."""
    reason = ATTENTION_BACKENDS["flash"].unavailable_reason(CPU, torch.float32)
    assert reason == "it runs in bfloat16/float16 only, not float32"


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch believes there is a CUDA device of the capability the test sets (no kernel runs)."""
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return capability


def test_flash_attn_4_needs_hopper_or_newer(fake_gpu):
    """On compute capability 8.0 flash-attn-4 is refused with the capability it needs and the GPU's."""
    fake_gpu[0] = (8, 0)
    reason = ATTENTION_BACKENDS["flash-attn-4"].unavailable_reason(torch.device("cuda"), torch.bfloat16)
    assert reason == "it needs a GPU of compute capability 9.0 to 12.9 and Fake GPU is 8.0"


@pytest.mark.skipif(flash_attn_4_problem() is None, reason="flash-attn-4 is installed here")
def test_flash_attn_4_without_its_package_says_how_to_install(fake_gpu):
    """On a Hopper GPU without flash-attn-4 installed, the reason is the import error and the pip command."""
    reason = ATTENTION_BACKENDS["flash-attn-4"].unavailable_reason(torch.device("cuda"), torch.bfloat16)
    assert reason.startswith("flash_attn.cute cannot be imported (ModuleNotFoundError")
    assert reason.endswith("install it: pip install flash-attn-4")


def test_flash_attn_4_adapter_passes_its_layout_and_unpacks_out(monkeypatch):
    """The adapter hands flash_attn_func [1, tokens, heads, head_dim] tensors and returns its `out` unbatched."""
    calls = []

    def fake_flash_attn_func(q, k, v, causal=False):  # flash-attn-4's layout and (out, lse) result
        calls.append((q.shape, k.shape, causal))
        out = sdpa_attention(q.squeeze(0), k.squeeze(0), v.squeeze(0), causal=causal).unsqueeze(0)
        return out, None

    monkeypatch.setattr(attention_module, "_flash_attn_4_func", lambda: fake_flash_attn_func)
    q, k, v = gqa_inputs(6, 6, torch.float32)
    out = flash_attn_4_attention(q, k, v, causal=True)
    assert calls == [((1, 6, HEADS, HEAD_DIM), (1, 6, KV_HEADS, HEAD_DIM), True)]
    torch.testing.assert_close(out, sdpa_attention(q, k, v, causal=True))


def test_flash_attn_4_refuses_causal_with_unequal_lengths():
    """Its causal mask sits at the bottom right, so causal attention with q_tokens != kv_tokens is refused."""
    q, k, v = gqa_inputs(3, 5, torch.bfloat16)
    with pytest.raises(AssertionError, match="bottom right"):
        flash_attn_4_attention(q, k, v, causal=True)
