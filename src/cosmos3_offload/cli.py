"""`cosmos3-offload`: parse flags, build a config, call the library, print the report.

Bad input ends in one line on stderr, exit status 2 and no output file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import DTYPES, GenerationConfig
from .errors import InputError
from .plan import Plan
from .runner import run
from .tiers import ASPECT_RATIOS, DEFAULT_SHIFT, RESOLUTION_TIERS

# Without a checkpoint the embedded tiny model runs on any CPU; Cosmos3's 720p x 189-frame
# default would take it minutes, so it defaults to the smallest tier and a short clip.
TINY_DEFAULTS = {"resolution": 256, "frames": 17}
CHECKPOINT_DEFAULTS = {"resolution": 720, "frames": 189}


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="cosmos3-offload", description="Run Cosmos3 omni video models on small GPUs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    gen = commands.add_parser(
        "generate",
        help="text-to-video (or text-to-image with --frames 1)",
        description="Generate a video (mp4) or, with --frames 1, an image (jpg/png) from a prompt.",
    )
    gen.add_argument("--prompt", required=True, help="what the video shows")
    gen.add_argument("--negative-prompt", default=None, help="what to steer away from (default: empty)")
    gen.add_argument(
        "--frames",
        type=int,
        default=None,
        help="frame count: 1 (an image) or 4k+1, e.g. 93 or 189; other counts are refused "
        "(default: 189, or 17 with the embedded tiny model)",
    )
    gen.add_argument(
        "--resolution",
        type=int,
        default=None,
        help=f"resolution tier, one of {', '.join(map(str, RESOLUTION_TIERS))} "
        "(default: 720, or 256 with the embedded tiny model)",
    )
    gen.add_argument("--aspect-ratio", default="16,9", help=f"one of {' '.join(ASPECT_RATIOS)} (default: 16,9)")
    gen.add_argument("--steps", type=int, default=35, help="denoising steps (default: 35)")
    gen.add_argument(
        "--guidance",
        type=float,
        default=6.0,
        help="classifier-free guidance scale; 1 skips the unconditional pass (default: 6)",
    )
    gen.add_argument(
        "--shift",
        type=float,
        default=None,
        help="flow shift of the UniPC schedule (default by tier: "
        + ", ".join(f"{t}: {s:g}" for t, s in DEFAULT_SHIFT.items())
        + ")",
    )
    gen.add_argument("--fps", type=float, default=24.0, help="frames per second of the video (default: 24)")
    gen.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same video on any device")
    gen.add_argument(
        "--output", type=Path, default=None, help="output file: .mp4, or .jpg/.png for one frame (default: output.mp4)"
    )
    gen.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a diffusers-layout Cosmos3 folder (model_index.json, transformer/, vae/, text_tokenizer/); "
        "without it, the embedded tiny model with random weights",
    )
    gen.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    gen.add_argument(
        "--dtype",
        default=None,
        help=f"one of {', '.join(DTYPES)} (default: bfloat16 on a GPU, float32 on the CPU)",
    )
    gen.add_argument(
        "--offload-stages",
        nargs="*",
        default=[],
        metavar="STAGE",
        help="groups whose weights live in pinned host memory and are copied to the GPU only for their phase: "
        "any of reasoner, generator, vae (default: none, everything resident)",
    )
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    gen.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and where")
    return parser


def _config_from_args(args: argparse.Namespace) -> GenerationConfig:
    defaults = TINY_DEFAULTS if args.checkpoint is None else CHECKPOINT_DEFAULTS
    frames = defaults["frames"] if args.frames is None else args.frames
    output = args.output if args.output is not None else Path("output.jpg" if frames == 1 else "output.mp4")
    return GenerationConfig(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        frames=frames,
        resolution=defaults["resolution"] if args.resolution is None else args.resolution,
        aspect_ratio=args.aspect_ratio,
        steps=args.steps,
        guidance=args.guidance,
        shift=args.shift,
        fps=args.fps,
        seed=args.seed,
        output=output,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        config = _config_from_args(args)
        report = run(
            config,
            checkpoint=args.checkpoint,
            device=args.device,
            dtype=args.dtype,
            plan=Plan.from_stages(args.offload_stages),
            progress=not args.no_progress,
        )
    except InputError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
