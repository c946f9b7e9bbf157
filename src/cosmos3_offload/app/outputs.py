"""The output file: checked before anything runs, held for the run, written whole or not at all.

- `check_output` refuses, before anything loads, a wrong suffix, a missing or unwritable folder,
  a folder in the file's place, a symlink loop, a name too long for the temporary file beside it
  and a read-only existing file (its mode is the user's word, even for root, who could write it
  anyway; a file we may not write for want of permission is refused too).
- A symlink is followed: the video lands in the file it points to, and the link stays.
- `OutputLock` holds an advisory lock (`flock`) on a lock file beside the target for the whole
  run, so a second run to the same output is refused at its start instead of both reporting
  success while one video is lost. Taking the lock checks the existing file again (the request
  may have been built long before the run) and removes the temporary files of killed runs for
  that output (nobody else can be writing them while the lock is held); only names of exactly
  the temporary files' form are removed, whatever characters the output's name holds.
- `write_output` encodes into a temporary file in the target's folder, flushes it to the disk
  and renames it over the target only when complete and read back (see `video_io`), with the
  existing file's mode and owner (or the umask's mode for a new file). Any failure (a full disk, a
  failing encoder) is an `OutputFailed`, an OSError with the cause's errno (ENOSPC for a full disk)
  naming the output: the temporary file is removed and an existing file is left as it was.
- `StreamedOutput` does the same for an mp4 encoded while the video is decoded (mp4_stream.py): ffmpeg
  writes the temporary file as the frames come; leaving it unfinished stops ffmpeg and removes the file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import numpy as np

from ..errors import InputError
from .action_files import actions_json
from .mp4_stream import Mp4Stream
from .video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, encode_frames

PARTIAL_MARK = ".partial"
_TOKEN_HEX = 4  # bytes of randomness in a temporary file's name (8 hex digits)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputFailed(OSError):
    """The output could not be written, and nothing new is at its path. `errno` is the cause's where it is
    known (ENOSPC for a full disk, EDQUOT for a quota; None for an encoder that failed otherwise),
    `strerror` says what failed and `filename` is the output as given."""

    def __str__(self) -> str:
        return f"cannot write {self.filename!r}: {self.strerror}"


def resolve_target(path: Path) -> Path:
    """The file a write to `path` should replace: symlinks followed, the link itself left in place."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_output(path: Path, frames: int, actions: bool = False) -> None:
    """Refuse an output that cannot be written as asked, before anything is loaded (with `actions`, the
    NAME.actions.* files an action run writes beside it too)."""
    suffixes = IMAGE_SUFFIXES if frames == 1 else VIDEO_SUFFIXES
    kind = "an image (1 frame)" if frames == 1 else "a video"
    if path.suffix.lower() not in suffixes:
        raise InputError(f"output {str(path)!r} is {kind}: give it one of the suffixes {', '.join(suffixes)}")
    if path.is_symlink():
        try:
            os.stat(path)
        except FileNotFoundError:
            pass  # a dangling link: the file it names is created
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise InputError(f"output {str(path)!r} is a symlink loop; choose another --output") from None
            raise
    target = resolve_target(path)
    folder = target.parent
    if not folder.is_dir():
        raise InputError(f"output folder {str(folder)!r} does not exist; create it first")
    _check_existing(path, target)
    if actions:
        for file in actions_beside(target):
            _check_existing(file, file)
    # Try it, with a name as long as the temporary file's: permission bits say nothing to root, and
    # read-only mounts say nothing to os.access. Left by a kill, it is removed like a temporary file.
    probe = _temporary_path(target)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise InputError(
                f"output name {target.name!r} is too long for the temporary file written beside it; "
                "choose a shorter --output"
            ) from None
        if error.errno in _DISK_FULL:  # not the request's fault: a disk error, as one while writing is
            raise OutputFailed(error.errno, error.strerror, str(path)) from None
        raise InputError(f"output folder {str(folder)!r} is not writable; choose another --output") from None
    probe.unlink(missing_ok=True)


def _check_existing(path: Path, target: Path) -> None:
    """Refuse a target that is a folder, not a regular file, or an existing file the user may not replace."""
    if target.is_dir():
        raise InputError(f"output {str(path)!r} is a folder; give a file name")
    if target.exists():
        if not target.is_file():
            raise InputError(f"output {str(path)!r} is not a regular file; choose another --output")
        # No write bit: read-only by the user's word, even for root. Else we must be let write it.
        writable = target.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) and os.access(target, os.W_OK)
        if not writable:
            raise InputError(f"output {str(path)!r} exists and is read-only; remove it or choose another --output")


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _temporary_path(target: Path) -> Path:
    """A fresh name beside `target` of the form `_partial_files` recognises: .NAME.XXXXXXXX.partial.SUFFIX"""
    return target.parent / f".{target.name}.{secrets.token_hex(_TOKEN_HEX)}{PARTIAL_MARK}{target.suffix}"


def _partial_files(target: Path) -> list[Path]:
    """The temporary files of `target` in its folder. Matched literally, not as a glob: a `[` or `*` in
    the output's name must not make another output's temporary file (being written) look like ours."""
    pattern = re.compile(
        rf"\.{re.escape(target.name)}\.[0-9a-f]{{{2 * _TOKEN_HEX}}}{re.escape(PARTIAL_MARK + target.suffix)}",
        re.DOTALL,
    )
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [target.parent / name for name in names if pattern.fullmatch(name)]


class OutputLock:
    """`with OutputLock(path):` holds the output for this run; a second holder is refused at once."""

    def __init__(self, path: Path):
        self.target = resolve_target(path)
        self.lock_file = _lock_path(self.target)
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        while True:
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as error:
                if error.errno in _DISK_FULL:
                    raise OutputFailed(error.errno, error.strerror, str(self.target)) from None
                raise InputError(f"cannot create a lock file beside {str(self.target)!r}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise InputError(
                    f"another run is writing {str(self.target)!r}; wait for it or choose another --output"
                ) from None
            # The holder before us may have removed the file after we opened it: then lock anew.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_file))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                break
            os.close(fd)
        try:
            _check_existing(self.target, self.target)  # made read-only since the request was checked?
        except BaseException:
            self._release()
            raise
        for stale in _partial_files(self.target):  # left by killed runs: nobody else can be writing them
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._release()

    def _release(self) -> None:
        assert self.fd is not None
        self.lock_file.unlink(missing_ok=True)  # while still locked: a waiting opener sees it was removed
        os.close(self.fd)
        self.fd = None


class ActionRows(NamedTuple):
    """An action run's predicted actions [chunk, width] to write beside its video: NAME.actions.npy and
    NAME.actions.json for the output NAME.mp4 (beside the file a symlink names, as the video), or the files
    `paths` names (a sample's folder)."""

    values: np.ndarray
    mode: str
    domain: str
    paths: tuple[Path, Path] | None = None

    def files(self, output: Path) -> tuple[Path, Path]:
        """(the .npy, the .json) for `output`."""
        return self.paths if self.paths is not None else actions_beside(output)


def actions_beside(output: Path) -> tuple[Path, Path]:
    """(NAME.actions.npy, NAME.actions.json) beside the video NAME.mp4: where an action run's actions go."""
    return output.parent / f"{output.stem}.actions.npy", output.parent / f"{output.stem}.actions.json"


def write_output(
    frames: np.ndarray,
    path: Path,
    fps: float,
    sound: tuple[np.ndarray, int] | None = None,
    actions: ActionRows | None = None,
) -> None:
    """Write `frames` (and the audio track `sound`: waveform, sample rate; the predicted `actions` beside it)
    to `path` (through a symlink to its target) whole or not at all: OutputFailed when not. Every file is
    written in full under a temporary name first, so a failure leaves none of them changed."""
    target = resolve_target(path)
    temporary = _temporary_path(target)
    try:
        _commit(path, temporary, lambda: encode_frames(frames, temporary, fps, sound), actions)
    finally:
        temporary.unlink(missing_ok=True)


class StreamedOutput:
    """An mp4 output encoded while the video is decoded (see mp4_stream.py), written whole or not at all as
    `write_output`'s: `with StreamedOutput(path, fps) as output:`, the sound (if any) with `sound(...)` before the
    first frames, the decode's `frames_ready(video, done)`, then `finish(actions)`. Leaving the block without
    `finish` (an error, a cancel, Ctrl-C) stops ffmpeg and removes its file: nothing new is at `path`."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.temporary = _temporary_path(resolve_target(path))
        self.sound_track: tuple[np.ndarray, int] | None = None
        self.stream: Mp4Stream | None = None

    def sound(self, waveform: np.ndarray, sample_rate: int) -> None:
        """The audio track (float [channels, samples] in [-1, 1]), muxed as `write_output` does: before any frame."""
        assert self.stream is None, "the sound goes to ffmpeg when it starts, with the first frames"
        self.sound_track = (waveform, sample_rate)

    def frames_ready(self, video: np.ndarray, done: int) -> None:
        """The decode's word: the frames [0, done) of `video` are final (ffmpeg starts on the first word)."""
        if self.stream is None:
            self.stream = Mp4Stream(self.temporary, self.fps, self.sound_track)
        try:
            self.stream.frames_ready(video, done)
        except OSError as error:  # ffmpeg could not start
            raise OutputFailed(error.errno, error.strerror or str(error), str(self.path)) from error

    def finish(self, actions: ActionRows | None = None) -> None:
        """Every frame is final: wait for the encoder, then put the video (and `actions` beside it) in place."""
        assert self.stream is not None, "no frames were decoded"
        self.stream, stream = None, self.stream
        try:
            _commit(self.path, self.temporary, stream.finish, actions)
        except BaseException:
            stream.abort()
            raise

    def __enter__(self) -> StreamedOutput:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self.stream is not None:  # left before `finish`
            self.stream.abort()
            self.stream = None
        self.temporary.unlink(missing_ok=True)


def _commit(path: Path, temporary: Path, encode: Callable[[], None], actions: ActionRows | None) -> None:
    """`encode()` writes `temporary`; then it and `actions` replace their targets, or OutputFailed and none does."""
    target = resolve_target(path)
    # The actions' temporary files take the video's temporary form, so a killed run's are cleared with its.
    finished = [] if actions is None else [(_temporary_path(target), file) for file in actions.files(target)]
    try:
        if actions is not None:
            (npy, _), (text, _) = finished
            with open(npy, "wb") as file:
                np.save(file, actions.values.astype(np.float32), allow_pickle=False)
            text.write_text(actions_json(actions.values, mode=actions.mode, domain=actions.domain))
            for written, _ in finished:
                _flush_to_disk(written)
        encode()
        _settle_temporary(temporary, target)
        for written, file in finished:
            os.replace(written, file)
        os.replace(temporary, target)
    except OSError as error:
        raise OutputFailed(error.errno, error.strerror or str(error), str(path)) from error
    finally:
        temporary.unlink(missing_ok=True)
        for written, _ in finished:
            written.unlink(missing_ok=True)
    _flush_to_disk(target.parent, required=False)  # the rename itself


def _settle_temporary(temporary: Path, target: Path) -> None:
    """`temporary`, encoded and read back, given the mode and owner it will have as `target`, flushed to the disk."""
    try:
        existing = target.stat()
    except FileNotFoundError:
        existing = None
    if existing is not None:
        try:  # keep the owner of the file replaced (root writing a user's file); before chmod, which it resets
            os.chown(temporary, existing.st_uid, existing.st_gid)
        except OSError:
            pass  # not ours to give away: the file becomes ours, as a copy would
    os.chmod(temporary, stat.S_IMODE(existing.st_mode) if existing is not None else 0o666 & ~_current_umask())
    _flush_to_disk(temporary)  # else a crash just after the rename can leave an empty file in its place


def _flush_to_disk(path: Path, *, required: bool = True) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if required:
            raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
