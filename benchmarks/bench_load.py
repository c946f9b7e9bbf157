"""Load time and host memory of a Nano-size checkpoint in the published layout, ours against diffusers.

    python benchmarks/bench_load.py --folder /tmp/Cosmos3-Nano-random [--steps 2]

Writes a Nano-size checkpoint with random bf16 weights in the published Hub layout (sharded
transformer with sound and action heads, full-size Wan2.2 VAE, sound tokenizer, vision_encoder/,
assets/) unless the folder exists, reads every file once so loads are warm (page cache), then runs
each load in a fresh process: ours resident, staged, streamed (the planner's pick for 720p x 189f
under 8 GiB) and RAM-lean (the same under 8 GiB with a 16 GiB host budget, reasoner mapped),
and diffusers' `from_pretrained` + `enable_model_cpu_offload` and + group offloading. Each run
reports load seconds, host peak private memory (anonymous RSS, which holds pinned pages too),
pinned bytes, the bytes kept in host memory and the page cache the process maps. With --steps,
the RAM-lean plan and the all-resident one then generate 720p x 189 frames for that many steps
in the same process as their load, for the step-time ratio.
"""

from __future__ import annotations

import os

# As the CLI does: growable segments fragment less under a tight budget; read when CUDA starts.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_common import PROMPT, HostPeakSampler, ResultsFile, gib, read_status_kib, reset_device

RESULTS = Path(os.environ.get("BENCH_RESULTS", Path(__file__).parent / "results"))
SHARD_BYTES = 5 * 10**9  # the Hub repos' shard size
RUNS = ("ours-resident", "ours-staged", "ours-streamed-8gib", "ours-ramlean-8gib-16gib", "diffusers-model-offload",
        "diffusers-group-offload")  # fmt: skip
NANO_EXTRA = {"sound_gen": True, "sound_dim": 64, "sound_latent_fps": 25, "action_gen": True, "action_dim": 32}


def write_checkpoint(folder: Path) -> dict:
    """The published layout with random weights; returns sizes and the seconds it took."""
    from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer
    from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer
    from safetensors.torch import save_file

    from cosmos3_offload.model.specs import model_spec
    from cosmos3_offload.model.tiny_tokenizer import build_tiny_tokenizer
    from cosmos3_offload.offload.materialize import build_on_meta

    start = time.perf_counter()
    spec = model_spec("nano")
    parts = {
        "transformer": (Cosmos3OmniTransformer, {**spec.transformer, **NANO_EXTRA}),
        "vae": (AutoencoderKLWan, spec.vae),
        "sound_tokenizer": (Cosmos3AVAEAudioTokenizer, {"encoder_enabled": False}),
    }
    sizes = {}
    for name, (cls, config) in parts.items():
        model = build_on_meta(cls, config)
        model.save_config(folder / name)
        sizes[name] = _write_weights(model, folder / name, sharded=name == "transformer", save_file=save_file)
    build_tiny_tokenizer().save_pretrained(folder / "text_tokenizer")
    (folder / "scheduler").mkdir()
    scheduler = {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
                 "prediction_type": "flow_prediction", "flow_shift": 10.0}  # fmt: skip
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    tokenizer_class = json.loads((folder / "text_tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"]
    index = {
        "_class_name": "Cosmos3OmniPipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "Cosmos3OmniTransformer"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_tokenizer": ["transformers", tokenizer_class],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "sound_tokenizer": ["diffusers", "Cosmos3AVAEAudioTokenizer"],
        "safety_checker": [None, None],
        "enable_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "vision_encoder").mkdir()
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3456, 1152, dtype=torch.bfloat16)},
              folder / "vision_encoder" / "model.safetensors")  # fmt: skip
    (folder / "assets").mkdir()
    (folder / "assets" / "negative_prompt.json").write_text(json.dumps({"negative": "blurry, static"}))
    return {"write_s": round(time.perf_counter() - start, 1), "bytes": sizes}


def _write_weights(model, folder: Path, *, sharded: bool, save_file) -> int:
    """Random bf16 values (float32 where the class keeps them), in 5 GB shards with an index when sharded."""
    keep = tuple(getattr(type(model), "_keep_in_fp32_modules", None) or ())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, param in model.named_parameters():
        dtype = torch.float32 if any(p in keep for p in name.split(".")) else torch.bfloat16
        value = torch.empty(param.shape, dtype=dtype).normal_(0.0, 0.02)
        nbytes = value.numel() * value.element_size()
        if sharded and size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += nbytes
        total += nbytes
    if not sharded:
        save_file(shards[0], folder / "diffusion_pytorch_model.safetensors")
        return total
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return total


def warm(folder: Path) -> float:
    """Read every weight file once, so each load finds it in the page cache."""
    start = time.perf_counter()
    for file in sorted(folder.rglob("*.safetensors")):
        with open(file, "rb") as f:
            while f.read(1 << 26):
                pass
    return round(time.perf_counter() - start, 1)


def bad_folders(folder: Path) -> dict[str, Path]:
    """Damaged copies of `folder` made of symlinks (no weight is copied): a shard missing, a header cut."""
    made = {}
    for kind in ("missing-shard", "truncated-header"):
        bad = folder.parent / f"{folder.name}-{kind}"
        if not bad.exists():
            for file in folder.rglob("*"):
                target = bad / file.relative_to(folder)
                if file.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(file)
            shard = sorted((bad / "transformer").glob("*-00003-of-*.safetensors"))[0]
            shard.unlink()
            if kind == "truncated-header":
                shard.write_bytes(shard.resolve().read_bytes()[:64] if shard.exists() else b"\x10\x00")
        made[kind] = bad
    return made


def time_refusals(folder: Path) -> list[dict]:
    """Wall time of `check` and `generate` on each damaged folder: the whole process, imports included."""
    runs = []
    for kind, bad in bad_folders(folder).items():
        for command in (["check", str(bad)], ["generate", "--checkpoint", str(bad), "--prompt", "a fox", "--output",
                                                str(bad.parent / "never.mp4")]):  # fmt: skip
            start = time.perf_counter()
            cli = [sys.executable, "-m", "cosmos3_offload.app.cli"]
            done = subprocess.run([*cli, *command], capture_output=True, text=True)
            runs.append({
                "name": f"refuse-{kind}-{command[0]}", "seconds": round(time.perf_counter() - start, 2),
                "exit": done.returncode, "stderr_lines": len(done.stderr.strip().splitlines()),
                "first_line": done.stderr.strip().splitlines()[0][:300] if done.stderr.strip() else "",
                "output_written": (bad.parent / "never.mp4").exists(),
            })  # fmt: skip
    return runs


def plan_for(name: str, folder: Path):
    from cosmos3_offload.loading.components import model_configs
    from cosmos3_offload.loading.sizes import model_sizes
    from cosmos3_offload.planning.plan import Plan
    from cosmos3_offload.planning.request import DeviceProfile, Request
    from cosmos3_offload.planning.search import choose_plan

    if name == "ours-resident":
        return Plan()
    if name == "ours-staged":
        return Plan.from_offload(["reasoner", "generator", "vae"])
    sizes = model_sizes(*model_configs(folder), dtype_bytes=2)
    request = Request.for_video(189, 720, 1280, guidance=True, steps=35)
    if name == "ours-streamed-8gib":
        return choose_plan(sizes, request, 8 * 2**30, DeviceProfile()).plan
    return choose_plan(sizes, request, 8 * 2**30, DeviceProfile(), host_budget=16 * 2**30, mapped=True).plan


def measure(name: str, folder: Path, steps: int) -> dict:
    """One load (and, with steps, one 720p x 189f generation) in this process."""
    cuda = torch.device("cuda")
    reset_device()
    run: dict = {"name": name, "system": "ours" if name.startswith("ours") else name}
    if name.startswith("ours"):
        start = time.perf_counter()
        plan = plan_for(name, folder)  # the planner's time is not the load's
        run["plan"] = plan.describe()
        run["plan_s"] = round(time.perf_counter() - start, 2)
        breakdown = _time_load_steps()
    with HostPeakSampler() as host:
        start = time.perf_counter()
        if name.startswith("ours"):
            from cosmos3_offload.loading.components import load_components

            components = load_components(folder, cuda, torch.bfloat16, plan)
            torch.cuda.synchronize()
            run["load_steps_s"] = {k: round(v, 2) for k, v in breakdown.items()}
        else:
            components = _load_diffusers(name, folder, cuda)
        torch.cuda.synchronize()
        run["load_s"] = round(time.perf_counter() - start, 2)
    run["host_peak_private_gib"] = host.peak_gib
    run["rss_file_gib"] = gib(read_status_kib("RssFile") * 1024)
    run["device_after_load_gib"] = gib(torch.cuda.memory_allocated())
    if name.startswith("ours"):
        engine = components.engine
        run["pinned_gib"] = gib(engine.pinned_bytes)
        run["host_kept_gib"] = gib(engine.host_bytes)
        run["private_over_kept"] = round(host.peak_gib / max(run["host_kept_gib"], 1e-9), 3)
        if steps and name in ("ours-resident", "ours-ramlean-8gib-16gib"):
            from bench_staging import measure_ours

            cap = None if name == "ours-resident" else 8
            with HostPeakSampler() as host:
                run["generate"] = measure_ours(components, 720, 189, steps, cap)
            run["generate"]["host_peak_private_gib"] = host.peak_gib
    return run


def _time_load_steps() -> dict[str, float]:
    """Wrap the load's costly steps so each adds its seconds to the returned dict (benchmark only)."""
    from cosmos3_offload.loading import components, mapped_files, placer
    from cosmos3_offload.offload import slabs

    seconds: dict[str, float] = {}

    def timed(owner, attribute: str, label: str) -> None:
        original = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, attribute, wrapper)

    timed(components, "model_configs", "configs")
    timed(components, "_build", "build_on_meta")
    timed(components, "CheckpointWeights", "read_headers")
    timed(components, "_checkpoint_tokenizer", "tokenizer")
    timed(placer.Placer, "place", "allocate_homes")
    timed(mapped_files.MappedFiles, "fill", "copy_weights")
    timed(slabs.HostSlab, "pin", "pin_slabs")
    return seconds


def _load_diffusers(name: str, folder: Path, cuda: torch.device):
    from diffusers import Cosmos3OmniPipeline
    from diffusers.hooks import apply_group_offloading

    pipe = Cosmos3OmniPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16, enable_safety_checker=False)
    if name == "diffusers-model-offload":
        pipe.enable_model_cpu_offload(device=cuda)
    else:
        apply_group_offloading(
            pipe.transformer, onload_device=cuda, offload_type="block_level", num_blocks_per_group=1, use_stream=True
        )
        pipe.vae.to(cuda)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=0, help="also generate 720p x 189f for this many steps")
    parser.add_argument("--only", default=None, help="run this one measurement here and print its JSON")
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--refusals", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--name", default="load", help="the results file's benchmark name")
    args = parser.parse_args()
    if args.only:
        print("RESULT " + json.dumps(measure(args.only, args.folder, args.steps)), flush=True)
        return
    results = ResultsFile(RESULTS, args.name, prompt=PROMPT)
    if not args.folder.exists():
        results.add({"name": "write-checkpoint", **write_checkpoint(args.folder)})
    results.add({"name": "warm-page-cache", "read_s": warm(args.folder)})
    jobs = [(name, 0) for name in args.runs]
    if args.steps:  # then the step-time comparison, each plan loading afresh in its own process
        jobs += [("ours-resident", args.steps), ("ours-ramlean-8gib-16gib", args.steps)]
    for run in time_refusals(args.folder) if args.refusals else []:
        results.add(run)
    for name, steps in jobs:
        command = [sys.executable, __file__, "--folder", str(args.folder), "--steps", str(steps), "--only", name]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if lines:
            results.add(json.loads(lines[-1].removeprefix("RESULT ")))
        else:
            results.add({"name": name, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:500]})


if __name__ == "__main__":
    main()
