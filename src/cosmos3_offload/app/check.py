"""`cosmos3-offload check DIR`: the loader's validation of a checkpoint folder, run without loading,
and what the folder holds.

Every problem is collected (`loading.checkpoint.inspect_checkpoint`), not only the first one the
loader stops at: missing or stray shards, damaged headers, shard indexes that name absent weights,
weights of the wrong shape or dtype for the config, unknown class names, configs the model classes
reject, configs claiming sizes their shards do not hold, names that are no regular files (a FIFO, a
link to /dev/zero), folders that are not Cosmos3 at all; the pipeline options (with the scheduler
config they sample with), the default negative prompts and the tokenizer are read by the functions a
run reads them with, so `check` passes exactly what `generate` accepts. A good folder gets a report:
model size, towers, sound and action heads, stored dtypes, the bytes of each weight group as loaded,
and which placements fit this machine for the checkpoint's default request. Only JSON files,
tokenizer files and safetensors headers are read (never a weight, a pickle or `vision_encoder/`);
nothing is written.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer
from transformers import AutoTokenizer

from ..errors import InputError, first_line
from ..loading.checkpoint import CheckpointContents, group_rule, inspect_checkpoint
from ..loading.files import dtype_name, read_json
from ..loading.layout import SOUND_TOKENIZER, default_negative_prompt, pipeline_options
from ..loading.quantization import describe_quantization
from ..loading.sizes import model_sizes
from ..model.actions import ACTION_WIDTHS
from ..model.groups import EMBEDDING, GENERATOR, REASONER, SOUND, UNUSED, VAE, VAE_ENCODER
from ..model.specs import MODEL_SPECS, model_spec
from ..offload.materialize import build_on_meta, group_layouts, keep_fp32_dtype
from ..planning.memory import weight_bytes
from ..planning.plan import Plan
from ..planning.request import DeviceProfile, Request
from ..planning.search import choose_plan, least_budget, predict
from ..planning.sizes import ModelSizes
from ..request.spec import DEFAULT_FRAMES, RequestSpec, request_defaults
from ..units import format_budget, format_bytes
from .feasibility import device_free_bytes, host_available_bytes
from .planned_request import request_of

# The config keys that tell the registered sizes apart.
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


class CheckpointProblems(InputError):
    """Everything wrong with a checkpoint folder, one problem a line; the message is the first."""

    def __init__(self, problems: list[str]):
        super().__init__(problems[0])
        self.problems = problems


@dataclass(frozen=True)
class Machine:
    """What this machine offers a plan: the GPU's name and free bytes (None: no GPU), the host's."""

    gpu: str | None
    gpu_free: int | None
    host_available: int | None

    @classmethod
    def here(cls) -> Machine:
        if not torch.cuda.is_available():
            return cls(None, None, host_available_bytes())
        device = torch.device("cuda", torch.cuda.current_device())
        name = f"{torch.cuda.get_device_name(device)} ({device})"
        return cls(name, device_free_bytes(device), host_available_bytes())


def check_folder(path: Path, machine: Machine | None = None) -> str:
    """The report on a good checkpoint folder; CheckpointProblems listing every problem otherwise."""
    try:
        with warnings.catch_warnings():  # diffusers' deprecation notes as models are built: not the folder's fault
            warnings.simplefilter("ignore", FutureWarning)
            contents = inspect_checkpoint(path)
        problems = contents.problems + (_run_problems(path) if contents.pipeline else [])
    except OSError as error:  # a file or folder inside it we may not read
        raise CheckpointProblems([f"checkpoint {str(path)!r} cannot be read: {error.strerror or error}"]) from None
    if problems:
        raise CheckpointProblems(list(dict.fromkeys(problems)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return describe(path, contents, machine or Machine.here())


def _run_problems(path: Path) -> list[str]:
    """What a run reads besides the models, read by the run's own functions: the pipeline options (and the
    scheduler config they sample with), the default negative prompts of a video with and without
    conditioning, and the tokenizer."""
    problems = []
    frames = DEFAULT_FRAMES  # a video: the requests that get a default negative prompt
    checks = [
        functools.partial(pipeline_options, path),
        *(
            functools.partial(default_negative_prompt, path, frames=frames, conditioned=conditioned)
            for conditioned in (False, True)
        ),
    ]
    for check in checks:
        try:
            check()
        except InputError as error:
            problems.append(str(error))
    if (path / "text_tokenizer").is_dir():
        try:
            AutoTokenizer.from_pretrained(path / "text_tokenizer")
        except Exception as error:  # transformers raises many kinds of errors for a folder it cannot use
            problems.append(f"the tokenizer in {str(path / 'text_tokenizer')!r} cannot be loaded: {first_line(error)}")
    return problems


def describe(path: Path, contents: CheckpointContents, machine: Machine) -> str:
    """The report: what the folder holds and which plans fit `machine`."""
    config = contents.configs["transformer"]
    quantization = contents.quantization
    sizes = model_sizes(config, contents.configs["vae"], dtype_bytes=2, quantization=quantization)
    sigmas = pipeline_options(path).distilled_sigmas
    lines = [
        f"checkpoint {str(path)!r}: a Cosmos3 pipeline; every check passed",
        f"model: {_size_name(config)} (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"{config['num_attention_heads']} heads, {config['num_key_value_heads']} KV heads, "
        f"vocabulary {config['vocab_size']})",
        "parameters: " + ", ".join(f"{part} {_count(_numel(w))}" for part, w in contents.weights.items()),
        f"towers: reasoner and generator, {config['num_hidden_layers']} layers each (the reasoner runs once "
        "per prompt, the generator every step)",
        "heads: " + _heads(path, config),
        "stored: " + "; ".join(_stored(part, w) for part, w in contents.weights.items()),
        _scheduler(path),
        describe_quantization(config, quantization),
        f"groups, as loaded ({'FP8 linears, the rest ' if quantization.quantized else ''}bf16): "
        + _groups(sizes, contents),
        *_plans(sizes, machine, None if sigmas is None else len(sigmas)),
    ]
    return "\n".join(lines)


def _size_name(config: dict) -> str:
    for name, spec in MODEL_SPECS.items():
        if all(spec.transformer.get(key) == config.get(key) for key in SIZE_KEYS):
            return f"{name} size"
    return "a size not in the registry (" + ", ".join(MODEL_SPECS) + ")"


def _numel(weights) -> int:
    return sum(torch.Size(t.shape).numel() for t in weights.tensors.values())


def _count(numel: int) -> str:
    return f"{numel / 1e9:.2f} B" if numel >= 1e8 else f"{numel / 1e6:.2f} M" if numel >= 1e5 else f"{numel:,}"


def _heads(path: Path, config: dict) -> str:
    sound, action = "no sound", "no action"
    if config.get("sound_gen"):
        decoder = (
            "decoded by sound_tokenizer/ with --sound" if (path / SOUND_TOKENIZER).is_dir() else "no sound_tokenizer/"
        )
        sound = f"sound (sound_dim {config.get('sound_dim')}; {decoder})"
    if config.get("action_gen"):
        dim = config.get("action_dim", 0)
        domains = sum(1 for width in ACTION_WIDTHS.values() if width <= dim)
        action = (
            f"action (action_dim {dim}; loaded with the generator for --action forward_dynamics, inverse_dynamics "
            f"or policy, {format_bytes(_head_bytes(config))}; {domains} domains fit, each action adds one token)"
        )
    return f"{sound}, {action}"


def _head_bytes(config: dict) -> int:
    """Bytes (bf16) the action heads add to the generator when an action run loads them."""
    vae = model_spec("tiny").vae  # the heads' bytes do not depend on the VAE
    with_heads, without = (model_sizes(config, vae, dtype_bytes=2, actions=on) for on in (True, False))
    return with_heads.towers[GENERATOR].whole.packed - without.towers[GENERATOR].whole.packed


def _stored(part: str, weights) -> str:
    """`transformer 6 files, 30.31 GiB: bf16` with every stored dtype and its share."""
    files = {t.file for t in weights.tensors.values()}
    by_dtype: Counter[str] = Counter()
    for tensor in weights.tensors.values():
        by_dtype[tensor.dtype] += tensor.nbytes
    dtypes = ", ".join(f"{dtype_name(d)} {format_bytes(n)}" for d, n in by_dtype.most_common())
    return f"{part} {len(files)} file(s): {dtypes}"


def _scheduler(path: Path) -> str:
    file = path / "scheduler" / "scheduler_config.json"
    name = read_json(file, "scheduler config").get("_class_name", "?") if file.is_file() else "none (UniPC defaults)"
    sigmas = pipeline_options(path).distilled_sigmas
    return f"scheduler: {name}" + (f"; distilled: a fixed {len(sigmas)}-step schedule" if sigmas else "")


def _groups(sizes: ModelSizes, contents: CheckpointContents) -> str:
    groups = {
        EMBEDDING: sizes.embedding.payload,
        REASONER: sizes.towers[REASONER].whole.payload,
        GENERATOR: sizes.towers[GENERATOR].whole.payload,
        VAE: sizes.vae.payload,
        VAE_ENCODER: sizes.vae_encoder.payload,
    }
    if SOUND_TOKENIZER in contents.configs:
        groups[SOUND] = _sound_bytes(contents.configs[SOUND_TOKENIZER])
    never = sum(
        t.nbytes
        for part, w in contents.weights.items()
        if part in contents.configs
        for key, t in w.tensors.items()
        if group_rule(part, contents.configs[part])(key) == UNUSED
    )
    return ", ".join(f"{g} {format_bytes(n)}" for g, n in groups.items()) + f"; never read: {format_bytes(never)}"


def _sound_bytes(config: dict) -> int:
    layouts = group_layouts(
        build_on_meta(Cosmos3AVAEAudioTokenizer, config),
        group_rule(SOUND_TOKENIZER, config),
        keep_fp32_dtype(Cosmos3AVAEAudioTokenizer, torch.bfloat16),
    )
    return layouts[SOUND].payload_bytes if SOUND in layouts else 0


def _plans(sizes: ModelSizes, machine: Machine, distilled_steps: int | None = None) -> list[str]:
    """All resident, all staged and the planner's pick for the default request on `machine` (a distilled
    checkpoint's: its own step count, guidance 1)."""
    default = RequestSpec(prompt="(the default request)", **request_defaults(distilled_steps=distilled_steps))
    request = request_of(default)
    profile = DeviceProfile()
    lines = [
        f"plans for the default request ({default.width}x{default.height}, {default.frames} frames, "
        f"{default.steps} steps, guidance {default.guidance:g}; bf16, {profile.h2d_GBps:g} GB/s host-to-device "
        "assumed):"
    ]
    for name, plan in (("all resident", Plan()), ("all staged", Plan.from_offload([REASONER, GENERATOR, VAE]))):
        lines.append(f"  {name}: " + _needs(plan, sizes, request, profile, machine))
    if machine.gpu is None:
        least = least_budget(sizes, request, profile)
        lines.append(
            f"  this machine: no GPU (host {_maybe(machine.host_available)} available); the planner's "
            f"placements need a GPU budget of at least {format_budget(least)}"
        )
        return lines
    lines.append(f"  this machine: {machine.gpu}, {_maybe(machine.gpu_free)} free")
    try:
        choice = choose_plan(sizes, request, machine.gpu_free, profile)
    except InputError as error:  # nothing fits: the message says the least budget that would
        return [*lines, f"  the planner's pick: none; {error}"]
    lines.append(
        f"  the planner's pick for {format_budget(machine.gpu_free)}: {choice.plan.describe()} "
        f"(peak {format_bytes(choice.prediction.peak)}, {choice.prediction.times.total:.0f} s predicted)"
    )
    return lines


def _needs(plan: Plan, sizes: ModelSizes, request: Request, profile: DeviceProfile, machine: Machine) -> str:
    """A plan's predicted GPU peak and pinned host bytes, and whether `machine` holds them."""
    peak = predict(plan, sizes, request, profile).peak
    weights = weight_bytes(plan, sizes)
    host = weights.pinned + weights.host
    text = f"GPU peak {format_bytes(peak)}" + (f", host {format_bytes(host)}" if host else "")
    if machine.gpu is None:
        return text
    fits = machine.gpu_free is not None and peak <= machine.gpu_free
    fits = fits and (machine.host_available is None or host <= machine.host_available)
    return text + (": fits" if fits else ": does not fit")


def _maybe(value: int | None) -> str:
    return "unknown" if value is None else format_bytes(value)


__all__ = ["CheckpointProblems", "Machine", "check_folder", "describe"]
