"""The checks a single value gets, with messages that say how to fix it, and how a refused value is quoted.

`FieldError` is the InputError of one request field: it keeps the field's name apart from the problem,
so each door can name the field as its user typed it (`--frames`, `num_frames`, `frames`) around the
same words. `InputFiles` holds the files a run reads, so that no output of the run replaces one.
"""

from __future__ import annotations

import math
import os
import stat
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from ..errors import InputError

MAX_SHOWN_CHARS = 80  # of a refused value quoted back in an error message
MAX_PROMPT_CHARS = 20_000
# Characters that show nothing on their own: controls, format characters (zero-width space and joiners,
# bidi marks, tags), separators and marks that need a base. Unassigned code points are not among them:
# an emoji newer than this Python's Unicode tables is unassigned to it.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me"})
BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")  # Hangul fillers, the blank Braille pattern


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


def is_visible(character: str) -> bool:
    return character not in BLANK_LETTERS and unicodedata.category(character) not in INVISIBLE_CATEGORIES


def check_text(name: str, value: object, *, required: bool) -> None:
    """Text that is valid UTF-8 (no undecodable bytes from the command line) and not too long; `required`
    text shows something (zero-width spaces and other invisible characters alone are empty)."""
    if not isinstance(value, str):
        raise FieldError(name, f"must be text, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(f"the {name} has {len(value)} characters; keep it to at most {MAX_PROMPT_CHARS}")
    if required and not any(map(is_visible, value)):
        held = next((c for c in value if not c.isspace()), None)
        said = "" if held is None else f" (it holds only invisible characters such as U+{ord(held):04X})"
        raise InputError(f"the {name} is empty{said}; pass --{name.replace(' ', '-')} 'what the video shows'")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"the {name} is not valid UTF-8; pass it in UTF-8") from None


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


class InputFiles:
    """The files a run reads (the image, the clip, sample files, prompt files, the checkpoint's files), so
    that no output of the run replaces one: an output is refused when it is one of them by its path
    (symlinks resolved) or by its inode (a hard link), or is an existing file inside an input folder."""

    def __init__(self, files: Iterable[tuple[str, Path | None]] = ()) -> None:
        self._paths: dict[str, tuple[str, Path]] = {}  # realpath: (kind, the path as given)
        self._inodes: dict[tuple[int, int], tuple[str, Path]] = {}  # (st_dev, st_ino): (kind, path)
        self._folders: list[tuple[str, str, Path]] = []  # (realpath + separator, kind, path)
        for kind, path in files:
            if path is not None:
                self.add(kind, path)

    def add(self, kind: str, path: Path) -> None:
        real = _realpath(path)
        if real is None or real in self._paths:
            return
        self._paths[real] = (kind, Path(path))
        status = _stat_or_none(path)
        if status is not None and stat.S_ISREG(status.st_mode):
            self._inodes.setdefault((status.st_dev, status.st_ino), (kind, Path(path)))

    def add_folder(self, kind: str, folder: Path, *, depth: int = 2) -> None:
        """`folder` and its files `depth` levels down (a checkpoint: model_index.json, transformer/*.safetensors;
        symlinks to a cache's blobs followed), without walking a tree of any size; `kind` names the folder."""
        real = _realpath(folder)
        if real is None:
            return
        self._folders.append((os.path.join(real, ""), kind, Path(folder)))
        level = [Path(folder)]
        for _ in range(depth):
            below = []
            for parent in level:
                try:
                    entries = list(os.scandir(parent))
                except OSError:
                    continue
                for entry in entries:
                    if entry.is_dir():  # a symlinked component folder too: the depth bounds any loop
                        below.append(Path(entry.path))
                    elif entry.is_file():
                        self.add(f"{kind} file", Path(entry.path))
            level = below

    def refuse_output(self, output: Path, what: str = "output") -> None:
        """An InputError when writing `output` (through a symlink, to its target) would replace a file read;
        `what` names the file written (the output, a preview)."""
        real = _realpath(output)
        if real is None:
            return
        found = self._paths.get(real)
        status = _stat_or_none(output)
        if found is None and status is not None:
            found = self._inodes.get((status.st_dev, status.st_ino))
            inside = next(((k, p) for prefix, k, p in self._folders if real.startswith(prefix)), None)
            if found is None and inside is not None:
                found = (f"file inside the {inside[0]}", inside[1])
        if found is not None:
            kind, path = found
            same = " (the same file)" if os.path.normpath(output) != os.path.normpath(path) else ""
            raise InputError(
                f"{what} {str(output)!r} is the {kind} {str(path)!r}{same}; writing it would destroy that input: "
                f"write the {what} elsewhere"
            )


def _realpath(path: Path) -> str | None:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):  # a NUL byte or a symlink loop: refused by the checks of the path itself
        return None


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None
