"""Memory of a plan: where its weights sit (device, host), and each part of the request's device peak.

Weight bytes are exact (they come from the loader's own slab packing, see `sizes`): the engine
allocates what `weight_bytes` says, which the tests check on the CPU. Host memory (`host_memory`)
follows from them. Activation, decode and
encode working sets are models fitted on an H200 (2026-11-26):

- generator layer: `ACTIVATION_HIDDENS` live [tokens, hidden] tensors besides the MLP's
  (benchmarks/results/staging-ours-H200-2026-11-26.json and the resident rows of
  streaming-H200-2026-11-26.json);
- tiled decode: (DECODE_LIVE_BASE + DECODE_LIVE_PER_FRAME x frames a pass) one-frame tensors of the
  largest block input of a tile, the tile's causal caches, DECODE_FIXED_BYTES, x DECODE_SLACK
  (decode-H200-2026-11-26.json);
- encode of conditioning frames: two points, 1 and 5 frames at 720p (same file);
- an exact preview (`Request.preview_frames`): one latent frame's decode in the plan's tiles, after a denoising
  step has freed its activations; what a step cache holds stays beside it. Its VAE is resident (the planner
  offers no other placement for it, see search.py), so its weights are in the resident bytes.

With a parallel request (`Request.parallel`) the device figures are one GPU's: every GPU holds the
weights its plan places, the reasoner memory of its own CFG branches and the activations of its
branches over its share of the tokens (see `activation_bytes`); host memory is one host's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..model.geometry import latent_size
from ..model.groups import EMBEDDING, GENERATOR, REASONER, SOUND, VAE, VAE_ENCODER
from ..units import MIB
from .plan import BOUNCE_SLOTS, Mode, Plan
from .request import Request
from .sizes import ModelSizes
from .tiles import DecoderBlock, TileGrid, block_region

ACTIVATION_HIDDENS = 7.5
DECODE_LIVE_BASE = 8.0
DECODE_LIVE_PER_FRAME = 7.5
DECODE_FIXED_BYTES = 100 * MIB
DECODE_SLACK = 1.1  # the allocator's rounding and caching on top of the decode's tensors (from budget runs)
# Fewer frames through an up block at once: the same work in smaller pieces (fitted on the H200).
DECODE_FRAME_SLOWDOWN = {1: 1.33, 2: 1.13, 4: 1.0}
# Live [channels, samples] tensors of the sound decoder's full-rate stage (a residual unit's input,
# its two convolutions' outputs and the upsampled input): an estimate from its structure, not measured.
SOUND_DECODE_LIVE = 4
FP8_QUANTIZE_CHUNK_ROWS = 4096  # quant/fp8.py's QUANTIZE_CHUNK_ROWS (the planner imports no torch)
ENCODE_BYTES_PER_PIXEL = 390
ENCODE_BYTES_PER_PIXEL_FRAME = 900


@dataclass(frozen=True)
class WeightBytes:
    """Where a plan puts the weights, in bytes: exactly what the engine allocates for them."""

    resident: int  # device bytes held for the whole run
    arena: dict[str, int]  # arena bytes each group needs while it is in use
    pinned: int  # page-locked host slabs: staged groups, streamed layers, mapped towers' bounce rings
    host: int  # host slabs never copied (the embedding table when the reasoner is staged or streamed)
    # Read from the checkpoint's files (page cache): a mapped tower's streamed layers, and the
    # embedding table with the reasoner mapped. Counted in the run's dtype (see `host_memory`).
    mapped: int = 0

    @property
    def arena_peak(self) -> int:
        return max(self.arena.values(), default=0)


@dataclass(frozen=True)
class HostMemory:
    """Host memory of a plan's weights, in bytes. `pinned` and `private` are the process's own
    (anonymous) memory, what a host budget bounds; `page_cache` is the checkpoint's file pages that
    mapped layers are read from, which the kernel can drop and read again."""

    pinned: int
    page_cache: int
    private: int

    @property
    def held(self) -> int:
        return self.pinned + self.private


def host_memory(plan: Plan, sizes: ModelSizes) -> HostMemory:
    """Pinned, page-cache and private host bytes of the weights under `plan`, per host: the GPUs of one
    host all read one shared copy of the slabs, so the figure does not grow with the GPU count. The
    files are assumed to store the run's dtype (as a bf16 checkpoint does for a bf16 run); where they
    store another, mapped layers are read from that many file bytes, and the embedding table is a
    private cast copy."""
    weights = weight_bytes(plan, sizes)
    return HostMemory(pinned=weights.pinned, page_cache=weights.mapped, private=weights.host)


def weight_bytes(plan: Plan, sizes: ModelSizes) -> WeightBytes:
    """Resident, arena and host bytes of the weights under `plan` (the same value for every plan with
    the same placements: the planner asks for each placement under many chunk and tile choices)."""
    reasoner, generator, vae = plan.reasoner, plan.generator, plan.vae
    # The planner's candidates share their group plans' objects: look them up by identity first (cheap; an id is
    # only trusted while its object is the one remembered), then by value.
    ids = (id(reasoner), id(generator), id(vae))
    known = sizes.weight_bytes_memo.get(ids)
    if known is not None and known[0] is reasoner and known[1] is generator and known[2] is vae:
        return known[3]
    groups = (reasoner, generator, vae)
    if groups not in sizes.weight_bytes_memo:
        sizes.weight_bytes_memo[groups] = _weight_bytes(plan, sizes)
    weights = sizes.weight_bytes_memo[groups]
    sizes.weight_bytes_memo[ids] = (reasoner, generator, vae, weights)
    return weights


def _weight_bytes(plan: Plan, sizes: ModelSizes) -> WeightBytes:
    resident = pinned = host = mapped = 0
    arena: dict[str, int] = {}
    for name, tower in sizes.towers.items():
        how = plan.group(name)
        if how.mode is Mode.RESIDENT:
            resident += tower.whole.payload
            arena[name] = 0
        elif how.mode is Mode.STAGED:
            arena[name] = tower.whole.packed
            pinned += tower.whole.packed
        else:
            kept_layers = set(how.resident_layers)
            kept = [tower.layers[i] for i in how.resident_layers]
            streamed = [g for i, g in enumerate(tower.layers) if i not in kept_layers]
            resident += tower.head.payload + sum(g.payload for g in kept)
            slot = max((g.slot for g in streamed), default=0)
            arena[name] = how.ring * slot
            if how.mode is Mode.MAPPED:
                pinned += BOUNCE_SLOTS * slot
                mapped += sum(g.payload for g in streamed)
            else:
                pinned += sum(g.packed for g in streamed)
    if plan.reasoner.mode is Mode.RESIDENT:
        resident += sizes.embedding.payload
    elif plan.reasoner.mode is Mode.MAPPED:
        mapped += sizes.embedding.payload  # read on the host, in place in the file
    else:
        host += sizes.embedding.packed
    vae_side = [(VAE, sizes.vae), (VAE_ENCODER, sizes.vae_encoder)] + (
        [(SOUND, sizes.sound)] if sizes.sound.payload else []
    )
    for name, group in vae_side:
        staged = plan.group(name).mode is Mode.STAGED
        resident += 0 if staged else group.payload
        arena[name] = group.packed if staged else 0
        pinned += group.packed if staged else 0
    assert EMBEDDING not in arena
    return WeightBytes(resident=resident, arena=arena, pinned=pinned, host=host, mapped=mapped)


@dataclass(frozen=True)
class Peaks:
    """Peak device bytes of each part of a request (encode is 0 without conditioning frames)."""

    encode: int
    prefill: int
    denoise: int
    decode: int

    @property
    def peak(self) -> int:
        return max(self.encode, self.prefill, self.denoise, self.decode)


def peaks(plan: Plan, sizes: ModelSizes, request: Request, search: dict | None = None) -> Peaks:
    """Resident weights + the arena of the part's own group + the reasoner memory + activations (the
    engine sizes the arena for the group in use; see offload/engine.py). `search`: a dict the planner keeps for
    one search (one request, its candidates alive), where the parts its candidates share are computed once."""
    search = {} if search is None else search
    weights = weight_bytes(plan, sizes)
    arena = weights.arena
    key = ("peaks", id(plan.decode_grid), plan.mlp_chunk)  # the grids are shared objects (search.DECODE_GRIDS)
    if key not in search:
        search[key] = _activations(plan, sizes, request)
    memory, prompt, step, decoders = search[key]
    encode = weights.resident + arena[VAE_ENCODER] + encode_bytes(request) if request.encode_frames else 0
    return Peaks(
        encode=encode,
        prefill=weights.resident + arena[REASONER] + memory + prompt,
        denoise=weights.resident + arena[GENERATOR] + memory + step,
        decode=weights.resident + max(arena[VAE], arena.get(SOUND, 0)) + decoders,
    )


def _activations(plan: Plan, sizes: ModelSizes, request: Request) -> tuple[int, int, int, int]:
    """(the reasoner memory, the prefill's activations, the denoise's between and within steps, the decoders')
    under `plan`'s MLP chunk and tile grid: what a part holds besides the weights."""
    memory = reasoner_memory_bytes(sizes, request)
    decode_bytes, _ = decode_bytes_and_share(sizes, plan.decode_grid, request.height, request.width)
    decoders = max(decode_bytes, sound_decode_bytes(sizes, request))  # the video's, then the sound's
    # Between two steps an exact preview decodes: the step's activations are gone, a step cache's are not.
    step = max(activation_bytes(sizes, request, chunk=plan.mlp_chunk), preview_decode_bytes(sizes, plan, request))
    return memory, activation_bytes(sizes, request, prompt=True, chunk=None), step, decoders


def preview_decode_bytes(sizes: ModelSizes, plan: Plan, request: Request) -> int:
    """Device bytes of an exact preview between two denoising steps besides the weights (0 without one): one
    latent frame decoded in the plan's tiles (the frames are decoded one after another), beside what a step
    cache holds through the whole denoise."""
    if not request.preview_frames:
        return 0
    decode, _ = decode_bytes_and_share(sizes, plan.decode_grid, request.height, request.width)
    held = request.rank_branches * request.cached_hiddens * request.rank_tokens * sizes.hidden * sizes.dtype_bytes
    return decode + held


def sound_decode_bytes(sizes: ModelSizes, request: Request) -> int:
    """Device bytes of decoding the audio track besides the weights (0 without sound); it runs after
    the video's decode has freed its tensors, so the decode part holds the larger of the two."""
    return SOUND_DECODE_LIVE * sizes.sound_channels * request.sound_samples * sizes.dtype_bytes


def reasoner_memory_bytes(sizes: ModelSizes, request: Request) -> int:
    """The prefill's keys and values, every layer, every branch this GPU runs (all heads: a branch's
    memory is replicated on each of its sequence-parallel GPUs, which read their block of heads)."""
    per_token = 2 * sizes.layers * sizes.kv_heads * sizes.head_dim * sizes.dtype_bytes
    return per_token * request.prompt_tokens * request.rank_branches


def activation_bytes(sizes: ModelSizes, request: Request, *, prompt: bool = False, chunk: int | None = None) -> int:
    """Live activations of one layer on one GPU: the prompts of its branches (prefill, whole on every
    GPU) or its branches' video tokens (denoise). With sequence-parallel see `_sequence_parallel_bytes`."""
    if prompt:
        return _layer_bytes(sizes, request, request.prompt_tokens * request.rank_branches, None, prompt=True)
    layer = _layer_bytes(sizes, request, request.rank_tokens, chunk, prompt=False)
    return layer if request.parallel.sequence == 1 else _sequence_parallel_bytes(sizes, request, layer)


def _sequence_parallel_bytes(sizes: ModelSizes, request: Request, layer: int) -> int:
    """One GPU's denoise activations under Ulysses of degree s over T tokens: `layer` (the per-token
    working set over its T/s rows) plus
    - the exchanged q, k, v [T, (heads + 2 kv_heads)/s, head_dim], which live beside the rank's own
      rows until the last of the three exchanges is done;
    - one all-to-all's send and receive buffers of the largest tensor exchanged (q or the attention
      output, [T/s, heads, head_dim] each);
    - each branch's whole sequence [T, hidden]: embedded before the rows are split (alive through the
      first layer, and through all of them under a step cache, whose inputs are views of it);
    or, if larger, the gather before the read-out: each branch's joined rows beside the parts
    received (every rank's rows) and the rank's own rows."""
    s, t, nbytes = request.parallel.sequence, request.tokens, sizes.dtype_bytes
    rows = request.rank_tokens
    attention_width = sizes.heads * sizes.head_dim
    exchanged = t * (sizes.heads + 2 * sizes.kv_heads) // s * sizes.head_dim * nbytes
    buffers = 2 * rows * attention_width * nbytes
    whole = request.rank_branches * t * sizes.hidden * nbytes
    gather = ((request.rank_branches + 1) * t + request.rank_branches * rows) * sizes.hidden * nbytes
    return max(layer + exchanged + buffers + whole, gather)


def _layer_bytes(sizes: ModelSizes, request: Request, tokens: int, chunk: int | None, *, prompt: bool) -> int:
    """The fitted working set of one layer over `tokens` rows of this GPU's branches."""
    branches = request.rank_branches
    mlp_tokens = tokens if chunk is None else min(tokens, chunk)
    mlp = sizes.mlp_mats * mlp_tokens * sizes.intermediate * sizes.dtype_bytes
    if sizes.fp8:
        # W8A8: the FP8 copy of a linear's largest input (the attention projections' over every token,
        # or the MLP down projection's over a chunk), plus a chunk of it scaled in float32 where it is
        # not fused (quant/fp8.py); W8A16: the largest weight dequantized.
        widest = max(tokens * sizes.hidden, mlp_tokens * sizes.intermediate)
        scaled_chunk = FP8_QUANTIZE_CHUNK_ROWS * sizes.intermediate * 4
        mlp += max(widest + scaled_chunk, sizes.dequantized_bytes)
    held = 0 if prompt else branches * request.cached_hiddens  # a step cache's residuals and inputs (its rows)
    return int((ACTIVATION_HIDDENS + branches - 2 + held) * tokens * sizes.hidden * sizes.dtype_bytes + mlp)


def encode_bytes(request: Request) -> int:
    """Device bytes of encoding the conditioning frames besides the weights. The causal encoder takes
    the first frame alone and then chunks of up to 4, so the working set follows the largest chunk."""
    chunk = min(4, max(1, request.encode_frames - 1))
    return int(request.height * request.width * (ENCODE_BYTES_PER_PIXEL + ENCODE_BYTES_PER_PIXEL_FRAME * chunk))


def decode_bytes_and_share(sizes: ModelSizes, grid: TileGrid, height: int, width: int) -> tuple[int, float]:
    """(device bytes besides the weights, time relative to an untiled decode) of decoding
    `height` x `width` pixel frames in `grid`."""
    key = ("decode bytes", grid, height, width)
    if key not in sizes.decode_memo:  # hashing the blocks for the cache below costs more than the planner's work
        sizes.decode_memo[key] = _decode_bytes_and_share(
            sizes.decoder_blocks, sizes.dtype_bytes, grid, *latent_size(height, width)
        )
    return sizes.decode_memo[key]


def decode_rank_share(sizes: ModelSizes, grid: TileGrid, height: int, width: int, ranks: int) -> float:
    """The share of the tile work (up blocks and head, halos included) that the busiest of `ranks`
    GPUs does when rank r decodes tiles r, r + ranks, ... of `grid` (as the runner deals them). A grid
    with fewer tiles than GPUs leaves some idle: a single tile is all on one."""
    return _decode_rank_share(sizes.decoder_blocks, grid, *latent_size(height, width), ranks)


@functools.lru_cache(maxsize=4096)
def _decode_rank_share(blocks: tuple[DecoderBlock, ...], grid: TileGrid, height: int, width: int, ranks: int) -> float:
    frame = (height, width)

    def work(tile) -> float:
        regions = (block_region(b, tile, frame) for b in blocks)
        return sum(
            b.macs * (bottom - top) * (right - left) / b.scale**2
            for b, (top, bottom, left, right) in zip(blocks, regions)
        )

    tiles = [work(tile) for tile in grid.tiles(height, width)]
    return max(sum(tiles[rank::ranks]) for rank in range(ranks)) / sum(tiles)


@functools.lru_cache(maxsize=4096)
def _decode_bytes_and_share(
    blocks: tuple[DecoderBlock, ...], nbytes: int, grid: TileGrid, height: int, width: int
) -> tuple[int, float]:
    """The largest tile's causal caches (two frames per cached convolution) plus its live activations
    plus allocator slack; work = every block's multiply-adds over the areas its tiles cover, halos
    included, times the slowdown of passing `grid.frames` frames at once. Sizes in latent pixels."""
    frame = (height, width)
    tiles = grid.tiles(height, width)

    def area(block: DecoderBlock, tile) -> int:
        top, bottom, left, right = block_region(block, tile, frame)
        return (bottom - top) * (right - left)

    peak = 0.0
    for tile in tiles:
        caches = sum(2 * b.cache_channels * area(b, tile) for b in blocks)
        live = max(b.in_channels * area(b, tile) for b in blocks)
        peak = max(peak, (caches + (DECODE_LIVE_BASE + DECODE_LIVE_PER_FRAME * grid.frames) * live) * nbytes)
    work = sum(b.macs * sum(area(b, t) for t in tiles) / (b.scale**2 * height * width) for b in blocks)
    slowdown = DECODE_FRAME_SLOWDOWN.get(grid.frames, 1.0)
    return int((peak + DECODE_FIXED_BYTES) * DECODE_SLACK), work / sum(b.macs for b in blocks) * slowdown
