"""The entry point refuses a damaged checkpoint from its files alone, before torch is imported."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
from published_layout import write_published_checkpoint

from cosmos3_offload.app import launch


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return write_published_checkpoint(tmp_path_factory.mktemp("hub") / "Cosmos3-Nano")


def damaged(tmp_path, published, damage: str):
    """A copy of the folder (symlinks; the damaged file a real one) with one fault."""
    folder = tmp_path / damage
    for file in published.rglob("*"):
        target = folder / file.relative_to(published)
        if file.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(file)
    shard = sorted((folder / "transformer").glob("*-00002-of-*.safetensors"))[0]
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    if damage == "missing-shard":
        shard.unlink()
        return folder, shard.name
    if damage == "cut-header":
        data = vae.read_bytes()
        vae.unlink()
        vae.write_bytes(data[:40])
        return folder, "is not a whole safetensors file"
    if damage == "cut-data":
        data = shard.read_bytes()
        shard.unlink()
        shard.write_bytes(data[:-4])
        return folder, "describes"
    raise AssertionError(damage)


@pytest.mark.parametrize("damage", ["missing-shard", "cut-header", "cut-data"])
def test_damage_is_refused_without_importing_the_command_line(tmp_path, published, monkeypatch, capsys, damage):
    """Exit 2 and one line naming the fault, while the full command line (torch, diffusers) cannot even import."""
    folder, said = damaged(tmp_path, published, damage)
    monkeypatch.setitem(sys.modules, "cosmos3_offload.app.cli", None)  # importing it now raises
    output = tmp_path / "never.mp4"
    status = launch.main(["generate", "--prompt", "a fox", "--checkpoint", str(folder), "--output", str(output)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("cosmos3-offload: error: ") and said in err[0]
    assert not output.exists()


def test_a_fresh_process_refuses_before_torch_loads(tmp_path, published):
    """In a new interpreter the refusal leaves torch and diffusers unimported."""
    folder, _ = damaged(tmp_path, published, "missing-shard")
    code = (
        "import sys; from cosmos3_offload.app.launch import main; "
        f"status = main(['generate', '--prompt', 'x', '--checkpoint={folder}']); "
        "print(status, sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "2 []"


@pytest.mark.parametrize(
    "args",
    [
        ["plan", "--vram-budget", "8GiB", "--checkpoint", "{folder}"],  # plan reads configs only
        ["check", "{folder}"],  # check lists every problem
        ["generate", "--help", "--checkpoint", "{folder}"],
        ["generate", "--prompt", "x"],  # no checkpoint
    ],
)
def test_other_command_lines_go_to_the_full_command(tmp_path, published, args):
    """Only `generate --checkpoint DIR` is looked at here; everything else goes on unchanged."""
    folder, _ = damaged(tmp_path, published, "missing-shard")
    assert launch.checkpoint_argument([a.format(folder=folder) for a in args]) is None


def test_a_good_folder_and_odd_paths_go_on(published, tmp_path):
    """A whole folder, a missing one and a name too long for the file system find no problem here
    (the full command words those)."""
    assert launch.first_file_problem(published) is None
    assert launch.first_file_problem(tmp_path / ("x" * 5000)) is None
    assert "is not a folder" in launch.first_file_problem(tmp_path / "nowhere")


def test_ctrl_c_while_the_command_line_imports_is_one_line(monkeypatch, capsys):
    """Fails when Ctrl-C during the seconds torch and diffusers take to import prints a traceback (the
    command's own handling of it starts only after those imports)."""

    class Importing(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "cosmos3_offload.app.cli", Importing("cosmos3_offload.app.cli"))
    assert launch.main(["generate", "--prompt", "a fox"]) == 130
    assert capsys.readouterr().err == "cosmos3-offload: interrupted; nothing was written\n"
