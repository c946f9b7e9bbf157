"""The checks a single value gets, with messages that say how to fix it, and how a refused value is quoted.

`FieldError` is the InputError of one request field: it keeps the field's name apart from the problem,
so each door can name the field as its user typed it (`--frames`, `num_frames`, `frames`) around the
same words.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

from ..errors import InputError

MAX_SHOWN_CHARS = 80  # of a refused value quoted back in an error message
MAX_PROMPT_CHARS = 20_000


class FieldError(InputError):
    """A value one field refuses: `name` (as the message names the field), `problem` (the rest of the
    message) and `field` (the request field's name, where a request field refused it)."""

    def __init__(self, name: str, problem: str, *, field: str | None = None) -> None:
        super().__init__(f"{name} {problem}")
        self.name, self.problem, self.field = name, problem, field

    def named(self, name: str) -> FieldError:
        """The same refusal naming the field as a door's user typed it."""
        return FieldError(name, self.problem, field=self.field)


def shown(value: object) -> str:
    """`value` as an error message quotes it: its repr, cut to MAX_SHOWN_CHARS (a huge int has no repr)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**MAX_SHOWN_CHARS:
        return f"a {len(hex(value)) - 2}-hex-digit number"
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_integer(name: str, value: object, low: int, high: int) -> None:
    if not is_integer(value) or not low <= value <= high:
        raise FieldError(name, f"must be a whole number from {low} to {high}, got {shown(value)}")


def check_number(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> None:
    """A finite real in [low, high] (or (low, high] with `low_open`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise FieldError(name, f"must be a finite number in {bracket}{low:g}, {high:g}], got {shown(value)}")


def check_text(name: str, value: object, *, required: bool) -> None:
    """Text that is valid UTF-8 (no undecodable bytes from the command line) and not too long."""
    if not isinstance(value, str):
        raise FieldError(name, f"must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise InputError(f"the {name} is empty; pass --{name.replace(' ', '-')} 'what the video shows'")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"the {name} is not valid UTF-8; pass it in UTF-8") from None
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(f"the {name} has {len(value)} characters; keep it to at most {MAX_PROMPT_CHARS}")


def check_choice(name: str, value: object, choices: tuple) -> None:
    if isinstance(value, bool) or value not in choices:
        raise FieldError(name, f"must be one of {', '.join(map(str, choices))}, got {shown(value)}")


def _stat(kind: str, path: Path) -> os.stat_result | None:
    """`os.stat(path)`, None where nothing is there; a name no file can have is an InputError."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:  # a NUL byte, which only the Python API can pass
        raise InputError(f"{kind} {str(path)!r} is not a usable path (it holds a NUL byte)") from None
    except OSError as error:  # too long, a symlink loop, a folder we may not enter
        raise InputError(f"{kind} {str(path)!r} cannot be used: {error.strerror}") from None


def check_input_file(kind: str, path: Path) -> None:
    """An existing regular file (through symlinks), or an InputError naming it."""
    status = _stat(kind, Path(path))
    if status is None or not stat.S_ISREG(status.st_mode):
        raise InputError(f"{kind} {str(path)!r} does not exist or is not a file")


def check_input_folder(kind: str, path: Path, fix: str) -> None:
    """An existing folder (through symlinks), or an InputError naming it and saying `fix`."""
    status = _stat(kind, Path(path))
    if status is None or not stat.S_ISDIR(status.st_mode):
        raise InputError(f"{kind} {str(path)!r} is not a folder; {fix}")
