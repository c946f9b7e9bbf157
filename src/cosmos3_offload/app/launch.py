"""The `cosmos3-offload` entry point: a damaged checkpoint is refused before torch is imported.

Importing torch and diffusers takes seconds (3 s on a fast machine, 20 s on a cold one); a user who
points `generate` at a folder with a missing shard or a cut header should hear about it at once.
So the entry point looks for `--checkpoint DIR` on a `generate` command line and runs the file
checks on DIR first (loading/files.py: the layout, the JSON files, the shard indexes, every header;
no torch, no weight read). The first problem ends the run here with one line on stderr and exit
status 2, as the full command would end it later. Otherwise the full command line takes over:
for a good folder, for `plan` and `check` (which read configs and list every problem), for
`--help`, and for anything this quick look does not recognise (an abbreviated flag, say).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError
from ..loading.files import CheckpointWeights, folder_problems
from ..loading.hub import is_repo_id
from .console import PROG, printable
from .serve_settings import Serve

WEIGHT_FOLDERS = ("transformer", "vae")  # read by every run; sound_tokenizer/ only with --sound


def main(argv: list[str] | None = None, *, serve: Serve | None = None) -> int:
    """`serve` runs the HTTP server for `cosmos3-offload serve` (passed in from above: see main.py)."""
    args = sys.argv[1:] if argv is None else list(argv)
    folder = checkpoint_argument(args)
    problem = None if folder is None else first_file_problem(folder)
    if problem is not None:
        print(printable(f"{PROG}: error: {problem}", sys.stderr, one_line=True), file=sys.stderr)
        return 2
    try:
        from .cli import main as full_main  # torch, diffusers and the rest load here (seconds)

        return full_main(argv, serve=serve)
    except KeyboardInterrupt:  # Ctrl-C before the command's own handling started: still one line
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130


def checkpoint_argument(args: list[str]) -> Path | None:
    """DIR of `generate ... --checkpoint DIR` (or `--checkpoint=DIR`); None for anything else, a Hub repo id
    included (the full command resolves it through the Hugging Face cache, see loading/hub.py)."""
    if not args or args[0] != "generate" or "-h" in args or "--help" in args:
        return None
    for index, arg in enumerate(args):
        if arg == "--checkpoint" and index + 1 < len(args):
            text = args[index + 1]
        elif arg.startswith("--checkpoint="):
            text = arg.removeprefix("--checkpoint=")
        else:
            continue
        return None if is_repo_id(text) else Path(text)
    return None


def first_file_problem(folder: Path) -> str | None:
    """The first problem the file checks find in `folder` (None: none, or a path only the full
    command can word, such as one too long for the file system)."""
    try:
        problems = folder_problems(folder)
        for part in WEIGHT_FOLDERS:
            if problems or not (folder / part).is_dir():
                break
            problems = CheckpointWeights(folder / part, strict=False).problems
    except (OSError, ValueError, InputError):
        return None
    return problems[0] if problems else None
