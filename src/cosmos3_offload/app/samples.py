"""A batch of sample files in one process: every sample checked first, the model loaded once, each
good sample written to `OUTDIR/<name>/` with its records, a failing one reported and skipped.

Each sample's values come, by priority, from the command line's flags (the ones typed), its file,
then the defaults (as cosmos-framework's inference script takes them). For each sample written:

- `vision.mp4` (or `vision.jpg` for one frame);
- for an inverse_dynamics or policy sample, its predicted actions: `actions.npy` and `actions.json`;
- `sample_args.json`: the resolved request (cosmos-framework's field names, with the frame size,
  the effective shift and negative prompt) and the model, device and plan that ran it;
- `sample_outputs.json`: `status` ("success" or "failed"), `message`, the files written and each
  phase's seconds and device/host peaks.

A sample refused before anything loads (a bad field, a file that is missing, a request that does
not fit, a sound request the model cannot voice, an action run on a model without action heads) is
skipped with one line and gets no folder; one failing at run time (e.g. NaN latents, a full disk)
keeps its records with status "failed". A sample's folder is made when it is about to be written
(checks make it only for the moment they look at it), so an interrupted or refused run leaves no
empty folders. No file a sample writes may be a file the run reads: a sample file, a prompt_path,
a vision_path (or --image, --video), an action_path (or --actions) or the checkpoint's files.
Exit status: 0 when every sample was written, 2 when some were refused before anything ran and the
others written, 1 when some sample failed at run time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..loading.quantization import NO_FP8_FLAGS, Fp8Options
from ..model.actions import ACTION_WIDTHS
from ..model.specs import embedded_tiny
from ..planning.plan import Plan
from ..request.checks import FieldError, InputFiles
from ..request.spec import door_fields, named_at, request_defaults
from ..units import format_bytes
from .config import DEFAULT_KERNELS, GenerationConfig, KernelOptions
from .events import Listener, RunEvents
from .inputs import read_conditioning
from .model_checks import check_action_heads
from .outputs import OutputFailed, OutputLock
from .report import RunReport, shown_path
from .runner import LoadedModel
from .sample_files import READ_BELOW, Sample, read_samples
from .timer import PhaseTimer

ARGS_FILE, OUTPUTS_FILE = "sample_args.json", "sample_outputs.json"
ACTIONS_NPY, ACTIONS_JSON = "actions.npy", "actions.json"  # an action sample's predicted actions
# The defaults an action run's rules replace: its chunk fixes the frames, its input the aspect ratio, and
# its tier has its own default (request_defaults(action=True)).
ACTION_SHAPE = ("frames", "resolution", "aspect_ratio")

logger = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclass(frozen=True)
class Outcome:
    """What became of one sample: "success", "refused" (before anything ran) or "failed" (at run time)."""

    sample: Sample
    status: str
    message: str | None = None


@dataclass(frozen=True)
class SamplesReport:
    outcomes: list[Outcome]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def exit_status(self) -> int:
        return 1 if self.count("failed") else 2 if self.count("refused") else 0

    def summary(self, output_dir: Path) -> str:
        counts = ", ".join(
            f"{self.count(s)} {w}" for s, w in (("success", "written"), ("failed", "failed"), ("refused", "refused"))
        )
        return f"samples: {counts}; outputs in {shown_path(output_dir)}"


def run_samples(
    paths: list[Path],
    output_dir: Path,
    *,
    defaults: dict[str, Any],
    overrides: dict[str, Any],
    checkpoint: Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    plan: Plan | None = None,
    model: str = "tiny",
    progress: bool = True,
    fp8: Fp8Options = NO_FP8_FLAGS,
    kernels: KernelOptions = DEFAULT_KERNELS,
    say: Say = logger.info,
    warn: Say = logger.warning,
    watch: Listener | None = None,
) -> SamplesReport:
    """Run every sample of `paths` into `output_dir`, loading the model once (and not at all when no sample
    is good). `defaults` and `overrides` are request fields: below and above the files' values.
    A bad sample is reported through `warn`, one line each, and skipped; progress goes through `say`, and each
    sample's events (app/events.py) to `watch` when given (then no step bar is drawn)."""
    outcomes: list[Outcome] = []
    made: list[Path] = []  # folders this call created, removed again when nothing is written there
    # An action sample's defaults: the video defaults less the shape its rules fix (as the CLI's defaults_for).
    tiny = embedded_tiny(checkpoint, model)
    action_defaults = defaults | {k: request_defaults(tiny=tiny, action=True)[k] for k in ACTION_SHAPE}
    try:
        samples = read_samples(paths)
        inputs = _files_read(samples, overrides, checkpoint)
        requests: list[tuple[Sample, GenerationConfig]] = []
        for sample in samples:
            try:
                if sample.error is not None:
                    raise InputError(sample.error)
                is_action = (sample.fields | overrides).get("action") is not None
                below = action_defaults if is_action else defaults
                requests.append((sample, _config(sample, output_dir, below, overrides, inputs, made)))
            except InputError as error:
                outcomes.append(_refuse(sample, str(error), warn))
        if requests:
            actions = any(config.action is not None for _, config in requests)
            loaded = LoadedModel.open(
                checkpoint=checkpoint, device=device, dtype=dtype, plan=plan, model=model,
                sound=any(config.sound for _, config in requests), fp8=fp8, kernel_options=kernels,
                actions=actions and _has_action_heads(checkpoint, model),
            )  # fmt: skip
            requests = _checked(loaded, requests, outcomes, warn)
            loaded.sound = any(config.sound for _, config in requests)  # none, when the sound samples were refused
            loaded.actions = any(config.action is not None for _, config in requests)  # likewise the action heads
            if requests:
                _run_all(loaded, requests, outcomes, made, progress, say, warn, watch)
    finally:  # also on Ctrl-C while the samples are checked
        for folder in reversed(made):
            _remove_if_empty(folder)
    report = SamplesReport(outcomes)
    say(report.summary(output_dir))
    return report


def _run_all(
    loaded: LoadedModel,
    requests: list[tuple[Sample, GenerationConfig]],
    outcomes: list[Outcome],
    made: list[Path],
    progress: bool,
    say: Say,
    warn: Say,
    watch: Listener | None = None,
) -> None:
    """Load the model once and write the checked requests in order; an interrupt stops them all. Each sample's
    events go to `watch`, its first ETA counting the decode at the previous sample's pace."""
    timer = PhaseTimer(loaded.device)
    loaded.load(timer, progress=progress)
    say(f"loaded the model in {timer.phases[0].seconds:.2f}s; {len(requests)} sample(s) to run")
    decode_seconds = None
    for index, (sample, config) in enumerate(requests, 1):
        events = None if watch is None else RunEvents(watch, decode_seconds=decode_seconds)
        step = f"[{index}/{len(requests)}]"
        try:
            outcomes.append(_run_one(loaded, sample, config, step, made, progress, say, warn, events))
            decode_seconds = None if events is None else events.last_decode_seconds
        except BaseException:  # Ctrl-C, SIGTERM, an unforeseen error: every sample stops here
            warn(f"stopped at sample {sample.name} ({index} of {len(requests)}); the samples before it have run")
            raise


def _has_action_heads(checkpoint: Path | None, model: str) -> bool:
    """Whether the model can open with its action heads; without them each action sample is refused by
    LoadedModel.check, one line each, and the others run (as sound samples are on a model without sound)."""
    try:
        check_action_heads(checkpoint, model)
    except InputError:
        return False
    return True


def _files_read(samples: list[Sample], overrides: dict[str, Any], checkpoint: Path | None) -> InputFiles:
    """Every file this run reads: no sample may write one (a sample's output may be another's vision_path)."""
    files = InputFiles()
    for sample in samples:
        for kind, path in sample.reads:
            files.add(kind, path)
        for kind in ("image", "video", "actions"):
            for path in (sample.fields.get(kind), overrides.get(kind)):
                if path is not None:
                    files.add(kind, path)
    if checkpoint is not None:
        files.add_folder("checkpoint", checkpoint)
    return files


def _config(
    sample: Sample,
    output_dir: Path,
    defaults: dict[str, Any],
    overrides: dict[str, Any],
    inputs: InputFiles,
    made: list[Path],
) -> GenerationConfig:
    """The sample's request: defaults, then its fields, then the typed flags; output in OUTDIR/<name>/."""
    values = defaults | sample.fields | overrides
    if "image" in overrides or "video" in overrides:  # a typed --image or --video replaces the file's vision_path
        values |= {"image": overrides.get("image"), "video": overrides.get("video")}
    if "prompt" not in values:
        raise InputError("the sample has no prompt; set `prompt` (or `prompt_path`)")
    assert sample.name is not None
    folder = output_dir / sample.name
    output = folder / ("vision.jpg" if values["frames"] == 1 else "vision.mp4")
    actions = _action_files(folder) if values.get("action") is not None else ()
    for written in (output, folder / ARGS_FILE, folder / OUTPUTS_FILE, *actions):
        inputs.refuse_output(written)
    if not output_dir.is_dir():
        _make_folder(output_dir, made)
    try:
        with _folder_while_checked(folder):
            return GenerationConfig(**values | {"output": output})
    except FieldError as error:  # named as the sample file names the field
        raise named_at(error, "sample") from None


def _make_folder(folder: Path, made: list[Path]) -> None:
    try:
        folder.mkdir()
    except FileExistsError:
        if folder.is_dir():
            return
        raise InputError(f"output folder {str(folder)!r} cannot be created: a file has its name") from None
    except OSError as error:
        raise InputError(f"output folder {str(folder)!r} cannot be created: {error.strerror}") from None
    made.append(folder)


@contextmanager
def _folder_while_checked(folder: Path) -> Iterator[None]:
    """`folder` exists while a request writing into it is checked (an output's folder must), and is
    removed again when this made it: a sample's folder is made when the sample is about to be written."""
    made: list[Path] = []
    _make_folder(folder, made)
    try:
        yield
    finally:
        for path in made:
            _remove_if_empty(path)


def _checked(
    loaded: LoadedModel, requests: list[tuple[Sample, GenerationConfig]], outcomes: list[Outcome], warn: Say
) -> list[tuple[Sample, GenerationConfig]]:
    """The requests this model can run, as it runs them (see LoadedModel.check), with readable conditioning."""
    good = []
    for sample, config in requests:
        try:
            with _folder_while_checked(config.output.parent):  # check may rebuild the config, which checks it
                config = loaded.check(config)
            read_conditioning(config)  # read again when it runs
            good.append((sample, config))
        except InputError as error:
            outcomes.append(_refuse(sample, str(error), warn))
    return good


def _refuse(sample: Sample, message: str, warn: Say) -> Outcome:
    named = f" ({sample.name})" if sample.name else ""
    warn(f"{sample.source}{named}: refused: {message}")
    return Outcome(sample, "refused", message)


def _run_one(
    loaded: LoadedModel,
    sample: Sample,
    config: GenerationConfig,
    step: str,
    made: list[Path],
    progress: bool,
    say: Say,
    warn: Say,
    events: RunEvents | None = None,
) -> Outcome:
    """Write one sample and its records (its folder made now); an InputError or OSError fails this sample only."""
    folder = config.output.parent
    timer = PhaseTimer(loaded.device, events=events)
    try:
        _make_folder(folder, made)
    except InputError as error:
        warn(f"{step} {sample.name}: failed: {error}")
        return Outcome(sample, "failed", str(error))
    report = None
    try:
        _write_json(folder / ARGS_FILE, sample_args(sample, config, loaded))
        conditioning = read_conditioning(config)
        with OutputLock(config.output):
            steps_bar = progress and events is None  # the events' listener shows the steps
            report = loaded.write(
                config, timer, conditioning=conditioning, progress=steps_bar, action_paths=_action_files(folder)
            )
        outcome = Outcome(sample, "success")
    except (InputError, OSError) as error:
        message = str(error) if isinstance(error, (InputError, OutputFailed)) else f"{error.strerror or error}"
        outcome = Outcome(sample, "failed", message)
    try:
        _write_json(folder / OUTPUTS_FILE, sample_outputs(outcome, config, timer, report))
    except OSError as error:
        outcome = Outcome(sample, "failed", f"{OUTPUTS_FILE} cannot be written: {error.strerror or error}")
    if outcome.status == "success":
        assert report is not None and report.shape is not None
        seconds = sum(p.seconds for p in timer.phases)
        say(f"{step} {sample.name}: wrote {_written(report)} in {seconds:.2f}s{_peaks(timer)}")
    else:
        warn(f"{step} {sample.name}: failed: {outcome.message}")
    return outcome


def _action_files(folder: Path) -> tuple[Path, Path]:
    """Where an action sample's predicted actions go: (the .npy, the .json)."""
    return folder / ACTIONS_NPY, folder / ACTIONS_JSON


def _written(report: RunReport) -> str:
    """What a sample wrote, as its progress line says it: the video's shape, an action run's mode and actions."""
    c = report.config
    frames, height, width = report.shape
    what = f"{frames} frame{'s' if frames > 1 else ''}, {width}x{height}, {c.steps} steps"
    if c.action is not None:
        what = f"{c.action}, {c.domain}, chunk {c.chunk_size}: {what}"
    predicted = "" if report.actions is None else f" and {ACTIONS_NPY}, {ACTIONS_JSON}"
    return f"{shown_path(c.output)} ({what}){predicted}"


def _peaks(timer: PhaseTimer) -> str:
    parts = []
    for label, attribute in (("device", "device_peak_bytes"), ("host", "host_peak_bytes")):
        values = [getattr(p, attribute) for p in timer.phases if getattr(p, attribute) is not None]
        if values:
            parts.append(f"{label} peak {format_bytes(max(values))}")
    return "; " + ", ".join(parts) if parts else ""


def mode_of(config: GenerationConfig) -> str:
    """cosmos-framework's model_mode for a request (an action run's under its name here: `policy` for `wam`)."""
    if config.action is not None:
        return config.action
    if config.image is not None:
        return "image2video"
    if config.video is not None:
        return "video2video"
    return "text2image" if config.frames == 1 else "text2video"


def sample_args(sample: Sample, config: GenerationConfig, loaded: LoadedModel) -> dict[str, Any]:
    """The resolved request under the sample files' field names (the effective shift and negative prompt,
    the frame size), and what ran it."""
    vision = config.image if config.image is not None else config.video
    indexes = list(config.condition_frames) if config.video is not None else [0] if config.image is not None else []
    fields = {alias: getattr(config, name) for name, alias in door_fields("sample").items() if alias not in READ_BELOW}
    return {
        "name": sample.name,
        "source": sample.source,
        "model_mode": mode_of(config),
        "prompt": config.prompt,
        "negative_prompt": config.negative_prompt or "",  # None is diffusers' empty negative prompt
        **fields,
        "resolution": str(config.resolution),
        "width": config.width,
        "height": config.height,
        "shift": config.flow_shift,
        "vision_path": None if vision is None else str(Path(vision).absolute()),
        "condition_frame_indexes_vision": indexes,
        "action_path": None if config.actions is None else str(Path(config.actions).absolute()),
        "raw_action_dim": ACTION_WIDTHS.get(config.domain) if config.action is not None else None,
        "image_size": config.resolution if config.action is not None else None,  # cosmos-framework's action tier
        "output": config.output.name,
        "checkpoint": None if loaded.checkpoint is None else str(Path(loaded.checkpoint).absolute()),
        "model": None if loaded.checkpoint is not None else loaded.model,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "plan": loaded.plan.describe(),
    }


def sample_outputs(
    outcome: Outcome, config: GenerationConfig, timer: PhaseTimer, report: RunReport | None = None
) -> dict[str, Any]:
    """Status, files and per-phase seconds and peaks (bytes; null where not measured, e.g. on the CPU)."""
    files = [config.output.name] if outcome.status == "success" else []
    if files and report is not None and report.actions is not None:
        files += [ACTIONS_NPY, ACTIONS_JSON]
    return {
        "status": outcome.status,
        "message": outcome.message,
        "files": files,
        "seconds": round(sum(p.seconds for p in timer.phases), 4),
        "phases": {
            p.name: {
                "seconds": round(p.seconds, 4),
                "device_peak_bytes": p.device_peak_bytes,
                "device_reserved_peak_bytes": p.device_reserved_peak_bytes,
                "host_peak_bytes": p.host_peak_bytes,
            }
            for p in timer.phases
        },
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Whole or not at all: a temporary file beside it, renamed over it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (or gone): it holds what was written
