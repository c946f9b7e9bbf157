"""`cosmos3-offload`: parse flags, build a config, call the library, print the report.

Bad input ends in one line on stderr, exit status 2 and no output file; an interrupt (Ctrl-C or
SIGTERM) in one line, exit status 130 (143 for SIGTERM) and no output file. Every flag (and
WORLD_SIZE) is checked before anything is measured or loaded, whichever command reads it. What the
user typed is quoted back escaped: an error stays one line, and bytes that are not UTF-8 (which
Python hands over as surrogates) are printed as escapes instead of failing the print.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from ..errors import InputError
from ..kernels.probe import ATTENTION_CHOICES
from ..loading.components import model_configs
from ..loading.files import check_checkpoint
from ..loading.layout import has_sound_tokenizer, pipeline_options, sound_config, sound_samples
from ..loading.quantization import (
    MODES,
    QUANTIZE_CHOICES,
    SCALE_CHOICES,
    Fp8Options,
    describe_quantization,
    quantization_for,
)
from ..loading.sizes import model_sizes
from ..model.geometry import frames_to_encode
from ..model.specs import MODEL_SPECS, model_spec
from ..model.tiers import ASPECT_RATIOS, DEFAULT_SHIFT, RESOLUTION_TIERS, frame_size
from ..parallel.mesh import Environment
from ..planning.parallel import CFG_PARALLEL_CHOICES, MAX_GPUS, ParallelLayout
from ..planning.plan import Plan
from ..planning.request import Request, parse_budget
from ..planning.search import choose_plan, describe_choice
from .check import CheckpointProblems, check_folder
from .config import (
    COMPILE_CHOICES,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_RESOLUTION,
    DEFAULT_STEPS,
    DTYPES,
    MAX_FPS,
    MAX_H2D_GBPS,
    MIN_FPS,
    MIN_H2D_GBPS,
    STEP_CACHES,
    GenerationConfig,
    KernelOptions,
    check_cache,
    check_input_folder,
    check_number,
    check_request,
    resolve_device,
    resolve_dtype,
)
from .console import PROG, printable
from .device_profile import device_setup, probe_shape
from .distributed import layout_for, rank_device
from .feasibility import cached_hiddens
from .runner import LoadedModel, run
from .samples import FLAG_FIELDS, run_samples
from .serve_settings import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_STORAGE,
    RequestLimit,
    Serve,
    ServeSettings,
)

# Without a checkpoint the embedded tiny model runs on any CPU; Cosmos3's 720p x 189-frame
# default would take it minutes, so it defaults to the smallest tier and a short clip.
TINY_DEFAULTS = {"resolution": 256, "frames": 17}
CHECKPOINT_DEFAULTS = {"resolution": DEFAULT_RESOLUTION, "frames": DEFAULT_FRAMES}
DEFAULT_CONDITION_FRAMES = (0, 1)


def _say(text: str) -> None:
    """Print a report on stdout, whatever bytes the user's paths hold."""
    print(printable(text, sys.stdout, one_line=False))


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.fail(2, f"error: {message}")

    def fail(self, status: int, message: str) -> None:
        """Exit with `status` after one line on stderr: the program's name and `message`, escaped."""
        self.exit(status, printable(f"{self.prog}: {message}", sys.stderr, one_line=True) + "\n")

    def fail_each(self, status: int, messages: list[str]) -> None:
        """Exit with `status` after one line on stderr for each message, as `fail` writes it."""
        self.exit(status, "".join(printable(f"{self.prog}: {m}", sys.stderr, one_line=True) + "\n" for m in messages))


def _request_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that describe the video and the model, shared by `generate` and `plan`."""
    parser.add_argument(
        "--image", type=Path, default=None, help="image-to-video: this image (resized, centre-cropped) is frame 0"
    )
    parser.add_argument(
        "--video",
        type=Path,
        default=None,
        help="video-to-video: this clip's first frames condition the latent frames of --condition-frames",
    )
    parser.add_argument(
        "--condition-frames",
        type=int,
        nargs="+",
        default=None,
        metavar="INDEX",
        help="with --video: latent frame indexes the clip keeps clean; latent frame k covers pixel frames "
        "4k-3..4k (default: 0 1, the clip's first 5 frames)",
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        help="frame count: 1 (an image) or 4k+1, e.g. 93 or 189; other counts are refused "
        "(default: 189, or 17 with the embedded tiny model)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help=f"resolution tier, one of {', '.join(map(str, RESOLUTION_TIERS))} "
        "(default: 720, or 256 with the embedded tiny model)",
    )
    parser.add_argument("--aspect-ratio", default="16,9", help=f"one of {' '.join(ASPECT_RATIOS)} (default: 16,9)")
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: 35; a distilled checkpoint's own count)"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale; 1 skips the unconditional pass (default: 6; 1 for a distilled "
        "checkpoint, whose guidance is baked in)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a diffusers-layout Cosmos3 folder (model_index.json, transformer/, vae/, text_tokenizer/); "
        "without it, random weights of --model",
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help=f"model size for random weights when no --checkpoint is given: {', '.join(MODEL_SPECS)} (default: tiny)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    parser.add_argument(
        "--dtype",
        default=None,
        help=f"one of {', '.join(DTYPES)} (default: bfloat16 on a GPU, float32 on the CPU)",
    )
    parser.add_argument(
        "--vram-budget",
        default=None,
        metavar="SIZE",
        help="device memory to plan for, e.g. 8GiB: the planner picks the fastest placement that fits",
    )
    parser.add_argument(
        "--host-budget",
        default=None,
        metavar="SIZE",
        help="with --vram-budget: host memory (pinned + private) the weights may hold, e.g. 16GiB; with a "
        "--checkpoint the reasoner may then be mapped from its files (page cache) instead of pinned",
    )
    parser.add_argument("--fps", type=float, default=24.0, help="frames per second of the video (default: 24)")
    parser.add_argument(
        "--sound",
        action="store_true",
        help="generate the audio track too and mux it into the mp4 (a checkpoint with a sound_tokenizer/)",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=None,
        help="store the decoder layers' linears in FP8 as they load (half the bytes to hold and move); "
        "an FP8 checkpoint needs no flag",
    )
    parser.add_argument(
        "--fp8-mode",
        choices=MODES,
        default="auto",
        help="FP8 linears: 'policy' follows the checkpoint's step policy (W8A16 first and last steps, W8A8 "
        "between), 'w8a8' or 'w8a16' force one everywhere, 'auto' (default) is 'policy' on GPUs with FP8 "
        "tensor cores and 'w8a16' elsewhere",
    )
    parser.add_argument(
        "--fp8-scales",
        choices=SCALE_CHOICES,
        default="channel",
        help="with --quantize: one weight scale per output channel (default, closer to bf16) or per tensor",
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        default="auto",
        help="the attention implementation: 'auto' (default) measures the exact ones once per GPU and "
        "takes the fastest (the result is cached); 'diffusers' is diffusers' dispatcher; or name one",
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        default="auto",
        help="fuse each layer's norms, rotary, gating and residual adds with torch.compile; 'auto' "
        "(default) is on for a GPU and off on the CPU",
    )
    parser.add_argument(
        "--cache",
        choices=STEP_CACHES,
        default="none",
        help="'seacache' skips the generator's layers on steps whose latents barely moved and reuses its "
        "residual (diffusers' SeaCache for Cosmos3; not exact, so off by default); the summary says how "
        "many steps were computed",
    )
    parser.add_argument(
        "--cache-threshold",
        type=float,
        default=None,
        metavar="X",
        help="with --cache seacache: the accumulated change allowed before a step is computed again "
        "(default 0.25, diffusers' and NVIDIA's; 0 computes every step, larger reuses more)",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="run on N GPUs of this machine (one process each, started for you; or launch with "
        "`torchrun --nproc-per-node N -m cosmos3_offload generate ...`): the CFG branches side by side "
        "and each branch's tokens split over the rest (Ulysses); with --device cpu, N processes on the CPU",
    )
    parser.add_argument(
        "--cfg-parallel",
        choices=CFG_PARALLEL_CHOICES,
        default="auto",
        help="with several GPUs: run the conditional and unconditional branches on different GPUs; 'auto' "
        "(default) does when there are two branches and an even GPU count, 'on' demands it",
    )
    parser.add_argument(
        "--h2d-gbps",
        type=float,
        default=None,
        help="host-to-device bandwidth for the planner (default: measured on a GPU, 55 otherwise)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog=PROG, description="Run Cosmos3 omni video models on small GPUs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    gen = commands.add_parser(
        "generate",
        help="text-to-video (or text-to-image with --frames 1)",
        description="Generate a video (mp4) or, with --frames 1, an image (jpg/png) from a prompt.",
    )
    gen.add_argument("--prompt", default=None, help="what the video shows (or -i: sample files)")
    gen.add_argument(
        "-i",
        "--input",
        type=Path,
        nargs="+",
        default=None,
        metavar="FILE",
        help="sample files (.json, .jsonl) in cosmos-framework's format, instead of --prompt; "
        "flags typed on the command line override their values",
    )
    gen.add_argument(
        "-o", "--output-dir", type=Path, default=None, help="with -i: each sample is written to DIR/<name>/"
    )
    gen.add_argument(
        "--negative-prompt",
        default=None,
        help="what to steer away from (default: with a checkpoint, its assets/negative_prompt.json for a video, "
        "negative_prompt_i2v.json with --image/--video, as the Cosmos3 docs pass them; else empty)",
    )
    _request_arguments(gen)
    gen.add_argument(
        "--shift",
        type=float,
        default=None,
        help="flow shift of the UniPC schedule (default by tier: "
        + ", ".join(f"{t}: {s:g}" for t, s in DEFAULT_SHIFT.items())
        + ")",
    )
    gen.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same video on any device")
    gen.add_argument(
        "--output", type=Path, default=None, help="output file: .mp4, or .jpg/.png for one frame (default: output.mp4)"
    )
    gen.add_argument(
        "--offload-stages",
        nargs="*",
        default=[],
        metavar="STAGE",
        help="groups whose weights live in pinned host memory and are copied to the GPU only for their phase: "
        "any of reasoner, generator, vae (default: none, everything resident; not with --vram-budget)",
    )
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    gen.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and where")
    plan = commands.add_parser(
        "plan",
        help="print the plan --vram-budget would pick, with predicted memory and time, without running",
        description="Predict peak memory and time of candidate placements and print the fastest that fits.",
    )
    _request_arguments(plan)
    plan.set_defaults(verbose=False)
    _serve_parser(commands)
    check = commands.add_parser(
        "check",
        help="check a checkpoint folder without loading it and print what it holds",
        description="Run the loader's checks on a checkpoint folder (every problem, one line each, exit status 2) "
        "and print the model's size, heads, dtypes, group sizes and which plans fit this machine.",
    )
    check.add_argument("folder", type=Path, metavar="DIR", help="a diffusers-layout Cosmos3 folder")
    check.set_defaults(verbose=False)
    return parser


def _serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="keep the model loaded and serve an OpenAI-style video job API and a web page",
        description="Load the model once and serve POST/GET /v1/videos (a job queue, one job at a time), "
        "POST /v1/images/generations, GET /health and /metrics, and a web page at /. The request flags "
        "(--frames, --resolution, --aspect-ratio, --steps, --guidance, --fps, --cache) are the defaults of a "
        "request that leaves them out; with --vram-budget the plan is made for --frames and --resolution, "
        "and larger requests are refused.",
    )
    _request_arguments(serve)
    serve.add_argument(
        "--offload-stages",
        nargs="*",
        default=[],
        metavar="STAGE",
        help="as for generate: any of reasoner, generator, vae live in pinned host memory (not with --vram-budget)",
    )
    serve.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST}, this machine only)"
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0: a free one)")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("COSMOS3_API_KEY"),
        help="every API call must send 'Authorization: Bearer KEY' (default: $COSMOS3_API_KEY; unset: no key)",
    )
    serve.add_argument(
        "--queue-size",
        type=int,
        default=DEFAULT_QUEUE_SIZE,
        help=f"jobs that may wait behind the running one; one more is answered 429 (default: {DEFAULT_QUEUE_SIZE})",
    )
    serve.add_argument(
        "--storage",
        type=Path,
        default=DEFAULT_STORAGE,
        metavar="DIR",
        help=f"the job database and finished files, kept across restarts (default: ./{DEFAULT_STORAGE})",
    )
    serve.add_argument("--no-progress", action="store_true", help="hide the load's progress bar")
    serve.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and each request")


def _defaults(args: argparse.Namespace) -> dict:
    tiny = args.checkpoint is None and args.model.startswith("tiny")
    defaults = TINY_DEFAULTS if tiny else CHECKPOINT_DEFAULTS
    sigmas = _distilled_sigmas(args.checkpoint)
    steps, guidance = (DEFAULT_STEPS, DEFAULT_GUIDANCE) if sigmas is None else (len(sigmas), 1.0)
    return {
        "frames": defaults["frames"] if args.frames is None else args.frames,
        "resolution": defaults["resolution"] if args.resolution is None else args.resolution,
        "steps": steps if args.steps is None else args.steps,
        "guidance": guidance if args.guidance is None else args.guidance,
    }


def _distilled_sigmas(checkpoint: Path | None) -> tuple[float, ...] | None:
    """A distilled checkpoint's fixed schedule (its defaults: that many steps, guidance 1), else None.
    A --checkpoint that is no folder gives None here: `_check_flags` refuses it with its reason."""
    if checkpoint is None:
        return None
    try:
        check_input_folder("checkpoint", checkpoint, "")
    except InputError:
        return None
    return pipeline_options(checkpoint).distilled_sigmas


def _condition_frames(args: argparse.Namespace) -> tuple[int, ...]:
    return DEFAULT_CONDITION_FRAMES if args.condition_frames is None else tuple(args.condition_frames)


def _check_flags(args: argparse.Namespace) -> None:
    """The flags `generate` and `plan` share that no shape check covers, before anything is measured or
    loaded: a flag that is read is checked, and one that would be ignored is refused."""
    resolve_dtype(args.dtype, resolve_device(args.device))
    model_spec(args.model)  # --checkpoint overrides it, but a name that means nothing is still a typo
    if args.checkpoint is not None:
        check_input_folder("checkpoint", args.checkpoint, "pass a diffusers-layout Cosmos3 folder")
        try:
            check_checkpoint(args.checkpoint)
        except OSError as error:  # a file inside it we may not read, a name too long
            raise InputError(f"checkpoint {str(args.checkpoint)!r} cannot be read: {error.strerror}") from None
    if args.vram_budget is not None:
        parse_budget(args.vram_budget)
    if args.host_budget is not None:
        if args.vram_budget is None:
            raise InputError("--host-budget is planned together with a device budget; pass --vram-budget too")
        parse_budget(args.host_budget)
    if args.h2d_gbps is not None:
        check_number("h2d-gbps", args.h2d_gbps, MIN_H2D_GBPS, MAX_H2D_GBPS)
    check_number("fps", args.fps, MIN_FPS, MAX_FPS)
    if args.gpus is not None and not 1 <= args.gpus <= MAX_GPUS:
        raise InputError(f"--gpus must be 1 to {MAX_GPUS}, got {args.gpus}")
    if args.cfg_parallel != "auto" and args.gpus is None and not Environment.read().distributed:
        raise InputError(f"--cfg-parallel {args.cfg_parallel} applies to several GPUs; add --gpus N, or drop it")
    check_cache(args.cache, args.cache_threshold)
    _kernel_options(args)
    if args.sound and not has_sound_tokenizer(args.checkpoint):
        raise InputError("--sound needs a --checkpoint with a sound_tokenizer/ folder (Nano, Super)")
    if args.sound:
        sound_config(args.checkpoint)  # builds, with a usable sampling rate
    if args.condition_frames is not None and args.video is None:
        raise InputError("--condition-frames picks latent frames of a --video clip; pass --video too, or drop it")


def _config_from_args(args: argparse.Namespace) -> GenerationConfig:
    shape = _defaults(args)
    output = args.output if args.output is not None else Path("output.jpg" if shape["frames"] == 1 else "output.mp4")
    return GenerationConfig(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        aspect_ratio=args.aspect_ratio,
        shift=args.shift,
        fps=args.fps,
        seed=args.seed,
        output=output,
        image=args.image,
        video=args.video,
        condition_frames=_condition_frames(args),
        sound=args.sound,
        cache=args.cache,
        cache_threshold=args.cache_threshold,
        **shape,
    )


def _budget_choice(args: argparse.Namespace, frames: int, width: int, height: int):
    """The planner's pick for this request under --vram-budget (flags checked already)."""
    device = rank_device(resolve_device(args.device))
    # Plans are for a GPU: without --dtype they assume the GPU default (bfloat16), even when run on a CPU.
    dtype = resolve_dtype(args.dtype or ("bfloat16" if args.command == "plan" else None), device)
    budget = parse_budget(args.vram_budget)
    sound = sound_config(args.checkpoint) if args.sound else None  # the sound decoder, placed like the VAE
    transformer_config, vae_config = model_configs(args.checkpoint, args.model)
    quantization = quantization_for(args.checkpoint, transformer_config, _fp8(args))
    sizes = model_sizes(
        transformer_config, vae_config, dtype_bytes=dtype.itemsize, sound_config=sound, quantization=quantization
    )
    encode = frames_to_encode(
        image=args.image is not None, video=args.video is not None, condition_frames=_condition_frames(args)
    )
    shape = _defaults(args)
    cfg = shape["guidance"] != 1.0
    samples = 0 if sound is None else sound_samples(sound, frames, args.fps)
    ranks = args.gpus if args.gpus is not None else Environment.read().world_size
    layout = ParallelLayout.for_ranks(ranks, guidance=cfg, cfg_parallel=args.cfg_parallel)
    request = Request.for_video(
        frames,
        height,
        width,
        cfg=cfg,
        steps=shape["steps"],
        encode_frames=encode,
        sound_samples=samples,
        cached_hiddens=cached_hiddens(args.cache, args.cache_threshold),
        parallel=layout,
    )
    # Measured last: the probe and the copies it times are the first thing that touches the GPU.
    setup = device_setup(
        device, attention=args.attention, shape=probe_shape(transformer_config), dtype=dtype, h2d_GBps=args.h2d_gbps
    )
    profile = setup.profile
    # Only a checkpoint's files can be mapped, and only as they are stored (not with --quantize).
    mapped = args.checkpoint is not None and not quantization.on_load
    choice = choose_plan(sizes, request, budget, profile, host_budget=_host_budget(args), mapped=mapped)
    return choice, budget, profile


def _kernel_options(args: argparse.Namespace) -> KernelOptions:
    options = KernelOptions(attention=args.attention, compile=args.compile)
    device = resolve_device(args.device)
    options.check_available(device, resolve_dtype(args.dtype, device))
    return options


def _fp8(args: argparse.Namespace) -> Fp8Options:
    return Fp8Options(quantize=args.quantize, mode=args.fp8_mode, scales=args.fp8_scales)


def _host_budget(args: argparse.Namespace) -> int | None:
    return None if args.host_budget is None else parse_budget(args.host_budget)


def _plan_command(args: argparse.Namespace) -> None:
    if args.vram_budget is None:
        raise InputError("plan needs --vram-budget, e.g. --vram-budget 8GiB")
    shape = _defaults(args)
    check_request(
        **shape,
        aspect_ratio=args.aspect_ratio,
        image=args.image,
        video=args.video,
        condition_frames=_condition_frames(args),
    )
    _check_flags(args)
    width, height = frame_size(shape["resolution"], args.aspect_ratio)
    choice, budget, profile = _budget_choice(args, shape["frames"], width, height)
    _say(f"request: {width}x{height}, {shape['frames']} frames, {shape['steps']} steps")
    _say(f"device profile: {profile.source}")
    transformer_config, _ = model_configs(args.checkpoint, args.model)
    _say(describe_quantization(transformer_config, quantization_for(args.checkpoint, transformer_config, _fp8(args))))
    _say(describe_choice(choice, budget, _host_budget(args)))


def _generate_command(args: argparse.Namespace, argv: list[str] | None = None) -> int | None:
    if args.input is not None or args.output_dir is not None:
        return _samples_command(args, sys.argv[1:] if argv is None else argv)
    if args.prompt is None:
        raise InputError("generate needs --prompt 'what the video shows', or -i FILE... -o DIR for sample files")
    config = _config_from_args(args)
    _check_flags(args)
    if args.vram_budget is not None and args.offload_stages:
        raise InputError("pass either --vram-budget or --offload-stages, not both")
    plan = Plan.from_offload(args.offload_stages)
    environment = Environment.read()  # torchrun's variables, before a budget's bandwidth is measured
    if args.gpus is not None:
        return _launch_command(args, argv, environment, config)
    if args.vram_budget is not None:
        choice, budget, _ = _budget_choice(args, config.frames, config.width, config.height)
        if environment.rank == 0:
            _say(describe_choice(choice, budget, _host_budget(args)))
        plan = choice.plan
    report = run(
        config,
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        plan=plan,
        model=args.model,
        progress=not args.no_progress,
        budgeted=args.vram_budget is not None,
        fp8=_fp8(args),
        kernels=_kernel_options(args),
        cfg_parallel=args.cfg_parallel,
    )
    if report is not None:  # rank 0 (or the only process)
        _say(report.summary())


def _launch_command(
    args: argparse.Namespace, argv: list[str] | None, environment: Environment, config: GenerationConfig
) -> int:
    """`generate --gpus N`: start N workers running the rest of the command line (see app/workers.py)."""
    if environment.distributed:
        raise InputError("--gpus starts its own processes; under torchrun leave it out")
    from .workers import check_gpu_count, launch_workers, strip_gpus_flag  # starts processes: only here

    rest, count = strip_gpus_flag(sys.argv[1:] if argv is None else list(argv))
    check_gpu_count(count, args.device)
    layout_for(config, model_configs(args.checkpoint, args.model)[0], count, args.cfg_parallel)  # refused once, here
    if count == 1:
        return main(rest)  # one GPU: no group to form
    return launch_workers(rest, count)


def _samples_command(args: argparse.Namespace, argv: list[str]) -> int:
    """`generate -i FILE... -o DIR`: the sample files' requests, one model load (see app/samples.py)."""
    if args.input is None or args.output_dir is None:
        raise InputError("sample files need both -i FILE... and -o DIR (for one video: --prompt and --output)")
    if args.prompt is not None:
        raise InputError("pass either --prompt or -i FILE..., not both; a sample's prompt goes in its file")
    if args.output is not None:
        raise InputError("with -i each sample is written to -o DIR/<name>/vision.mp4; drop --output")
    if args.vram_budget is not None:
        raise InputError("--vram-budget plans one request; with -i pass --offload-stages (see `plan`)")
    _check_flags(args)
    plan = Plan.from_offload(args.offload_stages)
    if args.gpus is not None or Environment.read().distributed:
        raise InputError("sample files (-i) run on one GPU; drop --gpus (or torchrun), or pass one --prompt")
    defaults = {field: getattr(args, field) for field in FLAG_FIELDS} | _defaults(args)
    defaults["condition_frames"] = _condition_frames(args)
    typed = _typed_flags(argv)
    report = run_samples(
        args.input,
        args.output_dir,
        defaults={k: v for k, v in defaults.items() if k != "prompt"},
        overrides={field: defaults[field] for field in FLAG_FIELDS if field in typed},
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        plan=plan,
        model=args.model,
        progress=not args.no_progress,
        fp8=_fp8(args),
        kernels=_kernel_options(args),
        say=_say,
        warn=lambda line: print(printable(line, sys.stderr, one_line=True), file=sys.stderr),
    )
    return report.exit_status


def _serve_command(args: argparse.Namespace, serve: Serve | None) -> int:
    """`serve`: every flag checked, the plan made and the model opened (not yet loaded), then the server."""
    if serve is None:
        raise InputError("serve: start the server with the cosmos3-offload command (or python -m cosmos3_offload)")
    for flag, value in (
        ("--image", args.image),
        ("--video", args.video),
        ("--condition-frames", args.condition_frames),
    ):
        if value is not None:
            raise InputError(f"{flag} belongs to a request; send it with the request (input_reference), not to serve")
    if args.gpus is not None or Environment.read().distributed or args.cfg_parallel != "auto":
        raise InputError("serve runs on one GPU; drop --gpus, --cfg-parallel (and torchrun)")
    if args.vram_budget is not None and args.offload_stages:
        raise InputError("pass either --vram-budget or --offload-stages, not both")
    shape = _defaults(args)
    check_request(
        **shape, aspect_ratio=args.aspect_ratio, image=None, video=None, condition_frames=DEFAULT_CONDITION_FRAMES
    )
    check_cache(args.cache, args.cache_threshold)
    _check_flags(args)
    plan, limit = serve_plan(args)
    settings = ServeSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        queue_size=args.queue_size,
        storage=args.storage,
        limit=limit,
        model_name=args.checkpoint.name if args.checkpoint is not None else f"cosmos3-{args.model}-random",
        defaults={
            **shape,
            "aspect_ratio": args.aspect_ratio,
            "fps": args.fps,
            "cache": args.cache,
            "cache_threshold": args.cache_threshold,
        },
        progress=not args.no_progress,
    )
    loaded = LoadedModel.open(
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        plan=plan,
        model=args.model,
        sound=args.sound,
        fp8=_fp8(args),
        kernel_options=_kernel_options(args),
    )
    return serve(loaded, settings)


def serve_plan(args: argparse.Namespace, say=_say) -> tuple[Plan, RequestLimit | None]:
    """The plan `serve` runs with (checked flags): --offload-stages, or with --vram-budget the planner's pick
    for the largest request served (--frames, --resolution, --aspect-ratio) with an image to encode, since
    image-to-video may come; that request is then the limit of what the server takes."""
    if args.vram_budget is None:
        return Plan.from_offload(args.offload_stages), None
    shape = _defaults(args)
    width, height = frame_size(shape["resolution"], args.aspect_ratio)
    planned = argparse.Namespace(**{**vars(args), "image": Path("input_reference")})
    choice, budget, _ = _budget_choice(planned, shape["frames"], width, height)
    say(describe_choice(choice, budget, _host_budget(args)))
    return choice.plan, RequestLimit(shape["frames"], width, height)


def _typed_flags(argv: list[str]) -> set[str]:
    """The `generate` flags typed in `argv` (not filled in by argparse): parsed again into a namespace that
    already holds a sentinel for each, which argparse then keeps instead of writing its default."""
    unset = object()
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    namespace = argparse.Namespace(**dict.fromkeys(FLAG_FIELDS, unset))
    commands.choices["generate"].parse_args(argv[1:], namespace)
    return {field for field in FLAG_FIELDS if getattr(namespace, field) is not unset}


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` (temporary files, the lock) runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: list[str] | None = None, *, serve: Serve | None = None) -> int:
    """Run one command; `serve` is the HTTP server `cosmos3-offload serve` hands the model to (main.py)."""
    # Growable segments fragment less under a tight budget; read when CUDA starts, so set it first.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if args.command == "check":
            _say(check_folder(args.folder))  # or CheckpointProblems: every problem, one line each
            status = 0
        elif args.command == "serve":
            status = _serve_command(args, serve)
        else:
            status = _plan_command(args) if args.command == "plan" else _generate_command(args, argv)
    except CheckpointProblems as problems:
        parser.fail_each(2, [f"error: {problem}" for problem in problems.problems])
    except InputError as error:
        parser.fail(2, f"error: {error}")
    except KeyboardInterrupt:
        parser.fail(130, "interrupted; nothing was written")
    except _Terminated:
        parser.fail(143, "terminated; nothing was written")
    except OSError as error:  # the disk, not the request: the output is still whole or absent
        parser.fail(1, f"error: {error.strerror or error}; nothing was written")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
