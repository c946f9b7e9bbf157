"""The planner's device profile: measured rates of the attention the run uses, the built-in rates
on a CPU, and a `source` that says which."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosmos3_offload.app import device_profile as device_profile_module
from cosmos3_offload.app.device_profile import device_profile, device_setup, probe_shape
from cosmos3_offload.errors import InputError
from cosmos3_offload.kernels.choice import EAGER
from cosmos3_offload.kernels.probe import KernelRates, Measurements, ProbeKey
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.model.specs import model_spec
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.planning.request import DeviceProfile, Request
from cosmos3_offload.planning.search import predict

CPU = torch.device("cpu")
NANO = model_spec("nano")
SHAPE = probe_shape(NANO.transformer)
KEY = ProbeKey(gpu="NVIDIA H200", capability=(9, 0), torch="2.11.0+cu130", flash_attn_4="4.0.0b36", shape=SHAPE)
MEASURED = Measurements(
    attention_TFLOPs={"flash-attn-4": 680.0, "cudnn": 590.0, "sdpa": 585.0, "math": 30.0},
    error_ratios={"flash-attn-4": 1.4, "cudnn": 1.3, "sdpa": 1.3, "math": 1.0},
    rejected={},
    linear_TFLOPs=720.0,
)
CACHE = Path("/cache/kernel-rates-nvidia-h200-sm90-h32-kv8-d128.json")


def rates(**provenance) -> KernelRates:
    fields = {"date": "2026-11-27", "from_cache": True, "cache_path": CACHE} | provenance
    return KernelRates(key=KEY, measured=MEASURED, **fields)


def test_probe_shape_reads_the_model_config():
    """Nano probes 32/8 heads of 128 and its MLP's up projection, 4096 -> 12288."""
    shape = probe_shape(NANO.transformer)
    assert (shape.heads, shape.kv_heads, shape.head_dim) == (32, 8, 128)
    assert (shape.gemm_in, shape.gemm_out) == (4096, 12288)


def test_cpu_profile_is_built_in_and_says_so():
    """Without a GPU the built-in H200 rates stand, and the source says nothing was measured."""
    profile = device_profile(CPU, rates=None, attention="diffusers")
    built_in = DeviceProfile()
    assert (profile.linear_TFLOPs, profile.attention_TFLOPs, profile.h2d_GBps) == (
        built_in.linear_TFLOPs,
        built_in.attention_TFLOPs,
        built_in.h2d_GBps,
    )
    assert profile.source == "built-in H200 rates (2026-11-26): no GPU here to measure; host-to-device built-in"


def test_given_bandwidth_is_used_and_named():
    """--h2d-gbps wins over any measurement, and the source says it was given."""
    profile = device_profile(CPU, rates=None, attention="diffusers", h2d_GBps=25.0)
    assert profile.h2d_GBps == 25.0 and profile.source.endswith("host-to-device given")


@pytest.mark.parametrize("attention", ["flash-attn-4", "cudnn", "math"])
def test_attention_rate_is_the_chosen_implementations(attention):
    """The profile's attention rate is the one measured for the implementation the run uses."""
    profile = device_profile(CPU, rates=rates(), attention=attention, h2d_GBps=50.0)
    assert profile.attention_TFLOPs == MEASURED.attention_TFLOPs[attention]
    assert profile.linear_TFLOPs == 720.0


def test_diffusers_dispatcher_has_torch_sdpa_rate():
    """diffusers' default dispatcher backend runs torch's SDPA: its measured rate is used."""
    assert device_profile(CPU, rates=rates(), attention="diffusers", h2d_GBps=50.0).attention_TFLOPs == 585.0


def test_source_names_the_gpu_and_the_cache_file():
    """Rates read from the cache name the GPU, the date and the file; fresh ones say measured now."""
    cached = device_profile(CPU, rates=rates(), attention="flash-attn-4", h2d_GBps=50.0).source
    assert cached == (
        f"NVIDIA H200 (compute 9.0), measured 2026-11-27, read from {CACHE}: "
        "linear 720, attention flash-attn-4 680 TFLOP/s; host-to-device given"
    )
    fresh = device_profile(CPU, rates=rates(from_cache=False), attention="cudnn", h2d_GBps=50.0).source
    assert fresh.startswith(f"NVIDIA H200 (compute 9.0), measured now, saved to {CACHE}: ")
    unsaved = device_profile(CPU, rates=rates(from_cache=False, cache_path=None), attention="cudnn", h2d_GBps=50.0)
    assert "measured now (not cached" in unsaved.source


def test_faster_measured_attention_shortens_the_planned_step():
    """The planner's step time follows the measured attention rate of the chosen implementation."""
    sizes = model_sizes(NANO.transformer, NANO.vae)
    request = Request.for_video(189, 720, 1280)
    fast = device_profile(CPU, rates=rates(), attention="flash-attn-4", h2d_GBps=50.0)
    slow = device_profile(CPU, rates=rates(), attention="math", h2d_GBps=50.0)
    assert predict(Plan(), sizes, request, fast).times.step < predict(Plan(), sizes, request, slow).times.step


def test_cpu_setup_keeps_diffusers_attention_and_built_in_rates(tmp_path):
    """`device_setup` on a CPU: no probe, "auto" is diffusers' dispatcher, the profile is built in."""
    setup = device_setup(CPU, attention="auto", shape=SHAPE, dtype=torch.float32, folder=tmp_path)
    assert setup.kernels == EAGER and setup.rates is None
    assert setup.profile.source.startswith("built-in H200 rates")
    assert list(tmp_path.iterdir()) == []


def test_unknown_attention_is_refused_before_anything_is_measured(monkeypatch):
    """A typo in --attention fails before the probe (or any copy) runs."""

    def tripwire(*args, **kwargs):
        raise AssertionError("measured before the attention name was checked")

    monkeypatch.setattr(device_profile_module, "kernel_rates", tripwire)
    monkeypatch.setattr(device_profile_module, "measure_h2d_GBps", tripwire)
    with pytest.raises(InputError, match="unknown attention 'flashattn'"):
        device_setup(CPU, attention="flashattn", shape=SHAPE, dtype=torch.bfloat16)


def test_probe_shape_follows_the_request():
    """With a request the probe times its attention (generator tokens x those plus the prompt's) and GEMMs
    at its rows (each at most MAX_PROBE_TOKENS, the prompt's keys kept): the planner's rates are the step's."""
    request = Request.for_video(189, 720, 1280, prompt_tokens=300)
    shape = probe_shape(NANO.transformer, request)
    assert (shape.queries, shape.keys) == (44160, 44460)
    assert shape.gemm_tokens == 44160 and (shape.heads, shape.kv_heads, shape.head_dim) == (32, 8, 128)
    small = probe_shape(NANO.transformer, Request.for_video(93, 480, 832))
    assert (small.queries, small.keys) == (9360, 9360 + 512)  # 9872: not a multiple of 64
    aligned = probe_shape(NANO.transformer, Request.for_video(189, 720, 1280))  # 44160 + 512 = 698 tiles of 64
    assert (aligned.queries, aligned.keys) == (44160, 44673)
    huge = probe_shape(NANO.transformer, Request(tokens=200_000, prompt_tokens=300))
    most = device_profile_module.MAX_PROBE_TOKENS
    assert (huge.queries, huge.keys, huge.gemm_tokens) == (most, most + 300, most)
