"""The command line run in the test's own process, as a user's shell would run it."""

from __future__ import annotations

from cosmos3_offload.app.cli import main


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`cosmos3-offload ARGV` in this process: exit status, stdout and stderr."""
    try:
        code = main(list(argv))
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
