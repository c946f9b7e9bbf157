"""The VRAM-budget planner: predict memory and time of candidate plans, pick the fastest that fits.

A pure function of the model's sizes (measured on `meta` models with the loader's own grouping),
the request's shape, the budget and a device profile. Memory per phase = resident weights +
the arena the remaining phases need + the reasoner memory + that phase's activations. Step time
comes from a small event simulation of one denoising step: each layer's compute (FLOPs over the
profile's rates) and each streamed layer's copy (bytes over the H2D bandwidth) on a ring of slots.

Activation and decode coefficients were fitted to the all-resident Nano runs on an H200 on
2026-11-26 (benchmarks/results/staging-ours-H200-2026-11-26.json and the resident rows of
streaming-H200-2026-11-26.json); the tiled-decode working set is an estimate. `plan` prints the
predictions, and the streaming benchmark compares them with measurements.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, replace

import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer

from .decode import Stage, TileGrid, decoder_stages, stage_region
from .errors import InputError
from .groups import EMBEDDING, GENERATOR, PHASES, REASONER, UNUSED, VAE, VAE_ENCODER, transformer_group_of, vae_group_of
from .materialize import build_on_meta, group_layouts, keep_fp32_dtype
from .plan import GroupPlan, Plan
from .towers import tower_of

GIB = 1024**3
ACTIVATION_HIDDENS = 7.5  # live [tokens, hidden] tensors in a generator layer, besides the MLP's (fitted)
# Tiled decode, fitted to Nano's VAE on the H200 (benchmarks/results/decode-H200-2026-11-26.json):
# live activations = (DECODE_LIVE_BASE + DECODE_LIVE_PER_FRAME * frames a pass) one-frame tensors of
# the largest stage input of a tile, plus a fixed DECODE_FIXED_BYTES; time = untiled time x the
# halo work x a slowdown for taking fewer frames through a block at once.
DECODE_LIVE_BASE = 8.0
DECODE_LIVE_PER_FRAME = 7.5
DECODE_FIXED_BYTES = 100 * 1024**2
DECODE_SLACK = 1.1  # the allocator's rounding and caching on top of the decode's tensors (from budget runs)
DECODE_FRAME_SLOWDOWN = {1: 1.33, 2: 1.13, 4: 1.0}
# Encode of conditioning frames, fitted to two H200 points (720p: 1 frame 1.40 GiB, 5 frames 3.68 GiB
# peak with the encoder's 0.28 GiB; decode-H200-2026-11-26.json).
ENCODE_BYTES_PER_PIXEL = 390
ENCODE_BYTES_PER_PIXEL_FRAME = 900
DECODE_SECONDS_PER_PIXEL_FRAME = 9.6 / (1280 * 720 * 189)  # our untiled 720p x 189f on the H200
MLP_CHUNKS = (None, 8192, 2048)
DECODE_GRIDS = tuple(
    TileGrid(rows=r, cols=c, frames=f)
    for r, c in ((1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 4), (4, 6), (6, 8))
    for f in DECODE_FRAME_SLOWDOWN
)


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """Rates of the target GPU. Defaults: measured on an H200 (2026-11-26); an H100 PCIe is close on H2D."""

    h2d_GBps: float = 55.0
    linear_TFLOPs: float = 450.0
    attention_TFLOPs: float = 570.0
    headroom: float = 0.9  # share of the budget a plan may fill (allocator rounding and fragmentation)

    def __post_init__(self) -> None:
        for name in ("h2d_GBps", "linear_TFLOPs", "attention_TFLOPs"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}; e.g. --h2d-gbps 25")
        if not 0 < self.headroom <= 1:
            raise InputError(f"headroom must be in (0, 1], got {self.headroom}")


@dataclass(frozen=True, kw_only=True)
class Request:
    """The shape of one generation: latent tokens per branch, prompt tokens, branches, video size."""

    tokens: int
    prompt_tokens: int = 512
    branches: int = 2
    frames: int = 189
    height: int = 720
    width: int = 1280
    steps: int = 35
    encode_frames: int = 0  # pixel frames the VAE encodes for conditioning (0: text to video)

    @classmethod
    def for_video(cls, frames: int, height: int, width: int, *, cfg: bool = True, steps: int = 35, **kw) -> Request:
        latent_frames = (frames - 1) // 4 + 1
        tokens = latent_frames * math.ceil(height / 32) * math.ceil(width / 32)
        return cls(
            tokens=tokens, branches=2 if cfg else 1, frames=frames, height=height, width=width, steps=steps, **kw
        )


@dataclass(frozen=True, kw_only=True)
class ModelSizes:
    """Bytes per group and the shapes that set FLOPs and activations."""

    layers: int
    hidden: int
    intermediate: int
    mlp_mats: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    layer_bytes: dict[str, int]  # per decoder layer, per tower
    head_bytes: dict[str, int]  # tower weights outside the layers
    embedding_bytes: int
    vae_bytes: int  # the decoder side (what the decode holds)
    vae_encoder_bytes: int
    layer_matmul_params: int  # one tower's matmul weights in one layer
    decoder_stages: tuple[Stage, ...]  # the VAE decoder's up blocks and head, as the tiled decode runs them


def model_sizes(transformer_config: dict, vae_config: dict, dtype_bytes: int = 2) -> ModelSizes:
    """Exact sizes from `meta` models grouped the way the loader groups them."""
    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    transformer = build_on_meta(Cosmos3OmniTransformer, transformer_config)
    config = transformer.config
    layer_bytes = {REASONER: 0, GENERATOR: 0}
    head_bytes = {REASONER: 0, GENERATOR: 0}
    dtype_of = keep_fp32_dtype(Cosmos3OmniTransformer, dtype)
    embedding = matmul = 0
    for name, param in transformer.named_parameters():
        group = transformer_group_of(name, config.num_hidden_layers)
        nbytes = param.numel() * (4 if dtype_of(name) == torch.float32 else dtype_bytes)
        if group == EMBEDDING:
            embedding += nbytes
        elif group != UNUSED and name.startswith("layers.0."):
            layer_bytes[group] += nbytes
            if group == GENERATOR and param.ndim == 2:
                matmul += param.numel()
        elif group != UNUSED and not name.startswith("layers."):
            head_bytes[tower_of(name)] += nbytes
    vae = build_on_meta(AutoencoderKLWan, vae_config)
    vae_layouts = group_layouts(vae, vae_group_of, keep_fp32_dtype(AutoencoderKLWan, dtype))
    return ModelSizes(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        mlp_mats=3 if config.hidden_act == "silu" else 2,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        dtype_bytes=dtype_bytes,
        layer_bytes=layer_bytes,
        head_bytes=head_bytes,
        embedding_bytes=embedding,
        vae_bytes=vae_layouts[VAE].payload_bytes,
        vae_encoder_bytes=vae_layouts[VAE_ENCODER].payload_bytes,
        layer_matmul_params=matmul,
        decoder_stages=decoder_stages(vae.decoder),
    )


@dataclass(frozen=True)
class Prediction:
    prefill_peak: int
    denoise_peak: int
    decode_peak: int
    step_s: float
    prefill_s: float
    decode_s: float
    total_s: float
    encode_peak: int = 0  # 0 without conditioning frames

    @property
    def peak(self) -> int:
        return max(self.encode_peak, self.prefill_peak, self.denoise_peak, self.decode_peak)


def spread(layers: int, count: int) -> tuple[int, ...]:
    """`count` layer indexes spread evenly through `layers` (centers of equal bins), never a prefix."""
    return tuple(int((i + 0.5) * layers / count) for i in range(count)) if count else ()


def predict(plan: Plan, sizes: ModelSizes, request: Request, profile: DeviceProfile) -> Prediction:
    """Peak device bytes of each phase and the time of a step, the prefill and the decode."""
    placements = {REASONER: plan.reasoner, GENERATOR: plan.generator}
    resident = 0 if plan.reasoner.mode != "resident" else sizes.embedding_bytes
    arena = {}
    for tower, how in placements.items():
        whole = sizes.head_bytes[tower] + sizes.layers * sizes.layer_bytes[tower]
        if how.mode == "resident":
            resident, arena[tower] = resident + whole, 0
        elif how.mode == "staged":
            arena[tower] = whole
        else:
            resident += sizes.head_bytes[tower] + len(how.resident_layers) * sizes.layer_bytes[tower]
            arena[tower] = how.ring * sizes.layer_bytes[tower]
    resident += sizes.vae_bytes + sizes.vae_encoder_bytes if plan.vae.mode == "resident" else 0
    arena[VAE] = sizes.vae_bytes if plan.vae.mode == "staged" else 0
    arena[VAE_ENCODER] = sizes.vae_encoder_bytes if plan.vae.mode == "staged" else 0
    hb = sizes.hidden * sizes.dtype_bytes
    memory = 2 * sizes.layers * sizes.kv_heads * sizes.head_dim * sizes.dtype_bytes * request.prompt_tokens
    memory *= request.branches

    def activations(tokens: int, chunk: int | None) -> int:
        mlp_tokens = tokens if chunk is None else min(tokens, chunk)
        mlp = sizes.mlp_mats * mlp_tokens * sizes.intermediate * sizes.dtype_bytes
        return int((ACTIVATION_HIDDENS + request.branches - 2) * tokens * hb + mlp)

    decode_work, decode_share = decode_cost(sizes, plan.decode_grid, request.height // 16, request.width // 16)
    peaks = (
        resident + max(arena.values()) + memory + activations(request.prompt_tokens * request.branches, None),
        resident + max(arena[GENERATOR], arena[VAE]) + memory + activations(request.tokens, plan.mlp_chunk),
        resident + arena[VAE] + decode_work,
    )
    bandwidth = profile.h2d_GBps * 1e9
    step = _simulate(
        plan.generator,
        sizes.layers,
        sizes.layer_bytes[GENERATOR] / bandwidth,
        _layer_seconds(sizes, request, profile, request.tokens),
    )
    prefill = _simulate(
        plan.reasoner,
        sizes.layers,
        sizes.layer_bytes[REASONER] / bandwidth,
        _layer_seconds(sizes, request, profile, request.prompt_tokens),
        steps=1,
    )
    staged = sum(arena[t] for t, how in placements.items() if how.mode == "staged") + arena[VAE]
    decode = DECODE_SECONDS_PER_PIXEL_FRAME * request.height * request.width * request.frames * decode_share
    total = prefill + request.steps * step + decode + staged / bandwidth
    # The encode runs first; a staged encoder enters with the arena already sized for the largest
    # phase to come, a resident one before any arena exists.
    arena_then = max(arena.values()) if plan.vae.mode == "staged" else 0
    encode = resident + arena_then + encode_cost(request) if request.encode_frames else 0
    return Prediction(*peaks, step_s=step, prefill_s=prefill, decode_s=decode, total_s=total, encode_peak=encode)


def encode_cost(request: Request) -> int:
    """Device bytes of encoding the conditioning frames besides the weights. The causal encoder takes
    the first frame alone and then chunks of up to 4, so the working set follows the largest chunk."""
    chunk = min(4, max(1, request.encode_frames - 1))
    return int(request.height * request.width * (ENCODE_BYTES_PER_PIXEL + ENCODE_BYTES_PER_PIXEL_FRAME * chunk))


def decode_cost(sizes: ModelSizes, grid: TileGrid, height: int, width: int) -> tuple[int, float]:
    return _decode_cost(sizes.decoder_stages, sizes.dtype_bytes, grid, height, width)


@functools.lru_cache(maxsize=4096)
def _decode_cost(stages: tuple[Stage, ...], nbytes: int, grid: TileGrid, height: int, width: int) -> tuple[int, float]:
    """Device bytes of the tiled decode besides the weights (the largest tile's causal caches, two
    frames per cached convolution, plus its live activations, plus allocator slack), and its time relative to an untiled
    decode (every stage's multiply-adds over the areas its tiles cover, halos included, times the
    slowdown of passing `grid.frames` frames at once)."""
    frame = (height, width)
    tiles = grid.tiles(height, width)

    def area(stage: Stage, tile) -> int:
        top, bottom, left, right = stage_region(stage, tile, frame)
        return (bottom - top) * (right - left)

    peak = 0
    for tile in tiles:
        caches = sum(2 * s.cache_channels * area(s, tile) for s in stages)
        live = max(s.in_channels * area(s, tile) for s in stages)
        peak = max(peak, (caches + (DECODE_LIVE_BASE + DECODE_LIVE_PER_FRAME * grid.frames) * live) * nbytes)
    work = sum(s.macs * sum(area(s, t) for t in tiles) / (s.scale**2 * height * width) for s in stages)
    slowdown = DECODE_FRAME_SLOWDOWN.get(grid.frames, 1.0)
    return int((peak + DECODE_FIXED_BYTES) * DECODE_SLACK), work / sum(s.macs for s in stages) * slowdown


def decode_grid_for(sizes: ModelSizes, height: int, width: int, budget_bytes: int, profile: DeviceProfile) -> TileGrid:
    """The least-work tile grid whose decode (decoder weights included) fits the budget, for a
    decode on its own; an InputError when even the finest grid does not."""
    latent = (height // 16, width // 16)
    fitting = []
    for grid in DECODE_GRIDS:
        nbytes, work = decode_cost(sizes, grid, *latent)
        if sizes.vae_bytes + nbytes <= budget_bytes * profile.headroom:
            fitting.append((work, grid.rows * grid.cols, grid))
    if not fitting:
        raise InputError(f"no tile grid fits the decode of {width}x{height} frames in {budget_bytes / GIB:.1f} GiB")
    return min(fitting, key=lambda f: f[:2])[2]


def _layer_seconds(sizes: ModelSizes, request: Request, profile: DeviceProfile, tokens: int) -> float:
    """One tower layer for all branches: matmuls plus attention over [prompt ; tokens]."""
    linear = 2 * tokens * sizes.layer_matmul_params / (profile.linear_TFLOPs * 1e12)
    keys = tokens + request.prompt_tokens
    attention = 4 * tokens * keys * sizes.heads * sizes.head_dim / (profile.attention_TFLOPs * 1e12)
    return request.branches * (linear + attention)


def _simulate(how: GroupPlan, layers: int, copy_s: float, layer_s: float, steps: int = 2) -> float:
    """Seconds of the last of `steps` passes over the layers, mirroring StreamedGroup's ring.

    The host runs ahead of the GPU, so a copy starts when the copy engine and its slot are free;
    a streamed layer computes once its copy is done and the previous layer has finished.
    """
    streamed = [i for i in range(layers) if i not in set(how.resident_layers)]
    if how.mode != "streamed" or not streamed:
        return layers * layer_s
    free = deque((slot, 0.0) for slot in range(how.ring))  # (slot, time its last reader finished)
    loaded: deque[tuple[int, int, float]] = deque()  # (position in the cyclic copy order, slot, copy done)
    engine = clock = start = 0.0
    issued = 0

    def issue() -> None:
        nonlocal engine, issued
        slot, reader_done = free.popleft()
        engine = max(engine, reader_done) + copy_s
        loaded.append((issued, slot, engine))
        issued += 1

    for step in range(steps):
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


def candidates(sizes: ModelSizes) -> list[Plan]:
    """Every plan the planner considers, from all resident to everything streamed."""
    plans = []
    for reasoner in ("resident", "staged", "streamed"):
        for generator in ("resident", "staged"):
            for vae in ("resident", "staged"):
                plans.append(
                    Plan(
                        reasoner=GroupPlan(mode=reasoner), generator=GroupPlan(mode=generator), vae=GroupPlan(mode=vae)
                    )
                )
    for reasoner in ("resident", "staged", "streamed"):
        for count in range(sizes.layers):
            for ring in (2, 3):
                generator = GroupPlan(
                    mode="streamed", resident_layers=spread(sizes.layers, count), ring=ring, prefetch=ring - 1
                )
                plans.append(Plan(reasoner=GroupPlan(mode=reasoner), generator=generator, vae=GroupPlan(mode="staged")))
    return [replace(p, mlp_chunk=c, decode_grid=g) for p in plans for c in MLP_CHUNKS for g in DECODE_GRIDS]


@dataclass(frozen=True)
class Choice:
    plan: Plan
    prediction: Prediction


def choose_plan(sizes: ModelSizes, request: Request, budget_bytes: int, profile: DeviceProfile) -> Choice:
    """The fastest predicted plan whose peak fits the budget; an InputError with the least budget that works."""
    scored = [Choice(p, predict(p, sizes, request, profile)) for p in candidates(sizes)]
    usable = budget_bytes * profile.headroom
    fitting = [c for c in scored if c.prediction.peak <= usable]
    if not fitting:
        least = min(c.prediction.peak for c in scored) / profile.headroom
        raise InputError(
            f"nothing fits a {budget_bytes / GIB:.1f} GiB budget for this request; it needs at least "
            f"{math.ceil(least / GIB * 10) / 10:.1f} GiB (or fewer frames or a lower resolution)"
        )

    # Among equally fast plans, move the fewest bytes per step (copies hidden on paper can still
    # contend in practice), then the fewest groups, then use the least memory.
    def cost(c: Choice) -> tuple:
        moving = sum(c.plan.group(g).mode != "resident" for g in PHASES)
        return round(c.prediction.total_s, 1), streamed_bytes(c.plan, sizes), moving, c.prediction.peak

    return min(fitting, key=cost)


def streamed_bytes(plan: Plan, sizes: ModelSizes) -> int:
    """Bytes one denoising step copies to the device."""
    how = plan.generator
    if how.mode != "streamed":
        return 0
    return (sizes.layers - len(how.resident_layers)) * sizes.layer_bytes[GENERATOR]


def parse_budget(text: str) -> int:
    """'8GiB', '8G', '7.5GB', '8192MiB' or a plain number of GiB -> bytes."""
    units = {"gib": GIB, "gb": 10**9, "g": GIB, "mib": 1024**2, "mb": 10**6, "m": 1024**2, "": GIB}
    value = text.strip().lower()
    number = value.rstrip("gibm")
    unit = value[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        raise InputError(f"cannot read the budget {text!r}; write it like 8GiB or 7500MiB") from None
    if unit not in units or amount <= 0:
        raise InputError(f"cannot read the budget {text!r}; write it like 8GiB or 7500MiB")
    return int(amount * units[unit])


def describe_choice(choice: Choice, budget_bytes: int) -> str:
    """The plan and its predictions, for `cosmos3-offload plan` and the run summary."""
    p = choice.prediction
    return "\n".join(
        [
            f"plan for a {budget_bytes / GIB:.1f} GiB budget: {choice.plan.describe()}",
            "predicted peak: "
            + (f"encode {p.encode_peak / GIB:.2f} GiB, " if p.encode_peak else "")
            + f"prefill {p.prefill_peak / GIB:.2f} GiB, denoise {p.denoise_peak / GIB:.2f} GiB, "
            f"decode {p.decode_peak / GIB:.2f} GiB",
            f"predicted time: prefill {p.prefill_s:.2f} s, {p.step_s:.3f} s per step, decode {p.decode_s:.1f} s, "
            f"total {p.total_s:.1f} s",
        ]
    )
