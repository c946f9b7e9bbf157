"""Measured kernel rates of a GPU: which attention implementations are exact there, how fast each
runs, and how fast a bf16 GEMM runs. Measured once per GPU, torch and flash-attn-4 version and
head layout, then read from a JSON cache; `choose_attention` turns them into the run's `Kernels`.

Exactness: on random bf16 inputs of the model's head layout (GQA), non-causal with
`check_queries` x `check_keys` (the generator's case) and causal with equal lengths (the
prefill's), each implementation's output is compared with a float64 reference. The math backend
in bf16 upcasts to float32 and rounds only its result, so its error is what rounding the output
to bf16 costs: the floor for any kernel that returns bf16. An implementation is exact when its
relative L2 error and its largest absolute error are each at most `EXACTNESS_FACTOR` (4x) the
math backend's. Fused kernels also round the softmax probabilities to bf16 before multiplying by
V; emulated on random inputs at 32/8 heads of 128 that costs 1.4x in L2 and 1.0x in max error,
while a 1% error in the softmax scale shows as 9x and 16x, and a wrong GQA head mapping as 400-800x.

Timing: each exact implementation runs non-causal attention of `queries` x `keys` tokens (CUDA
events, after half a second of warm-up calls, which also compile flash-attn-4's kernel and let the
clocks settle as under a step; the math kernel, which holds every score, at most 2048 x 2048),
counted as 4 * queries * keys * heads * head_dim FLOP. A run probes at its request's token counts
(app/device_profile.py `probe_shape`): at 32k x 32k an H100 probe measured SDPA's cuDNN kernel at
655 TFLOP/s while the 720p step ran it at ~560 (issue 27's figures), so the rate the planner uses, and
possibly the fastest implementation, follow the token count (docs/planner.md). A bf16
GEMM [gemm_tokens, gemm_in] x [gemm_in, gemm_out] gives the linear rate. The timer is a
parameter, so CPU tests run the same logic on fake timings.

Cache: `<cache dir>/kernel-rates-<gpu>-sm<capability>-<head layout>-q<queries>-k<keys>.json` (one file per
attention shape, so a run at 720p and one at 480p each keep theirs), the dir `$COSMOS3_OFFLOAD_CACHE`, else
`$XDG_CACHE_HOME/cosmos3-offload`, else `~/.cache/cosmos3-offload`. A file that cannot be read or
parsed, or was measured under another key, is measured again and replaced atomically; a cache that
cannot be written costs a warning and a measurement next time.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..caches import cache_dir  # re-exported: app/previews.py and tests name it here
from ..errors import InputError, first_line
from .attention import (
    ATTENTION_BACKENDS,
    REFERENCE,
    AttentionSpec,
    attention_spec,
    available_attention,
    flash_attn_4_version,
)
from .choice import EAGER, Kernels

logger = logging.getLogger(__name__)

EXACTNESS_FACTOR = 4.0
PROBE_DTYPE = torch.bfloat16
CACHE_FORMAT = 3  # bump when what is measured or how changes, so older files are measured again
WARMUP_SECONDS = 0.5  # of back-to-back calls before each timed kernel (see `cuda_event_seconds`)
QUADRATIC_TOKENS = 2048  # q and kv tokens for a kernel that materializes its [heads, q, kv] scores
AUTO = "auto"
DIFFUSERS = EAGER.attention_name  # diffusers' dispatcher; its default ("native") backend is torch SDPA
ATTENTION_CHOICES = (AUTO, DIFFUSERS, *ATTENTION_BACKENDS)

# Seconds one call of `run` takes; `name` ("linear" or an attention implementation) says what runs.
Timer = Callable[[str, Callable[[], object]], float]


@dataclass(frozen=True, kw_only=True)
class ProbeShape:
    """The model's attention head layout and the sizes the probe checks and times at (Nano's by default)."""

    heads: int
    kv_heads: int
    head_dim: int
    # timed attention: non-causal, queries x keys. A run probes at its own request's counts (app/
    # device_profile.py `probe_shape`: its generator tokens x those plus the prompt's), since the
    # kernels' rates and which one is fastest move with the token count; these defaults stand for
    # a run whose request is not known yet.
    queries: int = 32768
    keys: int = 32768
    check_queries: int = 1000  # exactness check; not multiples of a kernel's tile, so edges are covered
    check_keys: int = 1555
    gemm_tokens: int = 16384  # timed linear: [tokens, gemm_in] x [gemm_in, gemm_out] (an MLP's up projection)
    gemm_in: int = 4096
    gemm_out: int = 12288

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"probe {field.name} must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise InputError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")


@dataclass(frozen=True, kw_only=True)
class ProbeKey:
    """What a cached measurement must match to be reused."""

    gpu: str
    capability: tuple[int, int]
    torch: str
    flash_attn_4: str | None  # its version; None when it cannot be imported
    shape: ProbeShape
    format: int = CACHE_FORMAT

    @classmethod
    def for_device(cls, device: torch.device, shape: ProbeShape) -> ProbeKey:
        return cls(
            gpu=torch.cuda.get_device_name(device),
            capability=tuple(torch.cuda.get_device_capability(device)),
            torch=torch.__version__,
            flash_attn_4=flash_attn_4_version(),
            shape=shape,
        )

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "capability": list(self.capability)}

    def file_name(self) -> str:
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-")
        major, minor = self.capability
        shape = self.shape
        layout = f"h{shape.heads}-kv{shape.kv_heads}-d{shape.head_dim}-q{shape.queries}-k{shape.keys}"
        return f"kernel-rates-{gpu}-sm{major}{minor}-{layout}.json"


@dataclass(frozen=True, kw_only=True)
class Measurements:
    """attention_TFLOPs: the exact implementations that ran, by name; error_ratios: each checked
    implementation's worst error over the math backend's (see the module docstring); rejected: why
    each other registered implementation was dropped; linear_TFLOPs: the bf16 GEMM."""

    attention_TFLOPs: dict[str, float]
    error_ratios: dict[str, float]
    rejected: dict[str, str]
    linear_TFLOPs: float

    def __post_init__(self) -> None:
        rates = [*self.attention_TFLOPs.values(), self.linear_TFLOPs]
        if not self.attention_TFLOPs or not all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in rates):
            raise ValueError(f"kernel rates must be positive numbers, with at least one attention: {rates}")
        if set(self.attention_TFLOPs) & set(self.rejected):
            raise ValueError("an attention implementation is both measured and rejected")

    @property
    def best_attention(self) -> str:
        """The fastest exact implementation (the registry's order breaks ties)."""
        return max(self.attention_TFLOPs, key=self.attention_TFLOPs.__getitem__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurements:
        return cls(
            attention_TFLOPs={str(k): float(v) for k, v in data["attention_TFLOPs"].items()},
            error_ratios={str(k): float(v) for k, v in data["error_ratios"].items()},
            rejected={str(k): str(v) for k, v in data["rejected"].items()},
            linear_TFLOPs=float(data["linear_TFLOPs"]),
        )


@dataclass(frozen=True, kw_only=True)
class KernelRates:
    """A GPU's measured rates; `cache_path` is where they were read from or saved to (None: not saved)."""

    key: ProbeKey
    measured: Measurements
    date: str
    from_cache: bool
    cache_path: Path | None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key.to_json(), "date": self.date, "measured": dataclasses.asdict(self.measured)}


def kernel_rates(device: torch.device, shape: ProbeShape, *, folder: Path | None = None) -> KernelRates | None:
    """This GPU's rates for `shape`, from the cache or measured now (a few seconds; blocks the host
    while the kernels run). None on a CPU: there is nothing to measure."""
    if device.type != "cuda":
        return None
    key = ProbeKey.for_device(device, shape)

    def measure() -> Measurements:
        logger.info("measuring attention and GEMM rates on %s", key.gpu)
        measured = measure_rates(device, shape)
        torch.cuda.empty_cache()  # the probe's buffers go back to the device, not to the allocator's cache
        return measured

    return cached_rates(key, cache_dir() if folder is None else folder, measure)


def cached_rates(key: ProbeKey, folder: Path, measure: Callable[[], Measurements]) -> KernelRates:
    """The rates cached for `key` in `folder`, else `measure()`'s, saved there (atomically)."""
    path = folder / key.file_name()
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    rates = KernelRates(
        key=key, measured=measure(), date=datetime.date.today().isoformat(), from_cache=False, cache_path=path
    )
    try:
        _write_atomically(path, json.dumps(rates.to_json(), indent=1) + "\n")
    except OSError as error:
        logger.warning("cannot save kernel rates to %s (%s); they will be measured again", path, first_line(error))
        return dataclasses.replace(rates, cache_path=None)
    return rates


def _read_cache(path: Path, key: ProbeKey) -> KernelRates | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        logger.warning("cannot read kernel rates from %s (%s); measuring again", path, first_line(error))
        return None
    try:
        data = json.loads(text)
        if data["key"] != key.to_json():
            logger.info("%s holds rates measured under another key; measuring again", path)
            return None
        measured = Measurements.from_json(data["measured"])
        return KernelRates(key=key, measured=measured, date=str(data["date"]), from_cache=True, cache_path=path)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("%s is not a kernel-rate file (%s); measuring again", path, first_line(error))
        return None


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cuda_event_seconds(
    name: str, run: Callable[[], object], *, warmup: int = 2, repeats: int = 5, warmup_seconds: float = WARMUP_SECONDS
) -> float:
    """Median seconds of one call of `run` on the current stream, after at least `warmup` calls and
    `warmup_seconds` of back-to-back calls (the GPU's clocks settle as under a step's long stream of
    kernels, not a short burst's). Blocks the host."""
    warm_up(run, calls=warmup, seconds=warmup_seconds)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()  # the host waits for the timed kernels before reading the events
    seconds = statistics.median(start.elapsed_time(end) / 1000 for start, end in events)
    logger.info("%s: %.3f ms", name, seconds * 1000)
    return seconds


def warm_up(
    run: Callable[[], object],
    *,
    calls: int,
    seconds: float,
    synchronize: Callable[[], None] = torch.cuda.synchronize,
    clock: Callable[[], float] = time.perf_counter,
) -> int:
    """Call `run` back to back at least `calls` times and until `seconds` have passed, waiting for the
    device every 4 calls so that the clock counts device time, not queued launches. Returns the calls made."""
    started, made = clock(), 0
    while made < calls or clock() - started < seconds:
        run()
        made += 1
        if made % 4 == 0:
            synchronize()
    synchronize()
    return made


def measure_rates(
    device: torch.device,
    shape: ProbeShape,
    *,
    backends: Mapping[str, AttentionSpec] = ATTENTION_BACKENDS,
    timer: Timer = cuda_event_seconds,
) -> Measurements:
    """Check every implementation in `backends` that runs on `device` for exactness, then time the
    exact ones and a GEMM with `timer`. Runs on any device, so tests may pass fake backends and timings."""
    rejected = {}
    for name, spec in backends.items():
        reason = spec.unavailable_reason(device, PROBE_DTYPE)
        if reason is not None:
            rejected[name] = f"unavailable: {reason}"
    checked = {name: spec for name, spec in backends.items() if name not in rejected}
    error_ratios, failures = check_exactness(device, shape, checked)
    rejected |= failures
    generator = torch.Generator(device).manual_seed(1)
    rates = {}
    for name, spec in checked.items():
        if name in rejected:
            continue
        try:
            rates[name] = _attention_TFLOPs(spec, shape, device, generator, timer)
        except Exception as error:  # e.g. no kernel for this shape, or out of memory
            rejected[name] = f"failed while timed: {type(error).__name__}: {first_line(error)}"
    x = _randn(generator, device, shape.gemm_tokens, shape.gemm_in)  # [tokens, in]
    weight = _randn(generator, device, shape.gemm_out, shape.gemm_in)  # [out, in], as nn.Linear holds it
    seconds = timer("linear", lambda: F.linear(x, weight))
    linear = 2 * shape.gemm_tokens * shape.gemm_in * shape.gemm_out / seconds / 1e12
    return Measurements(attention_TFLOPs=rates, error_ratios=error_ratios, rejected=rejected, linear_TFLOPs=linear)


def check_exactness(
    device: torch.device, shape: ProbeShape, backends: Mapping[str, AttentionSpec]
) -> tuple[dict[str, float], dict[str, str]]:
    """(the worst error over the math backend's of each implementation that ran, why each inexact or
    failing one was rejected), non-causal with check_queries x check_keys and causal with equal lengths."""
    generator = torch.Generator().manual_seed(0)  # on the CPU: the same inputs on every GPU
    reference = attention_spec(REFERENCE).run
    ratios = dict.fromkeys(backends, 0.0)
    failed = {}
    for causal, keys in ((False, shape.check_keys), (True, shape.check_queries)):
        q = _randn(generator, "cpu", shape.check_queries, shape.heads, shape.head_dim).to(device)
        k, v = (_randn(generator, "cpu", keys, shape.kv_heads, shape.head_dim).to(device) for _ in range(2))
        exact = reference(q.double(), k.double(), v.double(), causal=causal)
        floor = _errors(reference(q, k, v, causal=causal), exact)
        for name, spec in backends.items():
            if name in failed:
                continue
            try:
                errors = _errors(spec.run(q, k, v, causal=causal), exact)
            except Exception as error:  # an implementation that cannot run this layout is dropped, not fatal
                failed[name] = f"failed: {type(error).__name__}: {first_line(error)}"
                del ratios[name]
                continue
            ratios[name] = max(ratios[name], *(e / max(f, 1e-30) for e, f in zip(errors, floor)))
    inexact = {
        name: f"inexact: error {ratio:.3g}x the math backend's bf16 rounding (limit {EXACTNESS_FACTOR:g}x)"
        for name, ratio in ratios.items()
        if not ratio <= EXACTNESS_FACTOR  # NaN is not exact either
    }
    return ratios, failed | inexact


def _errors(out: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, largest absolute error) of `out` against `exact` (float64)."""
    difference = out.double() - exact
    return (difference.norm() / exact.norm()).item(), difference.abs().max().item()


def _attention_TFLOPs(
    spec: AttentionSpec, shape: ProbeShape, device: torch.device, generator: torch.Generator, timer: Timer
) -> float:
    queries, keys = shape.queries, shape.keys
    if spec.quadratic_memory:  # its scores [heads, q, kv] would not fit at the full size
        queries, keys = min(queries, QUADRATIC_TOKENS), min(keys, QUADRATIC_TOKENS)
    q = _randn(generator, device, queries, shape.heads, shape.head_dim)
    k, v = (_randn(generator, device, keys, shape.kv_heads, shape.head_dim) for _ in range(2))
    seconds = timer(spec.name, lambda: spec.run(q, k, v, causal=False))
    return 4 * queries * keys * shape.heads * shape.head_dim / seconds / 1e12


def _randn(generator: torch.Generator, device: torch.device | str, *size: int) -> torch.Tensor:
    return torch.randn(size, generator=generator, device=device).to(PROBE_DTYPE)


def check_attention_choice(requested: str) -> None:
    """Refuse a name that is no choice, listing them (before anything is measured)."""
    if requested not in ATTENTION_CHOICES:
        raise InputError(f"unknown attention {requested!r}; choose one of: {', '.join(ATTENTION_CHOICES)}")


def choose_attention(device: torch.device, requested: str, *, dtype: torch.dtype, rates: KernelRates | None) -> Kernels:
    """The attention a run uses (as `Kernels`; set `fused` with dataclasses.replace).

    "auto": with measured rates, the fastest exact implementation that runs in `dtype`; without
    (a CPU), diffusers' dispatcher, so CPU results stay what they were. "diffusers": that dispatcher.
    A named implementation must run on `device` in `dtype` and not have been rejected by the probe.
    """
    check_attention_choice(requested)
    if requested == DIFFUSERS:
        return EAGER
    if requested == AUTO:
        if rates is None:
            return EAGER
        usable = {
            name: rate
            for name, rate in rates.measured.attention_TFLOPs.items()
            if name in ATTENTION_BACKENDS and ATTENTION_BACKENDS[name].unavailable_reason(device, dtype) is None
        }
        if not usable:
            return EAGER
        requested = max(usable, key=usable.__getitem__)
        logger.info("attention: %s, the fastest exact one at %.0f TFLOP/s", requested, usable[requested])
    spec = available_attention(requested, device, dtype)
    if rates is not None and requested in rates.measured.rejected:
        raise InputError(
            f"attention {requested!r} cannot run here: this GPU's kernel probe dropped it "
            f"({rates.measured.rejected[requested]}); pick another with --attention, or auto"
        )
    return Kernels(attention=spec.run, attention_name=spec.name)
