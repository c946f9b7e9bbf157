"""Printing for the command line, torch-free so the entry point can use it before anything heavy loads."""

from __future__ import annotations

PROG = "cosmos3-offload"


def printable(text: str, stream: object, *, one_line: bool) -> str:
    """`text` as `stream` can print it: characters its encoding lacks (and surrogates, the undecodable
    bytes of a path or an argument) as backslash escapes; with `one_line`, every other non-printable
    character too (newlines, tabs, line separators), so a message stays one line."""
    if one_line:
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:  # a stream that names an encoding Python does not know
        return text.encode("ascii", "backslashreplace").decode("ascii")
