"""A full disk or a failing encoder writes nothing: the run fails in one line (exit status 1, an OSError
with errno ENOSPC for a full disk), no temporary or partial file is left, and an existing output is
kept whole. The disk is a real tmpfs filled to the brim (tests/small_disk.py), the encoder a real ffmpeg
or a script standing in for one."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image
from small_disk import FILLER, fill, small_disk

from cosmos3_offload.app import outputs
from cosmos3_offload.app.cli import main
from cosmos3_offload.app.outputs import OutputFailed, OutputLock, check_output, write_output

ROOM = 16 << 10  # bytes left on a "full" disk: ffmpeg writes its header, then fails (the trailer, as reported)
SOUND = (np.zeros((2, 4800), dtype=np.float32), 48000)  # 0.1 s of stereo silence


def frames(count: int) -> np.ndarray:
    """Noise frames [count, 128, 192, 3]: too big to fit in ROOM in any format."""
    return np.random.default_rng(0).integers(0, 256, size=(count, 128, 192, 3), dtype=np.uint8)


def names(folder: Path) -> dict[str, bytes]:
    """Every file of `folder` but the filler, with its bytes."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != FILLER}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`cosmos3-offload ARGS` in this process with the embedded tiny model on the CPU: status, stdout, stderr."""
    try:
        status = main([*args, "--steps", "1", "--device", "cpu", "--no-progress"])
    except SystemExit as exit_info:
        status = exit_info.code
    out, err = capsys.readouterr()
    return status, out, err


def fake_ffmpeg(folder: Path, *, status: int, said: str) -> Path:
    """An ffmpeg that takes every frame, writes half a video and exits with `status` saying `said`;
    any other use (reading a video back) goes to the real one, $REAL."""
    script = folder / "ffmpeg"
    script.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" rawvideo "*) ;; *) exec "$REAL" "$@";; esac\n'
        "cat > /dev/null\n"  # every frame taken, as a real ffmpeg failing at the trailer does
        'for last; do :; done; printf "half a video" > "${last#file:}"\n'
        f"echo '{said}' >&2\n"
        f"exit {status}\n"
    )
    script.chmod(0o755)
    return script


@pytest.fixture
def failing_ffmpeg(tmp_path, monkeypatch):
    """Stand a fake ffmpeg in (IMAGEIO_FFMPEG_EXE, which imageio-ffmpeg reads at each call)."""

    def stand_in(*, status: int, said: str) -> None:
        monkeypatch.setenv("REAL", imageio_ffmpeg.get_ffmpeg_exe())
        monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake_ffmpeg(tmp_path, status=status, said=said)))

    return stand_in


# --- a real full disk ----------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("suffix, sound", [(".mp4", False), (".mp4", True), (".jpg", False), (".png", False)])
def test_full_disk_writes_nothing_and_says_enospc(tmp_path, suffix, sound, existing):
    """Fails when a full disk commits a truncated file (ffmpeg's exit status ignored), leaves a temporary file,
    touches the existing output, or fails without errno ENOSPC and the output's name."""
    with small_disk(tmp_path / "disk", size="2M") as disk:
        target = disk / f"out{suffix}"
        count = 5 if suffix == ".mp4" else 1
        if existing:
            write_output(frames(count)[:, :64, :96], target, fps=24)
            target.chmod(0o640)
        before = names(disk)
        fill(disk, leave=ROOM)
        with pytest.raises(OutputFailed) as failed:
            write_output(frames(count), target, fps=24, sound=SOUND if sound else None)
        assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(target)
        assert str(failed.value) == f"cannot write {str(target)!r}: No space left on device"
        assert names(disk) == before
        if existing:
            assert stat.S_IMODE(target.stat().st_mode) == 0o640
            assert iio.imread(target).shape[-3:] == (64, 96, 3)  # still whole


def test_full_disk_fails_the_cli_in_one_line_and_keeps_the_old_video(capsys, tmp_path):
    """Fails when `generate` on a full disk exits 0, prints more than one line or a traceback, leaves a file,
    or replaces the existing valid video with an undecodable one."""
    with small_disk(tmp_path / "disk", size="2M") as disk:
        target = disk / "fox.mp4"
        write_output(frames(5)[:, :64, :96], target, fps=24)
        old = target.read_bytes()
        fill(disk, leave=ROOM)
        status, out, err = run_cli(capsys, "generate", "--prompt", "a fox", "--frames", "5", "--output", str(target))
        assert status == 1 and out == ""
        assert err.splitlines() == [
            f"cosmos3-offload: error: cannot write {str(target)!r}: No space left on device; nothing was written"
        ]
        assert names(disk) == {"fox.mp4": old}
        assert iio.imread(target).shape == (5, 64, 96, 3)


def test_full_disk_fails_the_sample_and_leaves_no_vision_file(capsys, tmp_path):
    """Fails when a sample file's run on a full disk leaves a corrupt vision.mp4, reports success, or exits 0."""
    sample = tmp_path / "fox.json"
    sample.write_text(json.dumps({"name": "fox", "prompt": "a fox", "num_frames": 5}))
    with small_disk(tmp_path / "disk", size="2M") as disk:
        fill(disk, leave=ROOM)
        status, _, err = run_cli(capsys, "generate", "-i", str(sample), "-o", str(disk / "out"))
        folder = disk / "out" / "fox"
        assert status == 1 and "fox: failed: " in err and "No space left on device" in err, err
        assert sorted(names(folder)) == ["sample_args.json", "sample_outputs.json"]
        record = json.loads((folder / "sample_outputs.json").read_text())
        assert record["status"] == "failed" and record["files"] == [] and "No space left" in record["message"]


def test_a_full_temp_folder_does_not_fail_a_video_with_sound(tmp_path, monkeypatch):
    """Fails when muxing the sound writes scratch files in the system temp folder (a full /tmp fails the run)."""
    with small_disk(tmp_path / "tmpdir", size="1M") as scratch:
        fill(scratch)
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
        write_output(frames(5), tmp_path / "v.mp4", fps=24, sound=SOUND)
        assert names(scratch) == {}
    assert iio.imread(tmp_path / "v.mp4").shape == (5, 128, 192, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmpdir", "v.mp4"]


@pytest.mark.parametrize("where", ["check", "lock"])
def test_no_room_for_an_empty_file_is_a_disk_error_not_bad_input(tmp_path, monkeypatch, where):
    """Fails when a disk without room for the probe or the lock file (no inode left) is blamed on the request."""
    real_open = os.open

    def full_open(path, flags, *args):
        if str(path).endswith(".partial.mp4" if where == "check" else ".lock"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(outputs.os, "open", full_open)
    with pytest.raises(OutputFailed) as failed:
        if where == "check":
            check_output(tmp_path / "v.mp4", 5)
        else:
            with OutputLock(tmp_path / "v.mp4"):
                pass
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(tmp_path / "v.mp4")


# --- a failing encoder ---------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_encoder_exiting_nonzero_is_refused_before_the_rename(tmp_path, failing_ffmpeg, existing):
    """Fails when ffmpeg's exit status is ignored and its half video is renamed over the output."""
    target = tmp_path / "out" / "v.mp4"
    target.parent.mkdir()
    if existing:
        write_output(frames(5), target, fps=24)
    before = names(target.parent)
    failing_ffmpeg(status=1, said="Error writing trailer: the muxer broke")
    with pytest.raises(OutputFailed) as failed:
        write_output(frames(5), target, fps=24)
    assert failed.value.errno is None
    assert str(failed.value) == (
        f"cannot write {str(target)!r}: ffmpeg failed (exit status 1): Error writing trailer: the muxer broke"
    )
    assert names(target.parent) == before


def test_encoder_naming_a_full_disk_is_enospc(tmp_path, failing_ffmpeg):
    """Fails when an encoder's 'No space left on device' is not errno ENOSPC (a server answers 507 by it)."""
    failing_ffmpeg(status=228, said="[out#0/mp4] Error writing trailer: No space left on device")
    with pytest.raises(OutputFailed) as failed:
        write_output(frames(5), tmp_path / "v.mp4", fps=24)
    assert failed.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == [tmp_path / "ffmpeg"]


def test_encoder_exiting_zero_with_half_a_video_is_refused(tmp_path, failing_ffmpeg):
    """Fails when a video is renamed into place without reading it back (an encoder may exit 0 and lie)."""
    failing_ffmpeg(status=0, said="")
    with pytest.raises(OutputFailed, match="the video written does not read back"):
        write_output(frames(5), tmp_path / "v.mp4", fps=24)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffmpeg"]


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_image_saved_short_without_an_error_is_refused(tmp_path, monkeypatch, suffix):
    """Fails when an image is renamed into place without decoding it back (a save that quietly stops short)."""
    real_save = Image.Image.save

    def short_save(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:1000])

    monkeypatch.setattr(Image.Image, "save", short_save)
    with pytest.raises(OutputFailed, match="the image written does not read back"):
        write_output(frames(1), tmp_path / f"i{suffix}", fps=24)
    assert list(tmp_path.iterdir()) == []
