"""The commands: `plan`, `generate` (one request, `-i` sample files, or `--gpus N` workers) and `serve`.

Each checks every flag, builds the request and the model's options, calls the library and prints what
it returns; none holds memory logic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...errors import InputError
from ...loading.components import model_configs
from ...loading.hub import HubRepo
from ...loading.layout import sound_config
from ...loading.mapped_reasoner import can_map
from ...loading.quantization import describe_quantization, quantization_for
from ...loading.sizes import model_sizes
from ...parallel.mesh import Environment
from ...planning.parallel import ParallelLayout
from ...planning.plan import Plan
from ...planning.request import parse_budget
from ...planning.search import choose_plan, describe_choice
from ...request.spec import RequestSpec
from ..config import resolve_device, resolve_dtype
from ..console import printable
from ..device_profile import device_setup, probe_shape
from ..distributed import check_replica_ranks, layout_for, rank_device
from ..events import RunEvents
from ..feasibility import request_of
from ..model_checks import check_action_heads, has_action_heads
from ..previews import EXACT_FRAMES, PreviewOptions, preview_frames
from ..previews import KINDS as PREVIEW_KINDS
from ..progress_line import ProgressLine
from ..runner import LoadedModel, run
from ..sample_files import read_samples
from ..samples import run_samples
from ..serve_settings import MAX_PREVIEW_EVERY, RequestLimit, Retention, Serve, ServeSettings
from .flags import COMMAND_FIELDS
from .translate import (
    check_flags,
    defaults_for,
    fp8_options,
    host_budget,
    kernel_options,
    request_from_args,
    resolve_hub_checkpoint,
    shape_from_args,
    typed_fields,
)

ACTION_FIELDS = ("action", "domain", "chunk_size", "actions", "view")
# `serve` takes these with each request, not as flags (an action run's in the request's action object).
REQUEST_ONLY = ("image", "video", "condition_frames", *ACTION_FIELDS)
# The fields whose `serve` flags are the defaults of requests (its --sound loads the sound decoder; a
# request asks for sound itself).
SERVED_DEFAULTS = tuple(name for name in COMMAND_FIELDS["serve"] if name not in (*REQUEST_ONLY, "sound"))


def say(text: str) -> None:
    """Print a report on stdout, whatever bytes the user's paths hold."""
    print(printable(text, sys.stdout, one_line=False))


def warn(line: str) -> None:
    print(printable(line, sys.stderr, one_line=True), file=sys.stderr)


def budget_choice(args: argparse.Namespace, shape: RequestSpec, *, actions: bool = False, preview_frames: int = 0):
    """The planner's pick for `shape` under --vram-budget (flags checked already); `actions`: the action heads
    are loaded (an action request loads them anyway); `preview_frames`: latent frames an exact preview decodes
    during the denoise (app/previews.py)."""
    device = rank_device(resolve_device(args.device))
    # Plans are for a GPU: without --dtype they assume the GPU default (bfloat16), even when run on a CPU.
    dtype = resolve_dtype(args.dtype or ("bfloat16" if args.command == "plan" else None), device)
    budget = parse_budget(args.vram_budget)
    sound = sound_config(args.checkpoint) if args.sound else None  # the sound decoder, placed like the VAE
    transformer_config, vae_config = model_configs(args.checkpoint, args.model)
    quantization = quantization_for(args.checkpoint, transformer_config, fp8_options(args))
    sizes = model_sizes(
        transformer_config,
        vae_config,
        dtype_bytes=dtype.itemsize,
        sound_config=sound,
        quantization=quantization,
        actions=actions or shape.action is not None,
    )
    ranks = args.gpus if args.gpus is not None else Environment.read().world_size
    layout = ParallelLayout.for_ranks(ranks, guidance=shape.uses_guidance, cfg_parallel=args.cfg_parallel)
    request = request_of(shape, sound, layout, preview_frames=preview_frames)
    # Measured last: the probe and the copies it times are the first thing that touches the GPU.
    setup = device_setup(
        device,
        attention=args.attention,
        shape=probe_shape(transformer_config, request),  # the request's own attention: the step's rate
        dtype=dtype,
        h2d_GBps=args.h2d_gbps,
    )
    mapped = can_map(has_files=args.checkpoint is not None, rewrites_weights=quantization.on_load)
    choice = choose_plan(sizes, request, budget, setup.profile, host_budget=host_budget(args), mapped=mapped)
    return choice, budget, setup.profile


def describe_shape(shape: RequestSpec) -> str:
    """'1280x720, 189 frames, 35 steps', or an action run's mode, domain, chunk and canvas."""
    if shape.action is None:
        return f"{shape.width}x{shape.height}, {shape.frames} frames, {shape.steps} steps"
    return (
        f"{shape.action} ({shape.domain}), chunk {shape.chunk_size}: {shape.frames} frames padded into a canvas of "
        f"{shape.width}x{shape.height} (tier {shape.resolution}), {shape.chunk_size} action tokens, {shape.steps} steps"
    )


def plan_command(args: argparse.Namespace) -> None:
    if args.vram_budget is None:
        raise InputError("plan needs --vram-budget, e.g. --vram-budget 8GiB")
    resolve_hub_checkpoint(args, sound=bool(args.sound))
    shape = shape_from_args(args)
    check_flags(args)
    if shape.action is not None:
        check_action_heads(args.checkpoint, args.model, shape.domain)
    choice, budget, profile = budget_choice(args, shape)
    say(f"request: {describe_shape(shape)}")
    say(f"device profile: {profile.source}")
    transformer_config, _ = model_configs(args.checkpoint, args.model)
    say(
        describe_quantization(
            transformer_config, quantization_for(args.checkpoint, transformer_config, fp8_options(args))
        )
    )
    say(describe_choice(choice, budget, host_budget(args)))


def generate_command(args: argparse.Namespace, argv: list[str] | None = None) -> int | None:
    if args.input is not None or args.output_dir is not None:
        return samples_command(args)
    if args.prompt is None:
        raise InputError("generate needs --prompt 'what the video shows', or -i FILE... -o DIR for sample files")
    repo = resolve_hub_checkpoint(args, sound=bool(args.sound))
    config = request_from_args(args)
    check_flags(args)
    preview = preview_options(args)
    plan = Plan.from_offload(args.offload_stages)
    environment = Environment.read()  # torchrun's variables, before a budget's bandwidth is measured
    if args.gpus is not None:
        return launch_command(args, argv, environment, config, repo)
    if args.vram_budget is not None:
        choice, budget, _ = budget_choice(args, config, preview_frames=preview_frames(preview))
        if environment.rank == 0:
            say(describe_choice(choice, budget, host_budget(args)))
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
        fp8=fp8_options(args),
        kernels=kernel_options(args),
        cfg_parallel=args.cfg_parallel,
        events=None if args.no_progress else RunEvents(ProgressLine(sys.stderr)),
        preview=preview,
    )
    if report is not None:  # rank 0 (or the only process)
        say(report.summary())


def preview_options(args: argparse.Namespace) -> PreviewOptions | None:
    """`--preview PATH` with its kind and pace, checked (None without it; its companions alone are refused)."""
    if args.preview is None:
        for flag, value in (("--preview-kind", args.preview_kind), ("--preview-every", args.preview_every)):
            if value is not None:
                raise InputError(f"{flag} goes with --preview PATH; add it, or drop {flag}")
        return None
    kind = "fast" if args.preview_kind is None else args.preview_kind
    if kind not in PREVIEW_KINDS:
        raise InputError(f"--preview-kind must be one of {', '.join(PREVIEW_KINDS)}, got {kind!r}")
    return PreviewOptions(args.preview, kind=kind, every=preview_every(args))


def preview_every(args: argparse.Namespace) -> int | None:
    """--preview-every as a number of steps (None: not given), or the one-line refusal of what it is not."""
    if args.preview_every is None:
        return None
    try:
        every = int(args.preview_every)
    except ValueError:
        every = None
    if every is None or not 1 <= every <= MAX_PREVIEW_EVERY:
        raise InputError(
            f"--preview-every must be a whole number of steps from 1 to {MAX_PREVIEW_EVERY}, got {args.preview_every!r}"
        )
    return every


def launch_command(
    args: argparse.Namespace, argv: list[str] | None, environment: Environment, config, repo: HubRepo | None = None
) -> int:
    """`generate --gpus N`: start N workers running the rest of the command line (see app/workers.py); a
    --checkpoint `repo` resolved here reaches them as its snapshot folder."""
    if environment.distributed:
        raise InputError("--gpus starts its own processes; under torchrun leave it out")
    from ..workers import check_gpu_count, launch_workers, strip_gpus_flag  # starts processes: only here
    from .shell import main

    rest, count = strip_gpus_flag(sys.argv[1:] if argv is None else list(argv))
    if repo is not None:
        rest = with_checkpoint(rest, args.checkpoint)
    check_gpu_count(count, args.device)
    layout_for(config, model_configs(args.checkpoint, args.model)[0], count, args.cfg_parallel)  # refused once, here
    if count == 1:
        return main(rest)  # one GPU: no group to form
    return launch_workers(rest, count)


def with_checkpoint(argv: list[str], folder: Path) -> list[str]:
    """`argv` with --checkpoint naming `folder` (the last --checkpoint is the one read): each worker opens the
    snapshot this process resolved, never asking the Hub again (whose branch may have moved meanwhile)."""
    end = argv.index("--") if "--" in argv else len(argv)
    return [*argv[:end], f"--checkpoint={folder}", *argv[end:]]


def samples_sound(args: argparse.Namespace) -> bool:
    """Whether a `-i` run may load the sound decoder: --sound / --no-sound, else any sample's enable_sound."""
    if args.sound is not None:
        return args.sound
    return any(sample.fields.get("sound") for sample in read_samples(args.input))


def samples_command(args: argparse.Namespace) -> int:
    """`generate -i FILE... -o DIR`: the sample files' requests, one model load (see app/samples.py)."""
    if args.input is None or args.output_dir is None:
        raise InputError("sample files need both -i FILE... and -o DIR (for one video: --prompt and --output)")
    if args.prompt is not None:
        raise InputError("pass either --prompt or -i FILE..., not both; a sample's prompt goes in its file")
    if args.output is not None:
        raise InputError("with -i each sample is written to -o DIR/<name>/vision.mp4; drop --output")
    if args.vram_budget is not None:
        raise InputError("--vram-budget plans one request; with -i pass --offload-stages (see `plan`)")
    resolve_hub_checkpoint(args, sound=samples_sound(args))
    check_flags(args)
    if args.gpus is not None or Environment.read().distributed:
        raise InputError("sample files (-i) run on one GPU; drop --gpus (or torchrun), or pass one --prompt")
    report = run_samples(
        args.input,
        args.output_dir,
        defaults=defaults_for(args),
        overrides=typed_fields(args),
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        plan=Plan.from_offload(args.offload_stages),
        model=args.model,
        progress=not args.no_progress,
        fp8=fp8_options(args),
        kernels=kernel_options(args),
        say=say,
        warn=warn,
        watch=None if args.no_progress else ProgressLine(sys.stderr),
    )
    return report.exit_status


def serve_command(args: argparse.Namespace, serve: Serve | None) -> int:
    """`serve`: every flag checked, the plan made and the model opened (not yet loaded), then the server."""
    if serve is None:
        raise InputError("serve: start the server with the cosmos3-offload command (or python -m cosmos3_offload)")
    for name in REQUEST_ONLY:
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            where = "its action object" if name in ACTION_FIELDS else "input_reference"
            raise InputError(f"{flag} belongs to a request; send it with the request ({where}), not to serve")
    if args.gpus is not None or Environment.read().distributed or args.cfg_parallel != "auto":
        raise InputError(
            "serve runs each job on one replica's GPUs; drop --gpus, --cfg-parallel (and torchrun), and pass "
            "--replicas N or --gpus-per-replica K"
        )
    repo = resolve_hub_checkpoint(args, sound=bool(args.sound))  # its sound decoder loads with --sound only
    shape = shape_from_args(args)
    check_flags(args)
    plan, limit = serve_plan(args)
    settings = ServeSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        queue_size=args.queue_size,
        storage=args.storage,
        limit=limit,
        model_name=served_name(args, repo),
        defaults={name: getattr(shape, name) for name in SERVED_DEFAULTS},
        progress=not args.no_progress,
        allow_origins=tuple(args.allow_origin),
        keep_videos=Retention.parse(args.keep_videos, "--keep-videos"),
        keep_images=Retention.parse(args.keep_images, "--keep-images"),
        preview_kind=args.preview_kind,
        preview_every=preview_every(args),
        replicas=args.replicas,
        gpus_per_replica=args.gpus_per_replica,
        ray_address=args.ray_address,
    )
    loaded = LoadedModel.open(
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        plan=plan,
        model=args.model,
        sound=bool(args.sound),
        fp8=fp8_options(args),
        kernel_options=kernel_options(args),
    )
    if settings.gpus_per_replica > 1:
        check_replica_ranks(model_configs(loaded.checkpoint, loaded.model)[0], settings.gpus_per_replica)
    loaded.probe_request = request_of(shape)  # a GPU's kernels are picked at the served request's attention
    return serve(loaded, settings)


def served_name(args: argparse.Namespace, repo: HubRepo | None) -> str:
    """The model's name in the API: a folder's name, or the repo as typed (nvidia/Cosmos3-Nano@fp8), never the
    snapshot's commit."""
    if repo is not None:
        return str(repo)
    return args.checkpoint.name if args.checkpoint is not None else f"cosmos3-{args.model}-random"


def serve_plan(args: argparse.Namespace, say=say) -> tuple[Plan, RequestLimit | None]:
    """The plan `serve` runs with (checked flags): --offload-stages, or with --vram-budget the planner's pick
    for the largest request served (--frames, --resolution, --aspect-ratio) with an image to encode, since
    image-to-video may come; that request is then the limit of what the server takes. A model with action
    heads is planned with them and with a clip's encode (inverse dynamics encodes its whole clip)."""
    if args.vram_budget is None:
        return Plan.from_offload(args.offload_stages), None
    actions = has_action_heads(args.checkpoint, args.model)
    conditioning = {"video": Path("input_video")} if actions else {"image": Path("input_reference")}
    shape = shape_from_args(args, **conditioning)
    exact = EXACT_FRAMES if args.preview_kind == "exact" else 0  # a job's exact preview: the .webp's three frames
    choice, budget, _ = budget_choice(args, shape, actions=actions, preview_frames=exact)
    say(describe_choice(choice, budget, host_budget(args)))
    return choice.plan, RequestLimit(shape.frames, shape.width, shape.height)
