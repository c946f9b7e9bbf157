"""Action files: every format gives back the exact float32 rows, our own output drives a forward-dynamics run, and
a file that cannot be used is one line naming it and where, before anything heavy is read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cosmos3_offload.app import action_files
from cosmos3_offload.app.action_files import (
    MAX_ACTION_ROWS,
    actions_from_json,
    actions_json,
    read_actions,
)
from cosmos3_offload.errors import InputError

WIDTH = 3
DOMAIN = "bridge_orig_lerobot"


def rows(count: int = 5, width: int = WIDTH) -> np.ndarray:
    """float32 values with full mantissas (none is a short decimal), so a lossy writer or reader shows."""
    return np.random.default_rng(count).standard_normal((count, width)).astype(np.float32)


def csv_text(values: np.ndarray) -> str:
    return "".join(", ".join(repr(float(x)) for x in row) + "\n" for row in values)


def refused(path: Path, width: int = WIDTH, domain: str = DOMAIN) -> str:
    """The one-line refusal of `path`, which names it."""
    with pytest.raises(InputError) as caught:
        read_actions(path, width, domain)
    message = str(caught.value)
    assert "\n" not in message and repr(str(path)) in message, message
    return message


def write_npy(path: Path, values) -> Path:
    with open(path, "wb") as file:  # np.save(path) would append .npy to other suffixes
        np.save(file, values, allow_pickle=True)
    return path


@pytest.mark.parametrize("suffix", [".npy", ".json", ".csv", ".CSV"])
def test_each_format_gives_back_the_exact_float32_rows(tmp_path, suffix):
    """Fails when a format loses a float32 bit, reorders rows, or a suffix's case matters."""
    values = rows()
    path = tmp_path / f"a{suffix}"
    if suffix == ".npy":
        write_npy(path, values)
    elif suffix == ".json":
        path.write_text(json.dumps([[float(x) for x in row] for row in values]))
    else:
        path.write_text(csv_text(values))
    found = read_actions(path, WIDTH, DOMAIN)
    assert found.dtype == np.float32 and found.shape == values.shape
    assert np.array_equal(found, values)


@pytest.mark.parametrize(
    "name, write",
    [
        pytest.param("header.csv", lambda p, v: p.write_text("x, y, gripper\n\n" + csv_text(v) + "\n\n"), id="csv"),
        pytest.param("bom.csv", lambda p, v: p.write_bytes(b"\xef\xbb\xbf" + csv_text(v).encode()), id="bom"),
        pytest.param("one.npy", lambda p, v: write_npy(p, v[0]), id="npy-1d"),
        pytest.param("object.json", lambda p, v: p.write_text(json.dumps({"actions": v.tolist(), "t": 1})), id="obj"),
        pytest.param("flat.json", lambda p, v: p.write_text(json.dumps(v[0].tolist())), id="json-flat"),
        pytest.param("f64.npy", lambda p, v: write_npy(p, v.astype(np.float64)), id="npy-float64"),
    ],
)
def test_header_csv_one_row_and_cosmos_style_json_are_read(tmp_path, name, write):
    """Fails when a CSV header (or a spreadsheet's byte-order mark), a 1-D .npy, a flat JSON list or an object
    with 'actions' (cosmos-framework's files) is refused or read as other rows."""
    values = rows()
    path = tmp_path / name
    write(path, values)
    expected = values[:1] if name.startswith(("one", "flat")) else values
    assert np.array_equal(read_actions(path, WIDTH, DOMAIN), expected)


def test_written_actions_read_back_exactly_and_drive_a_forward_dynamics_run(tmp_path):
    """Fails when the JSON written for predicted actions is not exact for float32, is not strict JSON, lacks its
    fields, or cannot be given back as a forward-dynamics run's actions file."""
    values = rows(16)
    values[0, 0] = np.float32(1e-30)  # a tiny value and the float32 just above 1 survive too
    values[1, 1] = np.nextafter(np.float32(1), np.float32(2))
    text = actions_json(values, mode="policy", domain=DOMAIN)
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} written"))
    assert {key: strict[key] for key in ("mode", "domain", "width", "rows")} == {
        "mode": "policy",
        "domain": DOMAIN,
        "width": WIDTH,
        "rows": 16,
    }
    back = actions_from_json(text)
    assert back.dtype == np.float32 and np.array_equal(back, values)
    (tmp_path / "out.actions.json").write_text(text)
    assert np.array_equal(read_actions(tmp_path / "out.actions.json", WIDTH, DOMAIN), values)


@pytest.mark.parametrize(
    "text, said",
    [
        pytest.param("{", "is not valid JSON (line 1", id="not-json"),
        pytest.param('{"actions": [[1, 2, 3]], "width": 3}', "'actions', 'rows' and 'width'", id="no-rows"),
        pytest.param('{"actions": [[1, 2, 3]], "width": 3, "rows": 2}', "says 2 rows of 3", id="lying-rows"),
        pytest.param('{"actions": [[1, 2, NaN]], "width": 3, "rows": 1}', "row 1, column 3 is nan", id="nan"),
    ],
)
def test_actions_json_that_is_not_ours_is_refused(text, said):
    """Fails when actions_from_json returns rows from text that is not a consistent actions_json object."""
    with pytest.raises(InputError) as caught:
        actions_from_json(text)
    assert said in str(caught.value)


def test_the_width_refusal_names_the_domain_and_both_counts(tmp_path):
    """Fails when a file with the wrong number of values per row is taken, or the message hides what is expected."""
    (tmp_path / "a.csv").write_text("1, 2, 3\n4, 5, 6\n")
    message = refused(tmp_path / "a.csv", width=2, domain="pusht")
    assert message.endswith("domain 'pusht' takes 2 numbers per row, the file has 3")
    write_npy(tmp_path / "a.npy", np.zeros((4, 3), np.float32))
    assert "takes 2 numbers per row, the file has 3" in refused(tmp_path / "a.npy", width=2, domain="pusht")


def csv_rows(count: int) -> str:
    return "1, 2, 3\n" * count


@pytest.mark.parametrize(
    "name, content, said",
    [
        ("a.txt", "1, 2, 3\n", "is not a .npy, .json or .csv file"),
        ("broken.json", "[[1, 2, 3],\n [4, 5", "is not valid JSON (line 2"),
        ("words.csv", "a, b, c\n1, 2, 3\n4, x, 6\n", 'line 3, column 2: "x" is not a number'),
        ("trailing.csv", "1, 2, 3,\n", 'line 1, column 4: "" is not a number'),
        ("latin1.csv", b"x\xe9, y, z\n1, 2, 3\n", "is not UTF-8 text"),
        ("ragged.json", "[[1, 2, 3], [4, 5]]", "row 2 has 2 numbers where the rows before it have 3"),
        ("ragged.csv", "x, y, z\n1, 2, 3\n\n4, 5\n", "row 2 (line 4) has 2 numbers where the rows before it have 3"),
        ("mixed.json", "[[1, 2, 3], 4]", "row 2 is 4, not a list of numbers"),
        ("empty.json", "[]", "holds no rows"),
        ("empty.csv", "", "holds no rows"),
        ("header-only.csv", "x, y, z\n\n", "holds no rows"),
        ("long.csv", csv_rows(MAX_ACTION_ROWS + 1), f"more than {MAX_ACTION_ROWS} rows"),
        ("long.json", json.dumps([[1, 2, 3]] * (MAX_ACTION_ROWS + 1)), f"more than {MAX_ACTION_ROWS} rows"),
        ("nan.json", "[[1, 2, 3], [NaN, 5, 6]]", "row 2, column 1 is nan, not a finite number"),
        ("inf.json", "[[1, 2, 3], [4, 5, 1e999]]", "row 2, column 3 is inf, not a finite number"),
        ("nan.csv", "x, y, z\n1, 2, 3\n4, nan, 6\n", "row 2 (line 3), column 2 is nan"),
        ("inf.csv", "1, 2, 3\n4, 5, -inf\n", "row 2 (line 2), column 3 is -inf"),
        ("big.json", "[[1, 2, 3], [4, 5, 1e5]]", "row 2, column 3 is 100000, past ±10000"),
        ("big.csv", "1, 2, 3\n4, -10000.5, 6\n", "row 2 (line 2), column 2 is -10000.5, past ±10000"),
        ("huge-int.json", json.dumps([[1, 2, 10**400]]), "row 1, column 3 is 1000000000"),
        ("bool.json", "[[1, true, 3]]", "row 1, column 2 is true, not a number"),
        ("string.json", '[[1, 2, "3"]]', 'row 1, column 3 is "3", not a number'),
        ("null.json", "[[null, 2, 3]]", "row 1, column 1 is null, not a number"),
        ("nested.json", "[[1, [2], 3]]", "row 1, column 2 is [2], not a number"),
        ("no-actions.json", '{"rows": [[1, 2, 3]]}', "without an 'actions' key"),
        ("number.json", "3", "holds 3, not a list of rows"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "is not valid JSON"),
    ],
)
def test_text_files_that_cannot_be_used_are_refused_in_one_line(tmp_path, name, content, said):
    """Fails when a JSON or CSV file that is unparseable, ragged, empty, too long, non-finite, absurd or of
    non-numbers is taken, or its refusal is not one line naming the file and where."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert said in refused(path)


@pytest.mark.parametrize(
    "values, said",
    [
        (np.array([[1, 2, 3]], dtype=object), "holds object values, not real numbers"),
        (np.zeros((2, 3), np.complex64), "holds complex64 values, not real numbers"),
        (np.zeros((2, 3), bool), "holds bool values, not real numbers"),
        (np.zeros(3, dtype=[("x", "f4")]), "not real numbers"),
        (np.zeros((2, 3, 1), np.float32), "holds an array of shape (2, 3, 1)"),
        (np.zeros((0, 3), np.float32), "holds no rows"),
        (np.zeros(0, np.float32), "holds no rows"),
        (np.zeros((MAX_ACTION_ROWS + 1, 3), np.float32), f"more than {MAX_ACTION_ROWS} rows"),
        (np.array([[1, 2, 3], [4, np.nan, 6]], np.float32), "row 2, column 2 is nan"),
        (np.array([[1, 2, 3], [4, 5, 2e4]], np.float32), "row 2, column 3 is 20000, past ±10000"),
        (np.array([[1, 2, 3], [4, 5, 2**62]], np.int64), "row 2, column 3 is 4.61169e+18, past ±10000"),
        (np.array([[1, 2, 3]], np.float64) * 1e300, "row 1, column 1 is 1e+300, past ±10000"),
    ],
    ids=["object", "complex", "bool", "structured", "3d", "no-rows", "empty-1d", "long", "nan", "big", "int", "f64"],
)
def test_npy_files_that_cannot_be_used_are_refused_in_one_line(tmp_path, values, said):
    """Fails when a .npy of non-numbers, the wrong rank, no or too many rows, or non-finite or absurd values
    is taken (a float64 past float32's range is refused as absurd, not turned into inf), or said otherwise."""
    assert said in refused(write_npy(tmp_path / "a.npy", values))


def test_a_npy_header_is_checked_before_its_data_is_read(tmp_path):
    """Fails when a .npy whose header claims 10**12 rows is allocated or read, or a truncated or foreign file
    is not refused as unreadable."""
    path = tmp_path / "lying.npy"
    with open(path, "wb") as file:
        header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, WIDTH)}
        np.lib.format.write_array_header_1_0(file, header)
        file.write(bytes(24))
    assert f"more than {MAX_ACTION_ROWS} rows" in refused(path)
    data = write_npy(path, np.zeros((2, 3), np.float32)).read_bytes()
    path.write_bytes(data[:-4])  # one float short
    assert "cannot be read as a .npy array" in refused(path)
    path.write_bytes(b"not numpy at all")
    assert "cannot be read as a .npy array" in refused(path)
    path.write_bytes(b"")
    assert "cannot be read as a .npy array" in refused(path)


@pytest.mark.parametrize("kind", ["missing", "folder", "device", "fifo"])
def test_a_path_that_is_no_regular_file_is_refused_unopened(tmp_path, no_hang, kind):
    """Fails when a FIFO (the read blocks forever), /dev/zero (reads forever) or a folder is opened, or a
    missing file is not named as missing."""
    path = tmp_path / "a.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    said = {
        "missing": "does not exist",
        "folder": "is a folder",
        "device": "a character device, not a regular file",
        "fifo": "a FIFO (named pipe), not a regular file",
    }
    assert said[kind] in refused(path)


def test_a_file_past_the_byte_bound_is_refused_unread(tmp_path, monkeypatch):
    """Fails when a file larger than MAX_ACTIONS_BYTES is read (the bound also caps what parsing allocates), or
    one exactly at the bound is refused."""
    monkeypatch.setattr(action_files, "MAX_ACTIONS_BYTES", 64)
    path = tmp_path / "a.csv"
    path.write_text("1, 2, 3\n" * 8)  # 64 bytes
    assert read_actions(path, WIDTH, DOMAIN).shape == (8, WIDTH)
    path.write_text("1, 2, 3\n" * 8 + " ")
    assert "is larger than 64 B, the most an actions file may hold" in refused(path)
    monkeypatch.undo()
    path.write_bytes(b"")
    os.truncate(path, action_files.MAX_ACTIONS_BYTES + 1)  # sparse: reading it would cost 16 MiB
    assert "is larger than 16.0 MiB" in refused(path)
