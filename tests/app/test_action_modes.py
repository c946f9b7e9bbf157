"""Cosmos3's action modes through the split: forward dynamics, inverse dynamics and policy equal
`Cosmos3OmniPipeline(...)(action=CosmosActionCondition(...))` on the same folder, on every plan, and
every door's refusal is one line before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Cosmos3OmniPipeline, UniPCMultistepScheduler
from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import CosmosActionCondition
from PIL import Image
from published_layout import PLANS
from tiny_models import relative_error

from cosmos3_offload.app.action_files import actions_from_json
from cosmos3_offload.app.cli import main
from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.inputs import read_conditioning
from cosmos3_offload.app.runner import LoadedModel, generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.loading.quantization import Fp8Options
from cosmos3_offload.model.actions import ACTION_WIDTHS, decoded_frames
from cosmos3_offload.planning.plan import GroupPlan, Mode, Plan

CPU = torch.device("cpu")
TOLERANCE = 1e-4
PROMPT = "the gripper picks up the red cup"


@pytest.fixture(scope="module")
def published(published_checkpoint):
    return published_checkpoint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 200x300 image, a 9-frame 176x240 clip and forward-dynamics rows for each width used here."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(folder / "frame.png")
    frames = [rng.integers(0, 255, (176, 240, 3), dtype=np.uint8) for _ in range(9)]
    import imageio.v2 as imageio

    imageio.mimwrite(folder / "clip.mp4", frames, fps=24, codec="libx264", quality=10, macro_block_size=16)
    for width in {ACTION_WIDTHS[d] for d in ("av", "pusht", "galbot", "bridge_orig_lerobot")}:
        np.save(folder / f"rows{width}.npy", rng.standard_normal((3, width)).astype(np.float32))
    return folder


def request(folder, tmp_path, mode, domain, chunk, seed, **extra) -> GenerationConfig:
    conditioning = {"video": folder / "clip.mp4"} if mode == "inverse_dynamics" else {"image": folder / "frame.png"}
    if mode == "forward_dynamics":
        conditioning["actions"] = folder / f"rows{ACTION_WIDTHS[domain]}.npy"
    return GenerationConfig(
        prompt=PROMPT,
        action=mode,
        domain=domain,
        chunk_size=chunk,
        resolution=256,
        steps=3,
        guidance=5.0,
        seed=seed,
        output=tmp_path / "o.mp4",
        **conditioning,
        **extra,
    )


def ours(folder, config, plan=None, fp8=None):
    fp8 = fp8 or Fp8Options()
    loaded = LoadedModel.open(
        checkpoint=folder, device="cpu", plan=plan or Plan(), actions=True, sound=config.sound, fp8=fp8
    )
    config = loaded.check(config)
    components = loaded.load(PhaseTimer(CPU))
    return generate_video(config, components, PhaseTimer(CPU), progress=False, conditioning=read_conditioning(config))


def theirs(folder, config):
    """The pipeline as the Cosmos3 docs set it up, with the request's flow shift: (output, last latents)."""
    pipe = Cosmos3OmniPipeline.from_pretrained(folder, enable_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = UniPCMultistepScheduler.from_config(
        pipe.scheduler.config, flow_shift=config.flow_shift, use_karras_sigmas=False
    )
    conditioning = read_conditioning(config).action
    clip = {"video": conditioning.clip} if config.video is not None else {"image": conditioning.clip[0]}
    rows = None if conditioning.raw_actions is None else torch.from_numpy(conditioning.raw_actions)
    action = CosmosActionCondition(
        mode=config.action,
        chunk_size=config.chunk_size,
        domain_name=config.domain,
        resolution_tier=config.resolution,
        raw_actions=rows,
        view_point=config.view,
        **clip,
    )
    latents = []

    def last_latents(pipe, index, t, tensors):
        if index == config.steps - 1:
            latents.append(tensors["latents"].float())
        return {}

    output = pipe(
        prompt=config.prompt,
        negative_prompt=config.negative_prompt,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance,
        fps=config.fps,
        generator=torch.Generator("cpu").manual_seed(config.seed),
        output_type="np",
        enable_safety_check=False,
        action=action,
        enable_sound=config.sound,
        callback_on_step_end=last_latents,
    )
    return output, latents[0]


CASES = [
    ("policy", "bridge_orig_lerobot", 4, 1, {}),
    ("policy", "pusht", 6, 2, {"view": "wrist_view"}),
    ("policy", "galbot", 1, 3, {"negative_prompt": "blurry"}),
    ("forward_dynamics", "av", 4, 4, {}),
    ("forward_dynamics", "pusht", 8, 5, {"view": "third_person_view"}),
    ("inverse_dynamics", "galbot", 8, 6, {}),
    ("inverse_dynamics", "bridge_orig_lerobot", 4, 7, {"negative_prompt": "jitter"}),
    ("policy", "pusht", 4, 8, {"sound": True}),  # sound noise is drawn between the video's and the actions'
]


CASE_IDS = [
    f"{mode}-{domain}-{chunk}" + ("-sound" if extra.get("sound") else "") for mode, domain, chunk, _, extra in CASES
]


@pytest.mark.parametrize("mode, domain, chunk, seed, extra", CASES, ids=CASE_IDS)
def test_each_mode_equals_the_diffusers_pipeline(published, inputs, tmp_path, mode, domain, chunk, seed, extra):
    """Latents, frames (content size, 4*(chunk//4)+1 of them) and predicted actions (the domain's width)
    within 1e-4 of diffusers' on the same folder, for several domains, chunks, seeds and view points."""
    config = request(inputs, tmp_path, mode, domain, chunk, seed, **extra)
    video = ours(published, config)
    output, latents = theirs(published, config)
    assert relative_error(video.latents, latents) <= TOLERANCE
    frames = np.asarray(output.video)
    assert video.frames.shape == frames.shape and frames.shape[0] == decoded_frames(chunk)
    assert np.abs(video.frames.astype(np.float64) / 255 - frames).max() <= 1 / 255 + TOLERANCE
    if mode == "forward_dynamics":
        assert video.actions is None and output.action is None
    else:
        expected = output.action[0].float()
        assert video.actions.shape == (chunk, ACTION_WIDTHS[domain]) == tuple(expected.shape)
        assert relative_error(torch.from_numpy(video.actions), expected) <= TOLERANCE
    if config.sound:
        waveform = torch.from_numpy(video.sound.waveform)
        assert relative_error(waveform, output.sound.float()) <= TOLERANCE


# A mapped reasoner (only the reasoner maps) with the generator, heads and all, streamed.
MAPPED = Plan(reasoner=GroupPlan(mode=Mode.MAPPED), generator=GroupPlan(mode=Mode.STREAMED))


@pytest.mark.parametrize("mode", ["policy", "inverse_dynamics", "forward_dynamics"])
def test_every_plan_gives_the_resident_result(published, inputs, tmp_path, mode):
    """Resident, staged, streamed and memory-mapped plans give bit-identical latents, frames and actions."""
    config = request(inputs, tmp_path, mode, "bridge_orig_lerobot", 4, 3)
    plans = {**PLANS, "mapped": MAPPED}
    runs = {name: ours(published, config, plan) for name, plan in plans.items()}
    base = runs.pop("resident")
    for name, run in runs.items():
        assert torch.equal(run.latents, base.latents), name
        assert np.array_equal(run.frames, base.frames), name
        assert (run.actions is None and base.actions is None) or np.array_equal(run.actions, base.actions), name


def test_the_action_heads_are_loaded_only_for_action_runs_and_placed_with_the_generator(published):
    for name, plan in {**PLANS, "mapped": MAPPED}.items():
        without = load_components(published, CPU, torch.float32, plan)
        heads = [p for n, p in without.transformer.named_parameters() if n.startswith("action_")]
        assert heads and all(p.is_meta for p in heads), name
        with_heads = load_components(published, CPU, torch.float32, plan, actions=True)
        stored = dict(Cosmos3OmniPipeline.from_pretrained(published).transformer.named_parameters())
        for n, p in with_heads.transformer.named_parameters():
            if n.startswith("action_"):
                assert not p.is_meta and torch.equal(p.detach(), stored[n].detach().float()), (name, n)


def test_fp8_runs_with_the_heads_in_full_precision(published, inputs, tmp_path):
    """--quantize fp8 leaves the action heads (embeddings) alone; the actions stay close to bf16-free float32's."""
    config = request(inputs, tmp_path, "policy", "bridge_orig_lerobot", 4, 3)
    fp8 = ours(published, config, fp8=Fp8Options(quantize="fp8"))
    exact = ours(published, config)
    assert fp8.actions.shape == exact.actions.shape and np.isfinite(fp8.actions).all()
    assert relative_error(torch.from_numpy(fp8.actions), torch.from_numpy(exact.actions)) < 0.1


def cli(capsys, *args) -> tuple[int, str, str]:
    try:
        status = main(["generate", "--prompt", PROMPT, "--steps", "2", "--device", "cpu", "--no-progress", *args])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def test_the_cli_writes_the_video_and_the_actions_the_library_returns(published, inputs, tmp_path, capsys):
    """NAME.actions.npy and NAME.actions.json hold the library's actions, unpadded to the domain's width."""
    output = tmp_path / "run.mp4"
    args = ["--checkpoint", str(published), "--action", "policy", "--domain", "pusht", "--chunk-size", "4"]
    status, out, err = cli(capsys, *args, "--resolution", "256", "--image", str(inputs / "frame.png"), "--seed", "3",
                           "--output", str(output))  # fmt: skip
    assert status == 0, err
    assert "policy, pusht, chunk 4: 5 frames, 288x192" in out and "4 predicted actions of 2 numbers" in out
    saved = np.load(tmp_path / "run.actions.npy")
    written = actions_from_json((tmp_path / "run.actions.json").read_text())
    assert saved.shape == (4, 2) and np.array_equal(saved, written)
    config = GenerationConfig(prompt=PROMPT, action="policy", domain="pusht", chunk_size=4, resolution=256, steps=2,
                              seed=3, image=inputs / "frame.png", output=tmp_path / "lib.mp4")  # fmt: skip
    assert np.array_equal(ours(published, config).actions, saved)
    assert json.loads((tmp_path / "run.actions.json").read_text())["domain"] == "pusht"


def test_forward_dynamics_writes_no_actions(inputs, tmp_path, capsys):
    """The embedded tiny model has action heads too; forward dynamics predicts no actions, so none are written."""
    output = tmp_path / "fd.mp4"
    args = ["--action", "forward_dynamics", "--domain", "bridge_orig_lerobot", "--chunk-size", "4"]
    status, out, err = cli(capsys, *args, "--image", str(inputs / "frame.png"), "--actions",
                           str(inputs / "rows10.npy"), "--output", str(output))  # fmt: skip
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fd.mp4"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--action", "policy", "--image", "{frame}"], "--action needs --domain"),
        (["--action", "policy", "--domain", "libero", "--image", "{frame}"], "has no fixed action width"),
        (["--action", "policy", "--domain", "unicycle", "--image", "{frame}"], "--domain must be one of"),
        (["--action", "policy", "--domain", "hand_pose", "--image", "{frame}"], "more than the 32"),
        (["--action", "policy", "--domain", "pusht"], "pass --image"),
        (["--action", "inverse_dynamics", "--domain", "pusht", "--image", "{frame}"], "pass --video"),
        (["--action", "forward_dynamics", "--domain", "pusht", "--image", "{frame}"], "pass --actions FILE"),
        (["--action", "policy", "--domain", "pusht", "--image", "{frame}", "--actions", "{rows2}"], "drop --actions"),
        (
            ["--action", "forward_dynamics", "--domain", "av", "--image", "{frame}", "--actions", "{rows2}"],
            "takes 9 numbers per row, the file has 2",
        ),
        (["--action", "policy", "--domain", "pusht", "--image", "{frame}", "--frames", "9"], "--frames does not go"),
        (["--action", "policy", "--domain", "pusht", "--image", "{frame}", "--chunk-size", "0"], "--chunk-size"),
        (["--action", "policy", "--domain", "pusht", "--image", "{frame}", "--chunk-size", "2000"], "--chunk-size"),
        (["--action", "policy", "--domain", "pusht", "--image", "{frame}", "--resolution", "768"], "no action tier"),
        (
            ["--action", "policy", "--domain", "pusht", "--image", "{frame}", "--aspect-ratio", "9,16"],
            "--aspect-ratio does not go with --action",
        ),
        (["--action", "policy", "--domain", "pusht", "--image", "{frame}", "--cache", "seacache"], "seacache"),
        (["--domain", "pusht"], "--domain goes with --action"),
        (["--resolution", "704"], "is an action tier"),
        (["--action", "walk", "--domain", "pusht"], "--action must be one of"),
        (["--action", "policy", "--domain", "pusht", "--image", "{frame}", "--view", "top"], "--view must be one of"),
    ],
)
def test_refusals_are_one_line_exit_2_before_anything_loads(inputs, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    paths = {"frame": inputs / "frame.png", "rows2": inputs / "rows2.npy"}
    status, out, err = cli(capsys, *(a.format(**paths) for a in args))
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [] and "load" not in out


def test_bad_rows_are_refused_before_anything_loads(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = inputs / "bad.csv"
    rows.write_text("1,2\n3,nan\n")
    args = ["--action", "forward_dynamics", "--domain", "pusht", "--image", str(inputs / "frame.png")]
    status, _, err = cli(capsys, *args, "--actions", str(rows))
    assert status == 2 and "not a finite number" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_without_action_heads_is_refused(tmp_path, inputs, capsys, monkeypatch):
    """A transformer trained without actions (action_gen off) refuses an action run before it loads."""
    from published_layout import write_published_checkpoint

    folder = write_published_checkpoint(tmp_path / "hub", sound=False)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"action_gen": False}))
    monkeypatch.chdir(tmp_path)
    status, _, err = cli(capsys, "--checkpoint", str(folder), "--action", "policy", "--domain", "pusht",
                         "--image", str(inputs / "frame.png"), "--resolution", "256")  # fmt: skip
    assert status == 2 and "has none" in err and len(err.strip().splitlines()) == 1


def test_serve_takes_the_action_fields_with_each_request_not_as_flags(tmp_path, capsys):
    """`serve --action ...` is refused by name before anything loads (a request brings its action object)."""
    from cosmos3_offload.main import main as program

    with pytest.raises(SystemExit) as raised:
        program(["serve", "--storage", str(tmp_path / "storage"), "--action", "policy", "--domain", "pusht"])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "--action belongs to a request" in err and "action object" in err
    assert err.count("\n") == 1 and not (tmp_path / "storage").exists()


def test_without_an_input_the_planned_canvas_is_the_tiers_largest():
    """Before an input has picked it, an action request is sized by its tier's canvas of the most tokens."""
    from cosmos3_offload.request.spec import RequestSpec

    for tier, largest in {256: (256, 320), 480: (640, 640), 704: (960, 960), 720: (720, 1280)}.items():
        spec = RequestSpec(prompt="a", action="policy", domain="pusht", image=Path("a.png"), resolution=tier)
        assert spec.canvas == largest and (spec.height, spec.width) == largest


def test_plan_refuses_an_action_run_the_model_cannot_take(inputs, capsys):
    base = [
        "plan",
        "--vram-budget",
        "8GiB",
        "--model",
        "nano",
        "--h2d-gbps",
        "55",
        "--image",
        str(inputs / "frame.png"),
    ]
    statuses = []
    for domain in ("hand_pose", "pusht"):
        try:
            statuses.append(main([*base, "--action", "policy", "--domain", domain]))
        except SystemExit as exit_:
            statuses.append(exit_.code)
    out, err = capsys.readouterr()
    assert statuses == [2, 0] and "more than the 32" in err and len(err.strip().splitlines()) == 1
    assert "policy (pusht), chunk 16: 17 frames padded into a canvas of 736x544 (tier 480)" in out


def test_condition_frames_do_not_go_with_an_action(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = cli(capsys, "--action", "inverse_dynamics", "--domain", "pusht", "--video",
                         str(inputs / "clip.mp4"), "--condition-frames", "0")  # fmt: skip
    assert status == 2 and "--condition-frames does not go with --action" in err
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_actions_file_is_refused_and_forward_dynamics_clears_stale_ones(inputs, tmp_path, capsys):
    """A policy run may not replace a read-only NAME.actions.json; a forward-dynamics run onto NAME.mp4 removes
    the NAME.actions.* an earlier run left (its actions were given, not predicted)."""
    output = tmp_path / "run.mp4"
    stale = tmp_path / "run.actions.json"
    stale.write_text("{}")
    stale.chmod(0o444)
    policy = ["--action", "policy", "--domain", "pusht", "--chunk-size", "4", "--image", str(inputs / "frame.png")]
    status, _, err = cli(capsys, *policy, "--output", str(output))
    assert status == 2 and "run.actions.json' exists and is read-only" in err and not output.exists()
    stale.chmod(0o644)
    forward = ["--action", "forward_dynamics", "--domain", "pusht", "--chunk-size", "4", "--actions",
               str(inputs / "rows2.npy"), "--image", str(inputs / "frame.png")]  # fmt: skip
    status, _, err = cli(capsys, *forward, "--output", str(output))
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.mp4"]


def test_forward_dynamics_driven_by_an_earlier_runs_actions_keeps_them(inputs, tmp_path, capsys):
    """`--actions run.actions.json --output run.mp4`: the file the run reads is an input, not a stale output."""
    rows = tmp_path / "run.actions.json"
    rows.write_text(json.dumps({"actions": [[0.1, 0.2], [0.3, 0.4]]}))
    forward = ["--action", "forward_dynamics", "--domain", "pusht", "--chunk-size", "4", "--actions", str(rows),
               "--image", str(inputs / "frame.png"), "--output", str(tmp_path / "run.mp4")]  # fmt: skip
    status, _, err = cli(capsys, *forward)
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.actions.json", "run.mp4"]
