"""SeaCache in the split denoise loop: reuse the generator stack's residual on steps whose latents
barely moved.

diffusers 0.42.1 ships SeaCache as hooks on the joint forward (`transformer.enable_cache(
SeaCacheConfig())`); our loop never calls that forward, so this module drives the same parts
directly: `SeaCacheConfig` (thresholds and defaults), its spectral indicator of the step's
latents, its gate (accumulated relative L1 distance, retained first and last steps, a cap on
cached steps in a row) and its history of residuals, one gate state per CFG branch as the
pipeline's "cond"/"uncond" cache contexts keep. What is ours is the boundary: the span diffusers'
Cosmos3 adapter caches is `_run_decoder_stack` (every layer and the final norm), which for the
generator is exactly `split.denoise.run_decoder_stack`. A reused step predicts its output as
`input + residual`, the residual extrapolated linearly from the last two computed steps.

The reasoner half of that span is the prefill here, computed once, so nothing of it is cached.
The private diffusers names used below are pinned by the project's diffusers version; the tests
compare decisions and latents with diffusers' own pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks.sea_cache import (
    SeaCacheConfig,
    SeaCacheContextState,
    SeaCacheSharedState,
    _build_indicator,
    _SeaCacheForwardMetadata,
)

from ..errors import InputError

__all__ = ["SeaCache", "SeaCacheConfig", "held_hiddens", "seacache_config"]


def held_hiddens(config: SeaCacheConfig) -> int:
    """[tokens, hidden] tensors the cache keeps per branch while the stack runs: the stack's input
    and the `residual_order` newest residuals (for the planner's memory)."""
    return config.residual_order + 1


def seacache_config(threshold: float | None = None) -> SeaCacheConfig:
    """diffusers' defaults (the ones NVIDIA's Cosmos3 runs) with an optional threshold; bad input is an InputError."""
    try:
        return SeaCacheConfig() if threshold is None else SeaCacheConfig(threshold=threshold)
    except ValueError as error:
        raise InputError(f"--cache-threshold: {error} (0 never reuses; the default is 0.25)") from None


@dataclass
class SeaCache:
    """Per-branch gate states and residual histories for one request's denoising loop.

    Per step: `decide` before the stack, then per branch either `record` after computing it or
    `reuse` instead of computing it. `decisions[i][b]` is True where step i computed branch b's stack.
    """

    config: SeaCacheConfig
    branches: int
    decisions: list[tuple[bool, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._gate = SeaCacheSharedState()
        self._states = [SeaCacheContextState() for _ in range(self.branches)]
        self._residuals: list[torch.Tensor | None] = [None] * self.branches
        self._step = -1  # the step `decide` was last asked about

    @property
    def computed(self) -> int:
        """Steps that ran the decoder stack for at least one branch."""
        return sum(any(step) for step in self.decisions)

    @property
    def reused(self) -> int:
        return len(self.decisions) - self.computed

    def decide(self, step: int, steps: int, sigma: float, vision: torch.Tensor) -> list[bool]:
        """Whether each branch computes step `step` of `steps` (else reuses its residual).

        vision: the step's latents as the model sees them, [1, C, T, H, W] in the model's dtype;
        sigma: the scheduler's sigma for the step.
        """
        self._step = step
        metadata = _SeaCacheForwardMetadata(step_index=step, sigma=sigma, num_inference_steps=steps)
        metadata.raw_vision = [vision.squeeze(0)]  # [C, T, H, W], as diffusers' Cosmos3 adapter passes it
        indicator = _build_indicator(self.config, metadata)
        compute = [self._decide_branch(b, metadata, indicator) for b in range(self.branches)]
        self.decisions.append(tuple(compute))
        return compute

    def _decide_branch(self, branch: int, metadata: _SeaCacheForwardMetadata, indicator: list[torch.Tensor]) -> bool:
        """The gate of diffusers' `SeaCacheRootHook.prepare_decoder_stack` for one cache context."""
        state = self._states[branch]  # only its gate and history fields: the per-forward ones are the hooks'
        gate = self._gate.resolve_gate(state, metadata, indicator, self.config)
        compute = gate or not state.history  # a hit without any residual yet runs in full
        if compute and not gate:
            state.accumulated_distance = 0.0
            state.gate_should_compute = True
        if compute:
            # Only the newest `residual_order` residuals outlive the new one: drop the oldest before
            # the stack runs rather than after (diffusers trims after appending; same history).
            state.history = state.history[-self.config.residual_order :] if self.config.residual_order else []
            self._residuals[branch] = None
            return True
        self._residuals[branch] = self._predicted_residual(state, metadata.step_index)
        state.consecutive_cached += 1
        return False

    def _predicted_residual(self, state: SeaCacheContextState, step: int) -> torch.Tensor:
        """The latest residual, extrapolated linearly in the step index when there are two (order 1)."""
        history = state.history[-(self.config.residual_order + 1) :]
        latest_step, _, latest = history[-1]
        if self.config.residual_order == 1 and len(history) >= 2:
            previous_step, _, previous = history[-2]
            if latest_step != previous_step:
                scale = (step - latest_step) / (latest_step - previous_step)
                return latest + (latest - previous) * scale
        return latest

    def record(self, branch: int, stack_input: torch.Tensor, stack_output: torch.Tensor) -> None:
        """Keep a computed step's residual `stack_output - stack_input` ([tokens, hidden] each)."""
        assert stack_output.shape == stack_input.shape, (stack_output.shape, stack_input.shape)
        state = self._states[branch]
        # diffusers' `_record_full_execution` (without its extra clone of the fresh residual).
        state.history.append((self._step, None, stack_output - stack_input))  # (step, und output, residual)
        state.consecutive_cached = 0

    def reuse(self, branch: int, stack_input: torch.Tensor) -> torch.Tensor:
        """The stack's output on a reused step: its input plus the predicted residual."""
        residual = self._residuals[branch]
        assert residual is not None, f"branch {branch} computes this step"
        self._residuals[branch] = None
        return stack_input + residual

    def summary(self) -> str:
        """'seacache (threshold 0.25): 20 of 35 steps computed, 15 reused'."""
        return (
            f"seacache (threshold {self.config.threshold:g}): {self.computed} of {len(self.decisions)} steps "
            f"computed, {self.reused} reused"
        )
