"""The server's preview settings (app/serve_settings.py): what `serve` is asked for each video job's live preview,
checked before anything loads, and
what the model cannot follow refused as the server starts."""

from __future__ import annotations

import dataclasses

import pytest
from server_process import cli_serve_arguments

from cosmos3_offload.app.serve_settings import ServeSettings
from cosmos3_offload.errors import InputError


def test_previews_are_fast_by_default_every_step_count_left_to_the_kind(tmp_path):
    """No preview flag: fast previews, at the previewer's default interval (None here: 1 fast, 5 exact)."""
    settings = ServeSettings(storage=tmp_path)
    assert (settings.preview_kind, settings.preview_every) == ("fast", None)
    assert ServeSettings(storage=tmp_path, preview_kind="exact", preview_every=10).preview_every == 10


@pytest.mark.parametrize(
    "values, said",
    [
        ({"preview_kind": "slow"}, "--preview-kind must be one of none, fast, exact, got 'slow'"),
        ({"preview_every": 0}, "--preview-every must be a whole number of steps from 1 to 1000, got 0"),
        ({"preview_every": 2.5}, "--preview-every must be a whole number of steps from 1 to 1000, got 2.5"),
        ({"preview_every": True}, "--preview-every must be a whole number of steps from 1 to 1000, got True"),
        ({"preview_kind": "none", "preview_every": 2}, "--preview-every goes with a preview; drop it, or pass"),
    ],
)
def test_bad_preview_settings_are_one_line_refusals(tmp_path, values, said):
    """An unknown kind, an interval that is not a whole number of steps, or an interval without previews."""
    with pytest.raises(InputError) as refused:
        ServeSettings(storage=tmp_path, **values)
    assert str(refused.value).startswith(said) and "\n" not in str(refused.value)


def test_exact_previews_under_a_plan_that_stages_the_vae_are_refused_as_the_server_starts(tmp_path):
    """`serve --offload-stages vae` with exact previews: one line before any request is taken (an exact preview
    decodes while the generator holds the device), and the storage is released for the next server."""
    from cosmos3_offload.serve import server
    from cosmos3_offload.serve.store import JobStore

    loaded, settings = cli_serve_arguments(tmp_path / "storage", "--offload-stages", "vae")
    with pytest.raises(InputError, match="^exact previews decode while the generator runs, so the VAE must stay"):
        with server.in_process(loaded, dataclasses.replace(settings, preview_kind="exact")):
            pass
    JobStore.open(tmp_path / "storage").close()
