"""Outputs are never lost or clobbered by surprise: written whole through a temporary file beside the
target, read-only files and symlinks respected, one run per output at a time, nothing left behind
by a failure, a kill, Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from cosmos3_offload.app import outputs, runner, video_io
from cosmos3_offload.app.cli import main
from cosmos3_offload.app.outputs import OutputLock, check_output, write_output
from cosmos3_offload.app.report import shown_path
from cosmos3_offload.errors import InputError

SUFFIXES = [".mp4", ".jpg", ".png"]
TEMPORARY = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.partial(?P<suffix>\.\w+)")
OLD = b"the user's earlier video"


def frames(count: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(count, 64, 96, 3), dtype=np.uint8)


def frames_for(suffix: str) -> np.ndarray:
    return frames(5 if suffix == ".mp4" else 1)


def cli_frames(suffix: str) -> list[str]:
    """The cheapest generate flags for an output with this suffix."""
    return ["--frames", "5" if suffix == ".mp4" else "1", "--steps", "1"]


def generate(*args: str) -> int:
    """Run `cosmos3-offload generate` in this process; its exit status."""
    try:
        return main(["generate", "--prompt", "a fox", "--no-progress", "--device", "cpu", *args])
    except SystemExit as exit_info:
        return exit_info.code


def listing(folder: Path) -> dict[str, bytes | str]:
    """Every name in `folder` with its bytes (a symlink: where it points)."""
    return {
        p.name: os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "<dir>"
        for p in folder.iterdir()
    }


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model fails the test: a refusal must come before anything runs."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded, so the refusal came too late")

    monkeypatch.setattr(runner, "load_components", loaded)


@pytest.fixture
def recorded(monkeypatch):
    """The paths encode_frames was asked to write."""
    calls: list[Path] = []
    real = outputs.encode_frames

    def encode(frames, path, fps, sound=None):
        calls.append(Path(path))
        real(frames, path, fps, sound)

    monkeypatch.setattr(outputs, "encode_frames", encode)
    return calls


# --- whole or not at all -------------------------------------------------------------------------


def test_mp4_has_every_frame_at_its_size(tmp_path):
    """An mp4 reads back with the frame count and size written."""
    write_output(frames(9), tmp_path / "v.mp4", fps=24)
    assert iio.imread(tmp_path / "v.mp4").shape == (9, 64, 96, 3)


def test_png_is_lossless(tmp_path):
    """One frame to .png reads back bit-identical."""
    image = frames(1)
    write_output(image, tmp_path / "i.png", fps=24)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "i.png")), image[0])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_written_through_a_temporary_file_beside_the_target(tmp_path, monkeypatch, suffix):
    """Fails when the encoder writes the target in place (a crash would leave half a video over the old one)."""
    target = tmp_path / f"out{suffix}"
    target.write_bytes(OLD)
    old_inode = target.stat().st_ino
    seen = []
    real = outputs.encode_frames

    def encode(frames, path, fps, sound=None):
        seen.append((Path(path), target.read_bytes()))
        real(frames, path, fps, sound)

    monkeypatch.setattr(outputs, "encode_frames", encode)
    write_output(frames_for(suffix), target, fps=24)
    [(temporary, held)] = seen
    match = TEMPORARY.fullmatch(temporary.name)
    assert temporary.parent == tmp_path and match and match["name"] == target.name and match["suffix"] == suffix
    assert held == OLD  # the old file stayed whole while the new one was being encoded
    assert not temporary.exists() and sorted(listing(tmp_path)) == [target.name]
    assert target.stat().st_ino != old_inode and target.read_bytes() != OLD  # renamed into place


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_failing_encoder_leaves_nothing(tmp_path, monkeypatch, suffix, existing):
    """Fails when a failed encode leaves a temporary file, a half-written output, or touches the old file."""

    def broken_video(frames, path, *args, **kwargs):
        Path(path).write_bytes(b"half a video")
        raise OSError("disk full")

    def broken_image(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half an image")
        raise OSError("disk full")

    monkeypatch.setattr(video_io, "_write_mp4", broken_video)
    monkeypatch.setattr(video_io.Image.Image, "save", broken_image)
    target = tmp_path / f"out{suffix}"
    if existing:
        target.write_bytes(OLD)
        target.chmod(0o640)
    with pytest.raises(OSError, match="disk full"):
        write_output(frames_for(suffix), target, fps=24)
    assert listing(tmp_path) == ({target.name: OLD} if existing else {})
    if existing:
        assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_a_frame_count_the_suffix_cannot_hold_is_not_written(tmp_path):
    """Fails when one frame is written as a JPEG under a .mp4 name (or a clip to a .jpg)."""
    with pytest.raises(ValueError, match="go to a file ending in"):
        write_output(frames(1), tmp_path / "v.mp4", fps=24)
    with pytest.raises(ValueError, match="go to a file ending in"):
        write_output(frames(5), tmp_path / "i.jpg", fps=24)
    assert listing(tmp_path) == {}


# --- modes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_file_mode_follows_the_umask(tmp_path, suffix):
    """Fails when a new output gets the temporary file's mode instead of what a plain open() would give."""
    old = os.umask(0o027)
    try:
        write_output(frames_for(suffix), tmp_path / f"o{suffix}", fps=24)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / f"o{suffix}").stat().st_mode) == 0o640


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_replaced_file_keeps_its_mode(tmp_path, suffix):
    """Fails when replacing a writable file changes its permissions (say, makes a private file world-readable)."""
    target = tmp_path / f"o{suffix}"
    target.write_bytes(OLD)
    target.chmod(0o604)
    write_output(frames_for(suffix), target, fps=24)
    assert target.read_bytes() != OLD and stat.S_IMODE(target.stat().st_mode) == 0o604


@pytest.mark.parametrize("through_link", [False, True], ids=["file", "symlink"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_read_only_target_is_refused_before_anything_runs(capsys, tmp_path, no_load, suffix, through_link):
    """Fails when a read-only (0444) output is overwritten or changed, or refused otherwise than one line, exit 2."""
    target = tmp_path / f"kept{suffix}"
    target.write_bytes(OLD)
    target.chmod(0o444)
    given = target
    if through_link:
        given = tmp_path / f"link{suffix}"
        given.symlink_to(target.name)
    before = listing(tmp_path)
    assert generate(*cli_frames(suffix), "--output", str(given)) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and len(err.strip().splitlines()) == 1
    assert listing(tmp_path) == before and stat.S_IMODE(target.stat().st_mode) == 0o444


def test_made_read_only_after_the_check_is_refused_when_the_run_starts(tmp_path):
    """Fails when a file made read-only between building the request and running it is replaced anyway."""
    target = tmp_path / "o.mp4"
    target.write_bytes(OLD)
    check_output(target, frames=5)
    target.chmod(0o444)
    with pytest.raises(InputError, match="read-only"), OutputLock(target):
        pass
    assert listing(tmp_path) == {"o.mp4": OLD}  # and the lock file is gone


# --- symlinks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_symlink_output_writes_the_file_it_points_to(tmp_path, recorded, suffix):
    """Fails when writing through a symlink replaces the link by a file (or writes beside the link)."""
    (tmp_path / "links").mkdir()
    (tmp_path / "videos").mkdir()
    real = tmp_path / "videos" / f"real{suffix}"
    real.write_bytes(OLD)
    real.chmod(0o640)
    link = tmp_path / "links" / f"link{suffix}"
    link.symlink_to(os.path.join("..", "videos", real.name))
    check_output(link, frames=frames_for(suffix).shape[0])
    write_output(frames_for(suffix), link, fps=24)
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "videos", real.name)
    assert real.read_bytes() != OLD and stat.S_IMODE(real.stat().st_mode) == 0o640
    assert [path.parent for path in recorded] == [real.parent]  # the temporary file beside the target
    assert sorted(listing(tmp_path / "links")) == [link.name] and sorted(listing(real.parent)) == [real.name]


def test_dangling_symlink_into_an_existing_folder_writes_its_target(tmp_path):
    """Fails when a run to a symlink whose target does not exist yet is refused or replaces the link."""
    (tmp_path / "videos").mkdir()
    link = tmp_path / "link.jpg"
    link.symlink_to("videos/new.jpg")
    assert generate(*cli_frames(".jpg"), "--output", str(link)) == 0
    assert link.is_symlink() and os.readlink(link) == "videos/new.jpg"
    assert iio.imread(tmp_path / "videos" / "new.jpg").shape == (192, 320, 3)
    assert sorted(listing(tmp_path / "videos")) == ["new.jpg"]


def test_symlink_loop_is_refused(tmp_path):
    """Fails when an output that is a symlink loop is accepted (the write would replace the link)."""
    loop = tmp_path / "loop.mp4"
    loop.symlink_to("loop.mp4")
    with pytest.raises(InputError, match="symlink loop"):
        check_output(loop, frames=5)


# --- names ---------------------------------------------------------------------------------------


def test_name_too_long_for_the_temporary_file_is_refused_before_the_run(tmp_path):
    """Fails when an output name that fits but whose temporary file does not is accepted (the run fails at the end)."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = "a" * (limit - len(".12345678.partial.mp4") - 1 - len(".mp4")) + ".mp4"
    check_output(tmp_path / longest, frames=5)  # its temporary file just fits
    write_output(frames(5), tmp_path / longest, fps=24)
    too_long = "b" + longest
    with pytest.raises(InputError, match="too long"):
        check_output(tmp_path / too_long, frames=5)
    assert sorted(listing(tmp_path)) == [longest]


# --- one run per output --------------------------------------------------------------------------


@pytest.mark.parametrize("through_link", [False, True], ids=["same-path", "symlink"])
def test_second_run_to_a_held_output_is_refused_at_start(capsys, tmp_path, no_load, through_link):
    """Fails when two runs to one output both go ahead (one video silently lost) or the refusal is not one line."""
    target = tmp_path / "o.mp4"
    given = target
    if through_link:
        given = tmp_path / "elsewhere.mp4"
        given.symlink_to(target.name)
    with OutputLock(target):
        before = listing(tmp_path)
        assert generate(*cli_frames(".mp4"), "--output", str(given)) == 2
        after = listing(tmp_path)
    captured = capsys.readouterr()
    assert "another run is writing" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == "" and after == before
    assert sorted(listing(tmp_path)) == ([given.name] if through_link else [])  # the lock file left with its holder


def test_another_output_in_the_same_folder_is_not_refused(capsys, tmp_path):
    """Fails when holding one output blocks a run to a different file in the same folder, or its lock file stays."""
    with OutputLock(tmp_path / "a.mp4"):
        assert generate(*cli_frames(".jpg"), "--output", str(tmp_path / "b.jpg")) == 0
        assert sorted(listing(tmp_path)) == [".a.mp4.lock", "b.jpg"]
    assert sorted(listing(tmp_path)) == ["b.jpg"]
    assert "wrote" in capsys.readouterr().out


def test_what_a_killed_run_left_does_not_block_and_is_cleared(capsys, tmp_path):
    """Fails when a killed run's lock file (present, not locked) blocks the next run, or its temporary file stays."""
    (tmp_path / ".o.jpg.lock").write_bytes(b"")
    (tmp_path / ".o.jpg.0123abcd.partial.jpg").write_bytes(b"half an image")
    assert generate(*cli_frames(".jpg"), "--output", str(tmp_path / "o.jpg")) == 0, capsys.readouterr().err
    assert sorted(listing(tmp_path)) == ["o.jpg"]


def test_lock_is_released_after_a_failure(tmp_path):
    """Fails when a run that fails inside the lock leaves its lock file behind or keeps the output held."""
    with pytest.raises(RuntimeError), OutputLock(tmp_path / "o.mp4"):
        raise RuntimeError("the run failed")
    assert listing(tmp_path) == {}
    with OutputLock(tmp_path / "o.mp4"):
        pass


def test_stale_temporary_files_are_removed_and_nothing_else(tmp_path):
    """Fails when taking the lock leaves a killed run's temporary files, or deletes any other file of the folder."""
    stale = [".o.mp4.0123abcd.partial.mp4", ".o.mp4.ffffffff.partial.mp4"]
    kept = [
        "o.mp4",  # the output itself stays until the new one replaces it
        "notes.txt",
        ".o.mp4.0123abcd.partial.mp4.bak",
        ".o.mp4.0123abcd.partial.jpg",
        ".o.mp4.notahexid.partial.mp4",
        ".other.mp4.0123abcd.partial.mp4",  # another output's, maybe being written by another run
        ".o1.mp4.0123abcd.partial.mp4",
        ".oo.mp4.0123abcd.partial.mp4",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(name.encode())
    with OutputLock(tmp_path / "o.mp4"):
        assert sorted(listing(tmp_path)) == sorted([*kept, ".o.mp4.lock"])
    assert listing(tmp_path) == {name: name.encode() for name in kept}


@pytest.mark.parametrize("name", ["o[1].mp4", "o*.mp4", "o?.mp4"])
def test_glob_characters_in_the_name_do_not_widen_the_cleanup(tmp_path, name):
    """Fails when an output named with [, * or ? makes another output's temporary file (being written?) look stale."""
    others = [".o1.mp4.0123abcd.partial.mp4", ".ox.mp4.0123abcd.partial.mp4", ".o.mp4.0123abcd.partial.mp4"]
    for other in others:
        (tmp_path / other).write_bytes(b"another run's video")
    ours = f".{name}.0123abcd.partial.mp4"
    (tmp_path / ours).write_bytes(b"stale")
    with OutputLock(tmp_path / name):
        pass
    assert sorted(listing(tmp_path)) == sorted(others)


# --- the report ----------------------------------------------------------------------------------


def test_report_escapes_terminal_controls_in_the_output_name(capsys, tmp_path):
    """Fails when the report after a run prints an output name's ESC raw (a name with ESC[2J clears the screen)."""
    target = tmp_path / "o\x1b[2J.jpg"
    assert generate(*cli_frames(".jpg"), "--output", str(target)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.startswith(f"wrote {str(target)!r} (1 frame, ")
    assert target.is_file()


@pytest.mark.parametrize(
    "path, shown",
    [
        ("out/fox ü.mp4", "out/fox ü.mp4"),
        ("o\nwrote x.mp4", "'o\\nwrote x.mp4'"),
        ("o\u202e4pm.jpg", "'o\\u202e4pm.jpg'"),
    ],
    ids=["plain", "newline", "bidi-override"],
)
def test_report_paths_are_plain_unless_a_terminal_would_act_on_them(path, shown):
    """Fails when a plain path is quoted in the report, or a newline or bidi override is printed raw."""
    assert shown_path(Path(path)) == shown


# --- interrupts ----------------------------------------------------------------------------------


def wait_for(condition, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            _, err = process.communicate(timeout=30)
            pytest.fail(f"the run ended (status {process.returncode}) before it was interrupted: {err}")
        if time.monotonic() > deadline:
            pytest.fail(f"not there after {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize(
    "signum, status, said",
    [
        (signal.SIGINT, 130, "interrupted; nothing was written"),
        (signal.SIGTERM, 143, "terminated; nothing was written"),
    ],
    ids=["SIGINT", "SIGTERM"],
)
def test_interrupt_in_the_denoise_leaves_nothing(tmp_path, signum, status, said):
    """Fails when Ctrl-C or SIGTERM mid-run prints a traceback, exits otherwise than 130/143, or leaves a file."""
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "o.mp4"
    command = [sys.executable, "-m", "cosmos3_offload.app.cli", "generate", "--prompt", "a fox", "--no-progress"]
    command += ["--device", "cpu", "--frames", "17", "--steps", "300", "--output", str(output)]
    # A pytest started in the background from a script ignores SIGINT, and a child inherits SIG_IGN (POSIX):
    # the run must start as a terminal's would, with SIGINT at its default, or Ctrl-C is never delivered.
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for((folder / ".o.mp4.lock").exists, 120, process)  # taken just before loading
        time.sleep(1.0)  # loading and prefill take a tenth of that; 300 steps take several seconds
        with pytest.raises(InputError, match="another run is writing"), OutputLock(output):
            pass  # the lock holds across processes too
        assert process.poll() is None, "the run ended before it was interrupted"
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == status, err
    assert err.splitlines() == [f"cosmos3-offload: {said}"]
    assert out == "" and listing(folder) == {}
