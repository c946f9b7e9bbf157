"""Time of a plan: each layer's compute over the profile's rates, and a small event simulation of
streamed copies on the ring of slots against that compute (a mapped layer's copy is the slower of
its host memcpy from the page cache and its copy to the device).

The compute rates come from the `DeviceProfile`: on a GPU, app/device_profile.py fills them from
kernels/probe.py, which measures (once per GPU, torch version and head layout, then cached) a bf16
GEMM at a decoder layer's MLP shape and the attention implementation the run will use at a long
non-causal shape; `profile.source` says which GPU and whether the figures were measured now or read
from the cache. Without a GPU the built-in rates stand (measured on an H200, 2026-11-26). The
decode's seconds per pixel and the copy contention below are still the H200's
(benchmarks/results/streaming-H200-2026-11-26.json, decode-H200-2026-11-26.json); on another GPU
those parts are estimates.

With a parallel request (`Request.parallel`) the times are one GPU's: its branches over its share of
the tokens, the exchanges between GPUs over `interconnect_GBps`, copies at its share of the host's
read bandwidth (`rank_h2d_GBps`), and its share of the decode's tiles.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..model.geometry import latent_frames, latent_size
from ..model.groups import GENERATOR, REASONER, VAE_ENCODER
from .memory import decode_bytes_and_share, decode_rank_share, weight_bytes
from .parallel import ParallelLayout
from .plan import GroupPlan, Mode, Plan
from .request import DeviceProfile, Request
from .sizes import ModelSizes

DECODE_SECONDS_PER_PIXEL_FRAME = 9.6 / (1280 * 720 * 189)  # our untiled 720p x 189f on the H200
# Copies hidden behind compute still share the device's memory bandwidth: each second of streamed
# copies slows the compute it overlaps by this much. From the H200 runs of 720p x 189f under an
# 8 GiB cap (about 12 GB streamed a step): steps 1.003x and 1.008x the resident step, that is
# 0.08 and 0.24 s of slowdown per second of copies (streaming-720p-8gib- and streaming-H200-2026-11-26.json).
STREAM_CONTENTION = 0.1
# The decode's low-resolution pass (post_quant_conv, conv_in and the mid block over whole frames) runs
# on every GPU of a shared decode; only the tiles are dealt out. From Wan2.2's structure: 0.12 GMAC a
# latent pixel against 9.3 in the up blocks and head (1.3%), rounded up for its frame-by-frame loop
# and whole-frame attention. An estimate, not measured.
DECODE_LOW_RESOLUTION_SHARE = 0.02
# CFG-parallel exchanges the branches' vision velocities once a step (app/generate.py `all_branches`):
# float32 over Wan2.2's 48 latent channels.
LATENT_CHANNELS = 48
VELOCITY_BYTES = 4
# What a layer's norms, QK-norm + rotary, K/V join, MLP activation and residual adds (fused kernels,
# memory-bound) move through device memory, at this rate: read and written bytes over seconds. The
# H200's 720p x 189f step spent 0.19 s in them for 547 GB, 2850 GB/s (speed-ours-H200-2026-11-28.json,
# its copy bandwidth 4.3 TB/s); an H100 copies at 3.0 TB/s, so 2500 sits between (0.22 s a step there,
# 4% of it).
ELEMENTWISE_GBps = 2500.0
# FP8 W8A8 linears (rowwise scaled GEMMs on FP8 tensor cores, the activations quantized by a fused kernel)
# over bf16 ones, as a step sees them: on an H100 under 8 GiB at 720p x 189f the step went from 5.92 to
# 5.54 s, its ~1.6 s of GEMMs to ~1.2 s. The GEMMs alone ran at 1170-1310 TFLOP/s against ~800.
FP8_LINEAR_SPEEDUP = 1.3


@dataclass(frozen=True)
class Times:
    step: float  # one denoising step, every branch
    prefill: float
    decode: float
    total: float  # prefill + steps + decode + copies of staged groups


def times(plan: Plan, sizes: ModelSizes, request: Request, profile: DeviceProfile, search: dict | None = None) -> Times:
    """One GPU's times: a step, the prefill, the decode, and the whole request. `search`: a dict the planner
    keeps for one search (one request and profile, its candidates alive): its parts repeat across candidates (a
    placement under every MLP chunk and tile grid shares its group plans), so each is computed once there."""
    if search is None:
        step, prefill, staged = _placement_seconds(plan, sizes, request, profile)
        decode = _decode_seconds(plan, sizes, request)
    else:
        placement = (id(plan.reasoner), id(plan.generator), id(plan.vae))  # the candidates share these objects
        if placement not in search:
            search[placement] = _placement_seconds(plan, sizes, request, profile)
        step, prefill, staged = search[placement]
        grid = id(plan.decode_grid)
        if grid not in search:
            search[grid] = _decode_seconds(plan, sizes, request)
        decode = search[grid]
    total = prefill + request.steps * step + decode + staged
    return Times(step=step, prefill=prefill, decode=decode, total=total)


def _placement_seconds(
    plan: Plan, sizes: ModelSizes, request: Request, profile: DeviceProfile
) -> tuple[float, float, float]:
    """(a step, the prefill, the staged groups' copies) in seconds under `plan`'s placement."""
    layout = request.parallel
    bandwidth = rank_h2d_GBps(profile, layout) * 1e9
    host_copy = _rank_share(profile.host_copy_GBps, profile, layout) * 1e9
    # Copies hidden behind compute slow it by the device memory traffic they make: bytes at the device's rate.
    device_copy = profile.h2d_GBps * 1e9

    def copy_seconds(tower: str) -> tuple[float, ...]:
        layers = sizes.towers[tower].layers
        if plan.group(tower).mode is Mode.MAPPED:
            # Page cache -> bounce slot (host memcpy) overlaps the previous slot's copy to the device.
            return tuple(max(layer.payload / host_copy, layer.packed / bandwidth) for layer in layers)
        return tuple(layer.packed / bandwidth for layer in layers)

    step = simulate_ring(plan.generator, copy_seconds(GENERATOR), generator_layer_seconds(sizes, request, profile))
    step += STREAM_CONTENTION * streamed_bytes(plan, sizes, GENERATOR) / device_copy
    if layout.parallel:
        step += step_exchange_seconds(sizes, request, profile)
    prefill = simulate_ring(
        plan.reasoner, copy_seconds(REASONER), layer_seconds(sizes, request, profile, request.prompt_tokens), passes=1
    )
    prefill += STREAM_CONTENTION * streamed_bytes(plan, sizes, REASONER) / device_copy
    return step, prefill, staged_bytes(plan, sizes, request) / bandwidth


def _decode_seconds(plan: Plan, sizes: ModelSizes, request: Request) -> float:
    """The video decode's seconds in `plan`'s tile grid (one GPU's share of it, over several)."""
    layout = request.parallel
    _, decode_share = decode_bytes_and_share(sizes, plan.decode_grid, request.height, request.width)
    decode = DECODE_SECONDS_PER_PIXEL_FRAME * request.height * request.width * request.frames * decode_share
    if layout.parallel:
        tiles = decode_rank_share(sizes, plan.decode_grid, request.height, request.width, layout.world_size)
        decode *= DECODE_LOW_RESOLUTION_SHARE + (1 - DECODE_LOW_RESOLUTION_SHARE) * tiles
    return decode


def rank_h2d_GBps(profile: DeviceProfile, layout: ParallelLayout) -> float:
    """Host-to-device rate of one GPU while every GPU of the host copies at once: each has its own
    link, but they share the host's read bandwidth. One GPU's measured rate stands as it is."""
    return _rank_share(profile.h2d_GBps, profile, layout)


def _rank_share(rate: float, profile: DeviceProfile, layout: ParallelLayout) -> float:
    return rate if not layout.parallel else min(rate, profile.host_read_GBps / layout.world_size)


def staged_bytes(plan: Plan, sizes: ModelSizes, request: Request) -> int:
    """Bytes of the whole-group copies one request makes (each staged group once, the encoder only
    when there are frames to encode)."""
    arena = weight_bytes(plan, sizes).arena
    used = [g for g in arena if g != VAE_ENCODER or request.encode_frames]
    return sum(arena[g] for g in used if plan.group(g).mode is Mode.STAGED)


def streamed_bytes(plan: Plan, sizes: ModelSizes, tower: str = GENERATOR) -> int:
    """Bytes one pass over a tower's layers copies to the device (for the generator: one step)."""
    how = plan.group(tower)
    if not how.streams_layers:
        return 0
    kept = set(how.resident_layers)
    return sum(g.packed for i, g in enumerate(sizes.towers[tower].layers) if i not in kept)


def moved_bytes(plan: Plan, sizes: ModelSizes, request: Request) -> int:
    """Bytes one request copies to the device: staged groups once, the streamed reasoner once,
    the streamed generator every step."""
    streamed = streamed_bytes(plan, sizes, REASONER) + request.steps * streamed_bytes(plan, sizes, GENERATOR)
    return staged_bytes(plan, sizes, request) + streamed


def layer_seconds(
    sizes: ModelSizes, request: Request, profile: DeviceProfile, tokens: int, *, sequence: int = 1
) -> float:
    """One tower layer for this GPU's branches: matmuls (FP8 ones `FP8_LINEAR_SPEEDUP` faster) and the
    memory-bound elementwise kernels over its tokens/sequence rows, plus attention of every token over
    [prompt ; tokens] for its heads/sequence heads (Ulysses)."""
    rows = tokens // sequence
    linear_TFLOPs = profile.linear_TFLOPs * (FP8_LINEAR_SPEEDUP if sizes.fp8 else 1.0)
    linear = 2 * rows * sizes.layer_matmul_params / (linear_TFLOPs * 1e12)
    elementwise = rows * elementwise_bytes_per_token(sizes) / (ELEMENTWISE_GBps * 1e9)
    keys = tokens + request.prompt_tokens
    attention = 4 * tokens * keys * (sizes.heads // sequence) * sizes.head_dim / (profile.attention_TFLOPs * 1e12)
    return request.rank_branches * (linear + elementwise + attention)


def elementwise_bytes_per_token(sizes: ModelSizes) -> int:
    """Bytes one token's row moves through a layer's fused elementwise kernels (split/fused_layer.py): the
    input norm (hidden in and out), QK-norm + rotary of the query (heads x head_dim in and out), the K/V
    join (the new key and value, each in and out), the attention-out residual add with the post-attention
    norm (two hidden in, two out), the MLP's activation (its gate and up in, one out; relu^2: up in and
    out) and the MLP's residual add (two hidden in, one out)."""
    query, key = sizes.heads * sizes.head_dim, sizes.kv_heads * sizes.head_dim
    elements = 2 * sizes.hidden + 2 * query + 4 * key + 4 * sizes.hidden + sizes.mlp_mats * sizes.intermediate
    return (elements + 3 * sizes.hidden) * sizes.dtype_bytes


def generator_layer_seconds(sizes: ModelSizes, request: Request, profile: DeviceProfile) -> float:
    """One generator layer on one GPU: its compute and, with sequence-parallel, its all-to-alls."""
    sequence = request.parallel.sequence
    compute = layer_seconds(sizes, request, profile, request.tokens, sequence=sequence)
    return compute if sequence == 1 else compute + all_to_all_seconds(sizes, request, profile)


def all_to_all_seconds(sizes: ModelSizes, request: Request, profile: DeviceProfile) -> float:
    """One layer's four Ulysses exchanges on one GPU: q, k, v before attention and the output after,
    each [rows, heads or kv_heads, head_dim] of which (s-1)/s leaves (and as much arrives) per branch."""
    s = request.parallel.sequence
    width = 2 * (sizes.heads + sizes.kv_heads) * sizes.head_dim  # q and out, k and v
    sent = request.rank_branches * request.rank_tokens * width * sizes.dtype_bytes * (s - 1) / s
    return sent / (profile.interconnect_GBps * 1e9)


def step_exchange_seconds(sizes: ModelSizes, request: Request, profile: DeviceProfile) -> float:
    """Once a step on one GPU: with sequence-parallel, the gather of each branch's rows [tokens, hidden]
    before the read-out; with CFG-parallel, the other branch's vision velocity."""
    layout = request.parallel
    received = request.rank_branches * (layout.sequence - 1) * request.rank_tokens * sizes.hidden * sizes.dtype_bytes
    if layout.cfg == 2:
        height, width = latent_size(request.height, request.width)
        received += latent_frames(request.frames) * height * width * LATENT_CHANNELS * VELOCITY_BYTES
    return received / (profile.interconnect_GBps * 1e9)


def simulate_ring(how: GroupPlan, copy_s: Sequence[float], layer_s: float, passes: int = 2) -> float:
    """See `_simulate_ring`; the planner asks the same question for many candidates, so answers are kept."""
    return _simulate_ring(how, tuple(copy_s), layer_s, passes)


@functools.lru_cache(maxsize=4096)
def _simulate_ring(how: GroupPlan, copy_s: tuple[float, ...], layer_s: float, passes: int) -> float:
    """Seconds of the last of `passes` passes over the layers, mirroring the streamed placement's ring.

    The host runs ahead of the GPU, so a copy starts when the copy engine and its slot are free;
    a streamed layer computes once its copy is done and the previous layer has finished.
    copy_s[i]: seconds to copy layer i.
    """
    layers = len(copy_s)
    streamed = [i for i in range(layers) if i not in set(how.resident_layers)]
    if not how.streams_layers or not streamed:
        return layers * layer_s
    free = deque((slot, 0.0) for slot in range(how.ring))  # (slot, time its last reader finished)
    loaded: deque[tuple[int, int, float]] = deque()  # (position in the cyclic copy order, slot, copy done)
    engine = clock = start = 0.0
    issued = 0

    def issue() -> None:
        nonlocal engine, issued
        slot, reader_done = free.popleft()
        engine = max(engine, reader_done) + copy_s[streamed[issued % len(streamed)]]
        loaded.append((issued, slot, engine))
        issued += 1

    for step in range(passes):
        start = clock
        for position, layer in enumerate(streamed):
            previous = streamed[position - 1] if position else -1
            clock += (layer - previous - 1) * layer_s  # resident layers before this one
            target = step * len(streamed) + position
            while not any(p == target for p, _, _ in loaded):
                issue()
            ready = next(done for p, _, done in loaded if p == target)
            while free and len(loaded) <= how.prefetch:
                issue()
            clock = max(clock, ready) + layer_s
            _, slot, _ = loaded.popleft()
            free.append((slot, clock))
        clock += (layers - 1 - streamed[-1]) * layer_s
    return clock - start
