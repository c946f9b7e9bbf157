"""The kernel probe: exactness rejects a wrong attention, the fastest exact one is chosen, and the
rates are cached per key, measured again when the cache is corrupt or stale, never fatal to save."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from cosmos3_offload.errors import InputError
from cosmos3_offload.kernels.attention import ATTENTION_BACKENDS, AttentionSpec, sdpa_attention
from cosmos3_offload.kernels.choice import EAGER
from cosmos3_offload.kernels.probe import (
    ATTENTION_CHOICES,
    KernelRates,
    Measurements,
    ProbeKey,
    ProbeShape,
    cache_dir,
    cached_rates,
    choose_attention,
    kernel_rates,
    measure_rates,
    warm_up,
)

CPU = torch.device("cpu")
# Small enough for the CPU; GQA with 4 query heads per kv head, tails that fit no 64-token tile.
SHAPE = ProbeShape(
    heads=8,
    kv_heads=2,
    head_dim=32,
    queries=96,
    keys=160,
    check_queries=70,
    check_keys=133,
    gemm_tokens=64,
    gemm_in=32,
    gemm_out=48,
)
KEY = ProbeKey(gpu="Fake GPU 80GB", capability=(9, 0), torch="2.13.0", flash_attn_4=None, shape=SHAPE)
MEASURED = Measurements(
    attention_TFLOPs={"cudnn": 600.0, "sdpa": 590.0, "math": 20.0},
    error_ratios={"cudnn": 1.3, "sdpa": 1.3, "math": 1.0, "flash": 9.0},
    rejected={"flash": "inexact: error 9x", "flash-attn-4": "unavailable: not installed"},
    linear_TFLOPs=700.0,
)


def fake_timer(seconds: dict[str, float]):
    """A timer that runs each kernel once (so it must work) and reports the given seconds."""

    def timer(name, run):
        run()
        return seconds.get(name, 1.0)

    return timer


def spec(name: str, run) -> AttentionSpec:
    return AttentionSpec(name=name, run=run, dtypes=frozenset({torch.bfloat16}), cpu=True)


def wrong_scale(q, k, v, *, causal):
    """Softmax scale 1% too large: a subtle bug."""
    q4, k4, v4 = (x.unsqueeze(0).transpose(1, 2) for x in (q, k, v))
    scale = 1.01 / q.shape[-1] ** 0.5
    out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).squeeze(0)


def wrong_gqa(q, k, v, *, causal):
    """kv heads tiled (repeat) where GQA groups them (repeat_interleave)."""
    group = q.shape[1] // k.shape[1]
    return sdpa_attention(q, k.repeat(1, group, 1), v.repeat(1, group, 1), causal=causal)


def ignores_causal(q, k, v, *, causal):
    return sdpa_attention(q, k, v, causal=False)


def no_kernel(q, k, v, *, causal):
    raise RuntimeError("No available kernel. Aborting execution.")


GOOD = {"sdpa": ATTENTION_BACKENDS["sdpa"], "math": ATTENTION_BACKENDS["math"]}


@pytest.mark.parametrize("wrong", [wrong_scale, wrong_gqa, ignores_causal], ids=lambda f: f.__name__)
def test_exactness_check_rejects_a_wrong_attention(wrong):
    """A subtly wrong attention is dropped as inexact, however fast, and is neither measured nor chosen."""
    backends = {**GOOD, "wrong": spec("wrong", wrong)}
    measured = measure_rates(CPU, SHAPE, backends=backends, timer=fake_timer({"sdpa": 2.0, "math": 3.0, "wrong": 1.0}))
    assert measured.rejected["wrong"].startswith("inexact: error ")
    assert measured.error_ratios["wrong"] > 4 and "wrong" not in measured.attention_TFLOPs
    assert measured.best_attention == "sdpa"


def test_exact_attentions_pass_and_the_fastest_is_best():
    """torch's SDPA and math both pass the check on CPU; the faster one is best, math's error ratio is 1."""
    backends = {**GOOD, "sdpa-copy": spec("sdpa-copy", sdpa_attention)}
    timings = {"sdpa": 2.0, "math": 3.0, "sdpa-copy": 1.0, "linear": 0.5}
    measured = measure_rates(CPU, SHAPE, backends=backends, timer=fake_timer(timings))
    assert measured.rejected == {}
    assert measured.error_ratios["math"] == 1.0 and measured.error_ratios["sdpa"] <= 4
    assert measured.best_attention == "sdpa-copy"
    rates = measured.attention_TFLOPs
    assert rates["sdpa-copy"] == pytest.approx(2 * rates["sdpa"])
    assert rates["sdpa"] == pytest.approx(1.5 * rates["math"])


def test_failing_attention_is_dropped_with_its_error():
    """An implementation that raises (no kernel for this layout) is rejected with the error, not fatal."""
    backends = {**GOOD, "broken": spec("broken", no_kernel)}
    measured = measure_rates(CPU, SHAPE, backends=backends, timer=fake_timer({"sdpa": 2.0, "math": 3.0}))
    assert measured.rejected == {"broken": "failed: RuntimeError: No available kernel. Aborting execution."}
    assert "broken" not in measured.error_ratios


def test_registry_on_cpu_checks_sdpa_and_math_and_records_why_others_are_not():
    """With the real registry on the CPU the GPU-only implementations are recorded as unavailable."""
    measured = measure_rates(CPU, SHAPE, timer=fake_timer(dict.fromkeys([*ATTENTION_BACKENDS, "linear"], 1.0)))
    assert set(measured.attention_TFLOPs) == {"sdpa", "math"}
    assert set(measured.rejected) == {"cudnn", "flash", "efficient", "flash-attn-4"}
    assert all(r.startswith("unavailable: it runs on CUDA GPUs only") for r in measured.rejected.values())


def test_probe_measures_nothing_on_cpu(tmp_path):
    """Without a GPU there are no rates and no cache file."""
    assert kernel_rates(CPU, SHAPE, folder=tmp_path) is None
    assert list(tmp_path.iterdir()) == []


class CountingMeasure:
    def __init__(self, measured: Measurements = MEASURED):
        self.calls, self.measured = 0, measured

    def __call__(self) -> Measurements:
        self.calls += 1
        return self.measured


def test_cache_round_trip(tmp_path):
    """The first call measures and saves; the second reads the same rates back without measuring."""
    measure = CountingMeasure()
    first = cached_rates(KEY, tmp_path, measure)
    assert (
        not first.from_cache
        and first.cache_path == tmp_path / "kernel-rates-fake-gpu-80gb-sm90-h8-kv2-d32-q96-k160.json"
    )
    second = cached_rates(KEY, tmp_path, measure)
    assert measure.calls == 1 and second.from_cache and second.cache_path == first.cache_path
    assert second.measured == MEASURED and second.date == first.date and second.key == KEY
    assert second.measured.best_attention == "cudnn"


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe binary",
        json.dumps({"key": KEY.to_json(), "date": "2026-11-28"}).encode(),
        b"[]",
    ],
    ids=["garbage", "not-utf8", "missing-fields", "wrong-type"],
)
def test_corrupt_cache_is_measured_again_and_rewritten(tmp_path, content, caplog):
    """An unreadable file is measured again (with a warning) and replaced by a good one."""
    path = tmp_path / KEY.file_name()
    path.write_bytes(content)
    measure = CountingMeasure()
    with caplog.at_level(logging.WARNING):
        rates = cached_rates(KEY, tmp_path, measure)
    assert measure.calls == 1 and not rates.from_cache
    assert json.loads(path.read_text())["key"]["gpu"] == KEY.gpu
    assert str(path) in caplog.text and cached_rates(KEY, tmp_path, measure).from_cache


def test_cache_with_an_impossible_rate_is_measured_again(tmp_path):
    """A file whose rates are not positive numbers (edited by hand, or half-written) does not count."""
    path = tmp_path / KEY.file_name()
    cached_rates(KEY, tmp_path, CountingMeasure())
    data = json.loads(path.read_text())
    data["measured"]["linear_TFLOPs"] = -1
    path.write_text(json.dumps(data))
    measure = CountingMeasure()
    assert not cached_rates(KEY, tmp_path, measure).from_cache and measure.calls == 1


@pytest.mark.parametrize(
    "change",
    [{"torch": "2.11.0+cu130"}, {"flash_attn_4": "4.0.0b36"}, {"capability": (9, 1)}],
    ids=["torch", "flash-attn-4", "capability"],
)
def test_cache_of_another_key_is_measured_again(tmp_path, change):
    """A file measured under another torch, flash-attn-4 or capability is measured again and overwritten."""
    old = ProbeKey(**{**KEY.__dict__, **change})
    old_rates = Measurements(**{**MEASURED.__dict__, "linear_TFLOPs": 1.0})
    cached_rates(old, tmp_path, CountingMeasure(old_rates))
    (path,) = tmp_path.iterdir()
    path.rename(tmp_path / KEY.file_name())  # the same GPU and head layout: the same file name
    measure = CountingMeasure()
    rates = cached_rates(KEY, tmp_path, measure)
    assert measure.calls == 1 and rates.measured.linear_TFLOPs == 700.0
    assert json.loads((tmp_path / KEY.file_name()).read_text())["key"] == KEY.to_json()


def test_unwritable_cache_only_warns(tmp_path, caplog):
    """A cache folder that cannot be created gives the measured rates, no cache path, and a warning."""
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        rates = cached_rates(KEY, blocker / "cache", CountingMeasure())
    assert rates.measured == MEASURED and rates.cache_path is None and not rates.from_cache
    assert "cannot save kernel rates" in caplog.text


def test_cache_write_leaves_no_temporary_file(tmp_path):
    """The file is written beside its final name and renamed: only the final file remains."""
    cached_rates(KEY, tmp_path, CountingMeasure())
    assert [p.name for p in tmp_path.iterdir()] == [KEY.file_name()]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    """$COSMOS3_OFFLOAD_CACHE, else $XDG_CACHE_HOME/cosmos3-offload (absolute only), else ~/.cache/cosmos3-offload."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COSMOS3_OFFLOAD_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "cosmos3-offload"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == tmp_path / "home" / ".cache" / "cosmos3-offload"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "cosmos3-offload"
    monkeypatch.setenv("COSMOS3_OFFLOAD_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_probe_shape_refuses_heads_that_do_not_group():
    """Query heads must be a multiple of kv heads (GQA), and every size positive."""
    with pytest.raises(InputError, match="multiple of kv_heads"):
        ProbeShape(heads=6, kv_heads=4, head_dim=128)
    with pytest.raises(InputError, match="probe queries must be a positive integer"):
        ProbeShape(heads=8, kv_heads=2, head_dim=128, queries=0)


RATES = KernelRates(key=KEY, measured=MEASURED, date="2026-11-28", from_cache=True, cache_path=None)


def test_auto_without_rates_keeps_diffusers_dispatcher():
    """On a CPU (no rates) "auto" is diffusers' dispatcher, so CPU results stay what they were."""
    assert choose_attention(CPU, "auto", dtype=torch.float32, rates=None) == EAGER


def test_auto_picks_the_fastest_measured_that_runs_here():
    """ "auto" takes the fastest exact implementation that runs on the device: on the CPU cudnn is
    skipped for sdpa, the next fastest."""
    kernels = choose_attention(CPU, "auto", dtype=torch.bfloat16, rates=RATES)
    assert kernels.attention_name == "sdpa" and kernels.attention is ATTENTION_BACKENDS["sdpa"].run
    assert not kernels.fused


def test_named_attention_is_validated():
    """A named implementation that runs here is returned; "diffusers" is the dispatcher; others are refused."""
    assert choose_attention(CPU, "math", dtype=torch.float32, rates=None).attention is ATTENTION_BACKENDS["math"].run
    assert choose_attention(CPU, "diffusers", dtype=torch.bfloat16, rates=RATES) == EAGER
    with pytest.raises(InputError, match="unknown attention 'fa4'") as error:
        choose_attention(CPU, "fa4", dtype=torch.bfloat16, rates=None)
    assert all(choice in str(error.value) for choice in ATTENTION_CHOICES)
    with pytest.raises(InputError, match="'cudnn' cannot run here: it runs on CUDA GPUs only"):
        choose_attention(CPU, "cudnn", dtype=torch.bfloat16, rates=None)


def test_attention_the_probe_dropped_is_refused_with_its_reason(monkeypatch):
    """A named implementation the probe rejected on this GPU is refused, quoting the probe's reason."""
    measured = Measurements(
        **{**MEASURED.__dict__, "attention_TFLOPs": {"math": 20.0}, "rejected": {"sdpa": "inexact: error 9x"}}
    )
    rates = KernelRates(key=KEY, measured=measured, date="2026-11-28", from_cache=False, cache_path=None)
    with pytest.raises(InputError, match=r"kernel probe dropped it \(inexact: error 9x\)"):
        choose_attention(CPU, "sdpa", dtype=torch.bfloat16, rates=rates)


def test_each_attention_shape_has_its_own_cache_file(tmp_path):
    """Rates probed at 720p's token count and at 480p's live side by side: neither replaces the other."""
    at_720 = ProbeKey(**{**KEY.__dict__, "shape": dataclasses.replace(SHAPE, queries=44160, keys=44672)})
    at_480 = ProbeKey(**{**KEY.__dict__, "shape": dataclasses.replace(SHAPE, queries=9360, keys=9872)})
    assert at_720.file_name().endswith("-h8-kv2-d32-q44160-k44672.json")
    first, second = CountingMeasure(), CountingMeasure()
    cached_rates(at_720, tmp_path, first)
    cached_rates(at_480, tmp_path, second)
    assert cached_rates(at_720, tmp_path, first).from_cache and cached_rates(at_480, tmp_path, second).from_cache
    assert first.calls == second.calls == 1 and len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize(("call_seconds", "expected"), [(0.1, 5), (1.0, 2)], ids=["short-calls", "long-calls"])
def test_warm_up_runs_for_its_seconds_and_at_least_its_calls(call_seconds, expected):
    """Half a second of 0.1 s calls is 5 calls (clocks settle as under a step, not a 2-call burst); calls
    longer than that still run the minimum count. The device is waited for every 4 calls and at the end."""
    now, calls, synced = [0.0], [], []

    def run():
        calls.append(now[0])
        now[0] += call_seconds

    made = warm_up(run, calls=2, seconds=0.5, synchronize=lambda: synced.append(len(calls)), clock=lambda: now[0])
    assert made == len(calls) == expected
    assert synced == [n for n in (4,) if n <= made] + [made]
