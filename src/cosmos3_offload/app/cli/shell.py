"""`cosmos3-offload`'s shell: parse, run one command, and end every way a run can end in one line.

Bad input ends in one line on stderr, exit status 2 and no output file; an interrupt (Ctrl-C or
SIGTERM) in one line, exit status 130 (143 for SIGTERM) and no output file; a disk error (a full
disk, a failing encoder) in one line naming the file, exit status 1, and the output as it was before.
Every flag (and WORLD_SIZE) is checked before anything is measured or loaded. What the user typed is
quoted back escaped: an error stays one line, and bytes that are not UTF-8 (which Python hands over
as surrogates) are printed as escapes instead of failing the print.
"""

from __future__ import annotations

import logging
import os
import signal

from ...errors import InputError
from ...request.checks import FieldError
from ...request.spec import named_at
from ..check import CheckpointProblems, check_folder
from ..outputs import OutputFailed
from ..serve_settings import Serve
from .commands import generate_command, plan_command, say, serve_command
from .flags import build_parser


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` (temporary files, the lock) runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _disk_error(error: OSError) -> str:
    """'cannot write 'out.mp4': No space left on device', or the OS's words and the file they are about."""
    if isinstance(error, OutputFailed) or error.strerror is None:
        return str(error)
    return error.strerror if error.filename is None else f"{error.strerror}: {str(error.filename)!r}"


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
            say(check_folder(args.folder))  # or CheckpointProblems: every problem, one line each
            status = 0
        elif args.command == "serve":
            status = serve_command(args, serve)
        else:
            status = plan_command(args) if args.command == "plan" else generate_command(args, argv)
    except CheckpointProblems as problems:
        parser.fail_each(2, [f"error: {problem}" for problem in problems.problems])
    except FieldError as error:  # a request field, named by its flag
        parser.fail(2, f"error: {named_at(error, 'cli')}")
    except InputError as error:
        parser.fail(2, f"error: {error}")
    except KeyboardInterrupt:
        parser.fail(130, "interrupted; nothing was written")
    except _Terminated:
        parser.fail(143, "terminated; nothing was written")
    except OSError as error:  # the disk, not the request: the output is still whole or absent
        parser.fail(1, f"error: {_disk_error(error)}; nothing was written")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return status or 0
