"""The command line's flags: the request's, generated from its declaration (request/spec.py), and the
flags of how and where it runs (the model, placement, kernels, several GPUs, the server).

Every request flag defaults to None here ("not typed"): the request's defaults are applied once, in
translate.py, from the declaration, so `-i` sample files can tell a typed flag from a default.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ...errors import InputError
from ...kernels.probe import ATTENTION_CHOICES
from ...loading.hub import HubRepo, checkpoint_or_repo, resolve_checkpoint
from ...loading.quantization import FP8_MODES, QUANTIZE_CHOICES, SCALE_CHOICES
from ...model.specs import MODEL_SPECS
from ...planning.parallel import CFG_PARALLEL_CHOICES
from ...request.checks import FieldError
from ...request.field import FieldSpec
from ...request.spec import FIELDS_BY_NAME, REQUEST_FIELDS
from ..config import COMPILE_CHOICES, DTYPES
from ..console import PROG, printable
from ..serve_settings import (
    API_KEY_VARIABLE,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_PREVIEW_KIND,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_STORAGE,
    KEEP_IMAGES,
    KEEP_VIDEOS,
)

# The request fields each command takes: `plan` and `serve` take what shapes a request (serve: the
# defaults of requests that leave them out; --image, --video and --condition-frames it refuses by name).
SHAPE_FIELDS = tuple(
    name for name in FIELDS_BY_NAME if name not in ("prompt", "negative_prompt", "shift", "seed", "output")
)
COMMAND_FIELDS = {"generate": tuple(FIELDS_BY_NAME), "plan": SHAPE_FIELDS, "serve": SHAPE_FIELDS}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.fail(2, f"error: {message}")

    def fail(self, status: int, message: str) -> None:
        """Exit with `status` after one line on stderr: the program's name and `message`, escaped."""
        self.exit(status, printable(f"{self.prog}: {message}", sys.stderr, one_line=True) + "\n")

    def fail_each(self, status: int, messages: list[str]) -> None:
        """Exit with `status` after one line on stderr for each message, as `fail` writes it."""
        self.exit(status, "".join(printable(f"{self.prog}: {m}", sys.stderr, one_line=True) + "\n" for m in messages))


def _text_reader(spec: FieldSpec):
    """argparse's `type` for a field: its text read as the field reads it; a refusal in the field's words."""
    item = FieldSpec(**{**spec.__dict__, "kind": int}) if spec.kind is tuple else spec

    def read(text: str):
        try:
            return item.from_text(text)
        except FieldError as error:
            raise argparse.ArgumentTypeError(error.problem) from None  # argparse names the flag

    read.__name__ = spec.name  # argparse names the type in its own messages
    return read


def add_request_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per request field `command` takes, its help from the declaration, None when not typed."""
    for spec in REQUEST_FIELDS:
        if spec.name not in COMMAND_FIELDS[command] or spec.flag is None:
            continue
        options: dict = {"dest": spec.name, "default": None, "help": spec.describe()}
        if spec.kind is bool:
            options["action"] = argparse.BooleanOptionalAction  # --sound / --no-sound
        else:
            metavar = "{" + ",".join(map(str, spec.choices)) + "}" if spec.choices else spec.name.upper()
            options |= {"type": _text_reader(spec), "metavar": metavar}
        if spec.kind is tuple:
            options["nargs"] = "+"
        parser.add_argument(spec.flag, **options)


def _checkpoint(text: str) -> Path | HubRepo:
    """argparse's `type` for --checkpoint: a folder, or a Hub repo id (the command resolves it, once, first)."""
    try:
        return checkpoint_or_repo(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _checked_folder(text: str) -> Path:
    """argparse's `type` for `check DIR`: the folder, or a Hub repo's snapshot in the Hugging Face cache
    (fetched as `generate` without --sound fetches it, when missing and allowed); `check` parses nothing else."""
    try:
        found = checkpoint_or_repo(text)
        return found if isinstance(found, Path) else resolve_checkpoint(found, sound=False)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _model_flags(parser: argparse.ArgumentParser) -> None:
    """Which weights, where they live, which kernels run them: the flags `generate`, `plan` and `serve` share."""
    add = parser.add_argument
    add(
        "--checkpoint",
        type=_checkpoint,
        default=None,
        metavar="DIR|REPO",
        help="a diffusers-layout Cosmos3 folder (model_index.json, transformer/, vae/, text_tokenizer/), or a "
        "Hugging Face repo OWNER/NAME[@REVISION] (nvidia/Cosmos3-Nano, nvidia/Cosmos3-Nano@fp8) taken from the "
        "Hugging Face cache and downloaded there when missing (only the files a run reads; HF_HUB_OFFLINE=1: "
        "never); a folder of that name wins; without it, random weights of --model",
    )
    add(
        "--model",
        default="tiny",
        help=f"model size for random weights when no --checkpoint is given: {', '.join(MODEL_SPECS)} (default: tiny)",
    )
    add("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    add("--dtype", default=None, help=f"one of {', '.join(DTYPES)} (default: bfloat16 on a GPU, float32 on the CPU)")
    add(
        "--vram-budget",
        default=None,
        metavar="SIZE",
        help="device memory to plan for, e.g. 8GiB: the planner picks the fastest placement that fits",
    )
    add(
        "--host-budget",
        default=None,
        metavar="SIZE",
        help="with --vram-budget: host memory (pinned + private) the weights may hold, e.g. 16GiB; with a "
        "--checkpoint the reasoner may then be mapped from its files (page cache) instead of pinned",
    )
    add(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=None,
        help="store the decoder layers' linears in FP8 as they load (half the bytes to hold and move); "
        "an FP8 checkpoint needs no flag",
    )
    add(
        "--fp8-mode",
        choices=FP8_MODES,
        default="auto",
        help="FP8 linears: 'policy' follows the checkpoint's step policy (W8A16 first and last steps, W8A8 "
        "between), 'w8a8' or 'w8a16' force one everywhere, 'auto' (default) is 'policy' on GPUs with FP8 "
        "tensor cores and 'w8a16' elsewhere",
    )
    add(
        "--fp8-scales",
        choices=SCALE_CHOICES,
        default="channel",
        help="with --quantize: one weight scale per output channel (default, closer to bf16) or per tensor",
    )
    add(
        "--attention",
        choices=ATTENTION_CHOICES,
        default="auto",
        help="the attention implementation: 'auto' (default) measures the exact ones once per GPU and "
        "takes the fastest (the result is cached); 'diffusers' is diffusers' dispatcher; or name one",
    )
    add(
        "--compile",
        choices=COMPILE_CHOICES,
        default="auto",
        help="fuse each layer's norms, rotary, gating and residual adds with torch.compile; 'auto' "
        "(default) is on for a GPU and off on the CPU",
    )
    add(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="run on N GPUs of this machine (one process each, started for you; or launch with "
        "`torchrun --nproc-per-node N -m cosmos3_offload generate ...`): the CFG branches side by side "
        "and each branch's tokens split over the rest (Ulysses); with --device cpu, N processes on the CPU",
    )
    add(
        "--cfg-parallel",
        choices=CFG_PARALLEL_CHOICES,
        default="auto",
        help="with several GPUs: run the conditional and unconditional branches on different GPUs; 'auto' "
        "(default) does when there are two branches and an even GPU count, 'on' demands it",
    )
    add(
        "--h2d-gbps",
        type=float,
        default=None,
        help="host-to-device bandwidth for the planner (default: measured on a GPU, 55 otherwise)",
    )


def _offload_stages(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--offload-stages",
        nargs="*",
        default=[],
        metavar="STAGE",
        help="groups whose weights live in pinned host memory and are copied to the GPU only for their phase: "
        "any of reasoner, generator, vae (default: none, everything resident; not with --vram-budget)",
    )


def _preview_flags(parser: argparse.ArgumentParser) -> None:
    """`generate`'s live preview (app/previews.py): an image of the video as it renders, kept up to date."""
    parser.add_argument(
        "--preview",
        type=Path,
        default=None,
        metavar="PATH",
        help="keep PATH updated with a preview of the video as it renders, each written whole: .png (the middle "
        "frame) or .webp/.gif (a few frames, animated); never changes the output (default: none)",
    )
    parser.add_argument(
        "--preview-kind",
        default=None,
        metavar="KIND",
        help="with --preview: fast (a linear map of the latents to colours, fitted once per checkpoint from its "
        "VAE; free) or exact (the VAE's decode of the first, middle and last latent frames; the planner keeps "
        "the VAE on the device and counts it) (default: fast)",
    )
    parser.add_argument(
        "--preview-every",
        default=None,
        metavar="K",
        help="with --preview: a preview every K steps, and after the last (default: 1 for fast, 5 for exact)",
    )


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Run Cosmos3 omni video models on small GPUs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    gen = commands.add_parser(
        "generate",
        help="text-to-video (or text-to-image with --frames 1)",
        description="Generate a video (mp4) or, with --frames 1, an image (jpg/png) from a prompt.",
    )
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
    add_request_flags(gen, "generate")
    _model_flags(gen)
    _offload_stages(gen)
    _preview_flags(gen)
    gen.add_argument("--no-progress", action="store_true", help="hide the progress display")
    gen.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and where")
    plan = commands.add_parser(
        "plan",
        help="print the plan --vram-budget would pick, with predicted memory and time, without running",
        description="Predict peak memory and time of candidate placements and print the fastest that fits.",
    )
    add_request_flags(plan, "plan")
    _model_flags(plan)
    plan.set_defaults(verbose=False)
    _serve_parser(commands)
    check = commands.add_parser(
        "check",
        help="check a checkpoint folder without loading it and print what it holds",
        description="Run the loader's checks on a checkpoint folder (every problem, one line each, exit status 2) "
        "and print the model's size, heads, dtypes, group sizes and which plans fit this machine.",
    )
    check.add_argument(
        "folder",
        type=_checked_folder,
        metavar="DIR|REPO",
        help="a diffusers-layout Cosmos3 folder, or a Hugging Face repo OWNER/NAME[@REVISION] (its snapshot in the "
        "Hugging Face cache, downloaded when missing as generate downloads it)",
    )
    check.set_defaults(verbose=False)
    return parser


def _serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="keep the model loaded and serve an OpenAI-style video job API and a web page",
        description="Load the model once and serve POST/GET /v1/videos (a job queue, one job at a time), "
        "POST /v1/images/generations, GET /health and /metrics, and a web page at /. The request flags "
        "are the defaults of a request that leaves them out; with --vram-budget the plan is made for --frames "
        "and --resolution, and larger requests are refused.",
    )
    add_request_flags(serve, "serve")
    _model_flags(serve)
    _offload_stages(serve)
    serve.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST}, this machine only)"
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0: a free one)")
    serve.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_VARIABLE),
        help=f"every API call must send 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE}, the safer form: "
        "a flag's value shows in ps; unset: no key, and only this machine's pages may call)",
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (scheme://host[:port]) whose pages may call this server besides its own; repeat for "
        "more (default: none)",
    )
    serve.add_argument(
        "--keep-videos",
        default=str(KEEP_VIDEOS),
        metavar="KEEP",
        help="how many finished video jobs to keep, and for how long: all, N, an age (12h, 7d) or N,AGE "
        f"(default: {KEEP_VIDEOS})",
    )
    serve.add_argument(
        "--keep-images",
        default=str(KEEP_IMAGES),
        metavar="KEEP",
        help=f"the same for image jobs, whose images were already returned (default: {KEEP_IMAGES})",
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
    serve.add_argument(
        "--preview-kind",
        default=DEFAULT_PREVIEW_KIND,
        metavar="KIND",
        help="each video job's live preview (GET /v1/videos/{id}/preview): none, fast (a linear map of the "
        "latents, free) or exact (the VAE's decode of three frames; the VAE stays on the device) "
        f"(default: {DEFAULT_PREVIEW_KIND})",
    )
    serve.add_argument(
        "--preview-every",
        default=None,
        metavar="K",
        help="a job's preview every K steps, and after the last (default: 1 for fast, 5 for exact)",
    )
    serve.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="copies of the model that run jobs at once, one per GPU, on Ray Serve (pip install "
        "'cosmos3-offload[cluster]'); this process keeps the API, the queue and the storage (default: 1, no Ray)",
    )
    serve.add_argument(
        "--gpus-per-replica",
        type=int,
        default=1,
        metavar="K",
        help="GPUs of one node each replica runs on, its ranks running each job together (CFG-parallel and "
        "Ulysses, as generate --gpus K); default: 1",
    )
    serve.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="run the replicas on this Ray cluster (auto, or its head's HOST:PORT, after `ray start --head`) "
        "instead of a Ray started and stopped with the server",
    )
    serve.add_argument("--no-progress", action="store_true", help="hide the load's progress bar")
    serve.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and each request")
