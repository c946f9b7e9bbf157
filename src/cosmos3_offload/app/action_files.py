"""Action rows as files: the rows a forward-dynamics run follows, and those a policy or inverse-dynamics run predicts.

A user's rows come as `.npy` (a 2-D array, or 1-D for one row), `.json` (a list of rows, one flat list for one row,
or an object holding them under `actions`, as cosmos-framework and our own output write them) or `.csv` (one row a
line, numbers separated by commas, one optional header line of names). Everything is checked before anything is
loaded, and a file that cannot be used is one InputError naming it and where ("row 3, column 2"; a CSV also gives
the line): a path that is no regular file is refused unopened (a FIFO would block), a file past MAX_ACTIONS_BYTES
unread, a `.npy` by its header's dtype and shape before its data is read (a header may claim any shape).

The bounds: a run takes at most MAX_ACTION_ROWS transitions, so no useful file holds more rows, and 1024 rows of
dozens of numbers, even pretty-printed, fit a few MiB, so MAX_ACTIONS_BYTES also bounds what parsing JSON or CSV may
allocate. Actions are normalized poses and gripper states; a value past MAX_ACTION_MAGNITUDE is a file in the wrong
units (or garbage), not a motion, and would only steer the model somewhere it has never been.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from ..errors import InputError, first_line
from ..loading.file_kinds import open_regular
from ..model.actions import MAX_ACTION_MAGNITUDE, MAX_CHUNK
from ..units import MIB, format_bytes

ACTION_SUFFIXES = (".npy", ".json", ".csv")
MAX_ACTION_ROWS = MAX_CHUNK  # one row a transition, and no run takes more
MAX_ACTIONS_BYTES = 16 * MIB
NUMBER_KINDS = "fiu"  # numpy dtype kinds of real numbers: float, signed and unsigned integer


def read_actions(path: Path, width: int, domain: str) -> np.ndarray:
    """The rows of the actions file at `path` for `domain` (`width` numbers a row), float32 [rows, width]."""
    where = f"actions file {str(path)!r}"
    suffix = path.suffix.lower()
    if suffix not in ACTION_SUFFIXES:
        raise InputError(f"{where} is not a .npy, .json or .csv file; save the rows in one of those")
    data = _read_bounded(path, where)
    lines = None
    if suffix == ".npy":
        array = _npy_array(data, where, width, domain)
    elif suffix == ".json":
        array = _rows_array(_json_rows(_parsed_json(data, where), where), where)
    else:
        rows, lines = _csv_rows(data, where)
        array = _rows_array(rows, where, lines)
    _check_width(where, array.shape[1], width, domain)
    check_action_values(array, where, lines)
    return np.ascontiguousarray(array, dtype=np.float32)


def actions_json(actions: np.ndarray, *, mode: str, domain: str) -> str:
    """Predicted actions float32 [rows, width] as JSON text, one row a line; `read_actions` and
    `actions_from_json` read it back exactly (a float32 is written as the float64 that equals it)."""
    assert actions.ndim == 2, actions.shape
    rows, width = actions.shape
    head = json.dumps({"mode": mode, "domain": domain, "width": width, "rows": rows})
    # allow_nan=False: a NaN never reaches here (a run refuses non-finite output), and must never be written as
    # the `NaN` that strict JSON readers reject.
    rows_text = [json.dumps([float(x) for x in row], allow_nan=False) for row in actions.astype(np.float32)]
    lines = ",\n".join("  " + row for row in rows_text)
    return f'{head[:-1]}, "actions": [\n{lines}\n]}}\n'


def actions_from_json(text: str) -> np.ndarray:
    """The float32 [rows, width] actions of text written by `actions_json`; anything else is an InputError."""
    where = "actions JSON"
    found = _parsed_json(text, where)
    if not isinstance(found, dict) or not {"actions", "rows", "width"} <= found.keys():
        raise InputError(f"{where} is not an object with 'actions', 'rows' and 'width', as actions_json writes")
    array = _rows_array(_json_rows(found["actions"], where), where)
    if array.shape != (found["rows"], found["width"]):
        said = f"{found['rows']!r} rows of {found['width']!r}"
        raise InputError(f"{where} says {said} numbers but holds {array.shape[0]} rows of {array.shape[1]}")
    check_action_values(array, where, None)
    return array.astype(np.float32)


def _read_bounded(path: Path, where: str) -> bytes:
    """The file's bytes: a path that is no regular file is refused unopened, one past the bound unread."""
    if not os.path.lexists(path):
        raise InputError(f"{where} does not exist")
    try:
        with open_regular(path, "actions file") as file:
            if os.fstat(file.fileno()).st_size > MAX_ACTIONS_BYTES:
                raise _too_large(where)
            data = file.read(MAX_ACTIONS_BYTES + 1)  # grown since the fstat: read no further than the bound
    except InputError:
        raise
    except (OSError, ValueError) as error:  # too long a name, a symlink loop, a NUL byte (the Python API only)
        raise InputError(f"{where} cannot be read: {getattr(error, 'strerror', None) or error}") from None
    if len(data) > MAX_ACTIONS_BYTES:
        raise _too_large(where)
    return data


def _too_large(where: str) -> InputError:
    return InputError(f"{where} is larger than {format_bytes(MAX_ACTIONS_BYTES)}, the most an actions file may hold")


def _npy_array(data: bytes, where: str, width: int, domain: str) -> np.ndarray:
    """A .npy's rows as float64 [rows, width], its header's dtype and shape checked before its data is read."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:  # 3.0 only differs for named fields, which actions never have
            raise ValueError(f"format version {version}")
        shape, _, dtype = read_header[version](buffer)
    except ValueError as error:
        raise InputError(f"{where} cannot be read as a .npy array ({first_line(error)})") from None
    if dtype.kind not in NUMBER_KINDS or dtype.fields is not None:
        raise InputError(f"{where} holds {dtype} values, not real numbers; save a float32 array")
    if len(shape) not in (1, 2):
        raise InputError(f"{where} holds an array of shape {shape}; actions are [rows, numbers per row], or one row")
    if len(shape) == 1:
        shape = (1, shape[0]) if shape[0] else (0, 0)
    _check_count(where, shape[0])
    _check_width(where, shape[1], width, domain)
    buffer.seek(0)
    try:
        array = np.lib.format.read_array(buffer, allow_pickle=False)  # at most MAX_ACTION_ROWS x width: checked
    except ValueError as error:
        raise InputError(f"{where} cannot be read as a .npy array ({first_line(error)})") from None
    return array.astype(np.float64).reshape(shape)


def _parsed_json(data: bytes | str, where: str) -> object:
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        at = f"line {error.lineno}, column {error.colno}"
        raise InputError(f"{where} is not valid JSON ({at}: {error.msg})") from None
    except (ValueError, RecursionError):  # not UTF-8 (or -16, -32); nested past Python's recursion limit
        raise InputError(f"{where} is not valid JSON text") from None


def _json_rows(found: object, where: str) -> list:
    """The rows of a JSON value: a list of rows, one flat list of numbers, or an object holding them under `actions`."""
    if isinstance(found, dict):
        if "actions" not in found:
            raise InputError(f"{where} is a JSON object without an 'actions' key; put the rows under 'actions'")
        found = found["actions"]
    if not isinstance(found, list):
        raise InputError(f"{where} holds {_shown(found)}, not a list of rows of numbers")
    if found and not any(isinstance(row, list) for row in found):
        return [found]  # one flat list: one row
    for index, row in enumerate(found):
        if not isinstance(row, list):
            raise InputError(f"{where}: row {index + 1} is {_shown(row)}, not a list of numbers")
    return found


def _csv_rows(data: bytes, where: str) -> tuple[list[list[float]], list[int]]:
    """A CSV's rows of numbers and the line each is on; blank lines are skipped, and a first line of names."""
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's byte-order mark is no header
    except UnicodeDecodeError:
        raise InputError(f"{where} is not UTF-8 text") from None
    rows: list[list[float]] = []
    lines: list[int] = []
    header_allowed = True  # only the first line that is not blank
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        values = [_csv_number(field) for field in fields]
        if header_allowed and all(value is None for value in values):
            header_allowed = False
            continue
        header_allowed = False
        if None in values:
            column = values.index(None)
            raise InputError(
                f"{where}: line {number}, column {column + 1}: {_shown(fields[column])} is not a number "
                "(numbers are separated by commas)"
            )
        rows.append(values)
        lines.append(number)
        _check_count(where, len(rows))  # stop reading at the first row past the bound
    return rows, lines


def _csv_number(field: str) -> float | None:
    try:
        return float(field)
    except ValueError:
        return None


def _rows_array(rows: list, where: str, lines: list[int] | None = None) -> np.ndarray:
    """Rows of JSON or CSV values as float64 [rows, width]: every row as long as the first, every value a number."""
    _check_count(where, len(rows))
    width = len(rows[0])
    for index, row in enumerate(rows):
        if len(row) != width:
            length = f"{len(row)} numbers where the rows before it have {width}"
            raise InputError(f"{where}: {_at(index, None, lines)} has {length}")
        for column, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{where}: {_at(index, column, lines)} is {_shown(value)}, not a number")
            if isinstance(value, int) and abs(value) > MAX_ACTION_MAGNITUDE:  # one too large for a float included
                raise _absurd(where, index, column, lines, _shown(value))
    return np.array(rows, dtype=np.float64).reshape(len(rows), width)


def _check_count(where: str, rows: int) -> None:
    if rows == 0:
        raise InputError(f"{where} holds no rows of actions")
    if rows > MAX_ACTION_ROWS:
        raise InputError(f"{where} holds more than {MAX_ACTION_ROWS} rows, the most a run takes")


def _check_width(where: str, found: int, width: int, domain: str) -> None:
    if found != width:
        raise InputError(f"{where}: domain {domain!r} takes {width} numbers per row, the file has {found}")


def check_action_values(array: np.ndarray, where: str, lines: list[int] | None = None) -> None:
    """Refuse NaN, infinity and absurd magnitudes in float64 [rows, width], naming the first (every door's
    action rows: a file's, an HTTP request's, a diffusers call's `raw_actions`)."""
    not_finite = ~np.isfinite(array)
    if not_finite.any():
        row, column = _first(not_finite)
        raise InputError(f"{where}: {_at(row, column, lines)} is {array[row, column]}, not a finite number")
    absurd = np.abs(array) > MAX_ACTION_MAGNITUDE
    if absurd.any():
        row, column = _first(absurd)
        raise _absurd(where, row, column, lines, f"{array[row, column]:g}")


def _first(found: np.ndarray) -> tuple[int, int]:
    row, column = np.argwhere(found)[0]
    return int(row), int(column)


def _absurd(where: str, row: int, column: int, lines: list[int] | None, value: str) -> InputError:
    return InputError(
        f"{where}: {_at(row, column, lines)} is {value}, past ±{MAX_ACTION_MAGNITUDE:g}, the largest accepted "
        "(actions are normalized poses and gripper states): check the file's units"
    )


def _at(row: int, column: int | None, lines: list[int] | None) -> str:
    """Where a value is, counted from 1: "row 3, column 2", with the line for a CSV ("row 3 (line 5), column 2")."""
    line = f" (line {lines[row]})" if lines else ""
    return f"row {row + 1}{line}" + (f", column {column + 1}" if column is not None else "")


def _shown(value: object) -> str:
    """A JSON value as the file spells it, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
