"""When the reasoner may be read in place from a checkpoint's mapped files (plan mode MAPPED): one rule
for the planner's choice (`can_map`) and for any plan given by hand (`check_mapped_reasoner`).

A mapped reasoner reads its weights from the checkpoint's safetensors files as they are stored, so it
needs those files (random weights and a loaded diffusers pipeline have none) and weights that are not
rewritten as they load (`--quantize fp8` makes FP8 copies; an FP8 checkpoint maps as it ships).
"""

from __future__ import annotations

from ..errors import InputError
from ..planning.plan import Plan


def can_map(*, has_files: bool, rewrites_weights: bool) -> bool:
    """Whether a plan may map the reasoner: the weights come from files, as they are stored."""
    return has_files and not rewrites_weights


def check_mapped_reasoner(
    plan: Plan,
    *,
    has_files: bool,
    rewrites_weights: bool,
    source: str = "random weights (no --checkpoint)",
    remedy: str = "pass --checkpoint DIR, or stream or stage the reasoner",
) -> None:
    """An InputError when `plan` maps the reasoner and the rule does not allow it; `source` names where the
    weights come from when there are no files ("random weights", "a loaded pipeline's weights") and `remedy`
    what that caller can do instead."""
    if not plan.maps_checkpoint:
        return
    if rewrites_weights:
        raise InputError(
            "--quantize writes FP8 copies of the weights, and a mapped reasoner reads them from the files as they "
            "are: stream or stage the reasoner instead (or use an FP8 checkpoint, which maps as it is)"
        )
    if not has_files:
        raise InputError(f"a mapped reasoner is read from the checkpoint's files, and {source} have none: {remedy}")
