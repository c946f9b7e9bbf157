"""Values every door shares, against hostile input: text that shows nothing is empty, and an output that is
one of the run's inputs (by path, symlink or hard link) is refused."""

from __future__ import annotations

import os

import pytest

from cosmos3_offload.errors import InputError
from cosmos3_offload.request.checks import InputFiles, check_text

INVISIBLE = {
    "zero-width space": "\u200b\u200b\u200b",
    "joiners": "\u200c\u200d\u2060",
    "byte order mark": "\ufeff",
    "soft hyphen": "\u00ad",
    "bidi marks": "\u200e\u200f\u202e",
    "tags": "\U000e0041\U000e007f",
    "combining marks alone": "\u0301\u0308",
    "hangul filler": "\u3164",
    "blank braille": "\u2800 \u2800",
    "mixed with whitespace": " \u200b\t\u00a0\u3000\n",
}


@pytest.mark.parametrize("text", list(INVISIBLE.values()), ids=list(INVISIBLE))
def test_a_prompt_of_invisible_characters_is_empty(text):
    """Fails when a prompt that shows nothing (zero-width spaces, format characters) is taken as text."""
    with pytest.raises(InputError, match="the prompt is empty") as refused:
        check_text("prompt", text, required=True)
    assert "\n" not in str(refused.value)


VISIBLE = {
    "latin": "a fox in the snow",
    "chinese": "雪中的狐狸",
    "hindi (marks on letters)": "बर्फ में लोमड़ी",
    "arabic (with a bidi mark)": "\u200fثعلب في الثلج",
    "emoji": "🦊",
    "emoji joined by ZWJ": "👨\u200d👩\u200d👧",
    "emoji newer than this Python's tables": "\U0001fae8",
    "text after a zero-width space": "\u200bfox",
    "one letter": "x",
}


@pytest.mark.parametrize("text", list(VISIBLE.values()), ids=list(VISIBLE))
def test_a_prompt_that_shows_something_is_kept(text):
    """Fails when the invisible-text check refuses a real prompt (any script, emoji, marks on letters)."""
    check_text("prompt", text, required=True)


def test_an_optional_text_may_be_invisible_and_a_lone_surrogate_is_not_utf8():
    """Fails when a negative prompt must show something, or undecodable bytes are called empty."""
    check_text("negative prompt", "\u200b", required=False)
    with pytest.raises(InputError, match="not valid UTF-8"):
        check_text("prompt", "\udcff", required=True)


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"the user's clip")
    return path


@pytest.mark.parametrize("how", ["same path", "another spelling", "symlink", "hard link", "symlinked folder"])
def test_an_output_that_is_an_input_is_refused(tmp_path, clip, how):
    """Fails when an output that reaches an input file (any spelling, a link to it, a hard link) is let through."""
    (tmp_path / "sub").mkdir()
    if how == "same path":
        output = clip
    elif how == "another spelling":
        output = tmp_path / "sub" / ".." / "clip.mp4"
    elif how == "symlink":
        output = tmp_path / "link.mp4"
        output.symlink_to(clip)
    elif how == "hard link":
        output = tmp_path / "hard.mp4"
        os.link(clip, output)
    else:
        (tmp_path / "alias").symlink_to(tmp_path)
        output = tmp_path / "alias" / "clip.mp4"
    with pytest.raises(InputError, match="is the video .*clip.mp4'.*would destroy that input"):
        InputFiles([("video", clip)]).refuse_output(output)


def test_other_outputs_pass(tmp_path, clip):
    """Fails when a new file, or an unrelated existing one, is taken for an input."""
    (tmp_path / "other.mp4").write_bytes(b"an older video")
    files = InputFiles([("video", clip), ("image", None)])
    files.refuse_output(tmp_path / "new.mp4")
    files.refuse_output(tmp_path / "other.mp4")


def test_a_checkpoint_folder_is_guarded_to_its_files(tmp_path):
    """Fails when an output linked to a checkpoint's weights (a cache's blob, a hard link) or an existing file
    inside its folder passes, or a new file beside them is refused."""
    blobs, checkpoint = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    (checkpoint / "transformer").mkdir(parents=True)
    (blobs / "abc").write_bytes(b"weights")
    (checkpoint / "transformer" / "model.safetensors").symlink_to(blobs / "abc")  # as the Hub cache lays it out
    (checkpoint / "transformer" / "deep").mkdir()
    (checkpoint / "transformer" / "deep" / "notes.png").write_bytes(b"x")
    files = InputFiles()
    files.add_folder("checkpoint", checkpoint)
    (tmp_path / "to_blob.mp4").symlink_to(blobs / "abc")
    os.link(blobs / "abc", tmp_path / "hard.mp4")
    for output in (tmp_path / "to_blob.mp4", tmp_path / "hard.mp4"):
        with pytest.raises(InputError, match="is the checkpoint file"):
            files.refuse_output(output)
    with pytest.raises(InputError, match="is the file inside the checkpoint"):
        files.refuse_output(checkpoint / "transformer" / "deep" / "notes.png")
    files.refuse_output(checkpoint / "transformer" / "new.mp4")
