"""fused_ops.py's functions compiled with torch.compile: a decoder layer's norms, QK-norm + rotary,
key/value join, MLP activation and residual adds as a few fused kernels instead of dozens of
eager ones.

Each function is compiled once per process, lazily on its first call (so with
`Kernels(fused=False)` nothing compiles). If compiling fails (no C++ compiler, no Triton), one
warning is logged and every function runs its eager math from then on; the results are the
same up to reduction order.

Shapes: dim 0 of every argument of rank >= 2 is the token count and is marked dynamic before
each call, so one compiled kernel serves every token count (prompts of any length, both CFG
branches, MLP chunks, the reasoner and the generator); the other dims (hidden size, heads,
head_dim) stay static, so reductions keep their specialized sizes. A new dtype or flag compiles
once more. Weights arrive as plain tensors (detached here), so a layer whose parameters were
rebound to arena views, or another streamed layer object, never recompiles.
No CUDA graphs: streamed layers bring new weight addresses every step.

Numerics: `emulate_precision_casts` makes the compiled kernels round every intermediate to
bf16/fp16 exactly where eager does, so they differ from eager only where a float32 reduction
(the RMSNorm mean) sums in another order: a last-bit difference in the mean that now and then
moves a rounded output by one unit in its last place.

Warm starts: before the first compile, Inductor's caches move to the package's cache folder
(caches.py), so a second process loads these kernels instead of compiling them. A compile that
raises with that cache (a kernel binary cut short by a crash) compiles once more in a fresh
temporary folder before falling back to the eager math below.

Set the environment variable COSMOS3_FUSED_EAGER=1 to run the fused functions uncompiled
(read at every call; tests use it to compare the math bit for bit).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import caches
from ..errors import first_line
from . import fused_ops

logger = logging.getLogger(__name__)

FORCE_EAGER_ENV = "COSMOS3_FUSED_EAGER"
# Inductor options of every fused kernel (see "Numerics" above).
COMPILE_OPTIONS = {"emulate_precision_casts": True}


class _CompileClock:
    """Counts the graphs dynamo compiles during a fused function call (its compile-end callback),
    and adds the wall time of every call that compiled one: tracing, Inductor, the C++/Triton
    compiler and first-use imports, which is what a run waits for."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = 0
        self.failed = False
        self._inside = False
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            from torch._dynamo.callback import callback_handler

            callback_handler.register_end_callback(self._compiled_one)
            self._installed = True

    def _compiled_one(self, _args: Any) -> None:
        if self._inside:
            self.count += 1

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        count, started = self.count, time.perf_counter()
        self._inside = True
        try:
            return fn(*args, **kwargs)
        finally:
            self._inside = False
            if self.count != count:
                self.seconds += time.perf_counter() - started


_clock = _CompileClock()


def compile_seconds() -> float:
    """Wall seconds spent compiling fused kernels in this process so far (0.0 if none compiled)."""
    return _clock.seconds


def compile_count() -> int:
    """How many graphs the fused functions have compiled in this process so far."""
    return _clock.count


def compile_failed() -> bool:
    """Whether compiling failed in this process, so the fused functions run their eager math."""
    return _clock.failed


def eager_forced() -> bool:
    """Whether COSMOS3_FUSED_EAGER asks for the uncompiled math."""
    return os.environ.get(FORCE_EAGER_ENV, "0") not in ("", "0")


def _as_input(value: Any) -> Any:
    """Detach tensors (a Parameter's type and requires_grad would otherwise join the guards) and
    mark dim 0 of activations dynamic."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach()
    if value.ndim >= 2:
        torch._dynamo.maybe_mark_dynamic(value, 0)
    return value


class _LazilyCompiled:
    """`fn` compiled on first call; `.eager` is the plain function."""

    def __init__(self, fn: Callable[..., Any]):
        self.eager = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _clock.failed or eager_forced():
            return self.eager(*args, **kwargs)
        if self._compiled is None:
            started = time.perf_counter()  # the first one imports dynamo: part of what compiling costs
            caches.use_persistent_compile_cache()
            _clock.install()
            self._compiled = torch.compile(self.eager, dynamic=None, options=COMPILE_OPTIONS)
            _clock.seconds += time.perf_counter() - started
        inputs = [_as_input(a) for a in args]
        try:
            return caches.run_compiled(lambda: _clock.run(self._compiled, *inputs, **kwargs))
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # no C++ compiler / Triton: the eager math gives the same results
            _clock.failed = True
            logger.warning("fused kernels run eagerly: compiling %s failed (%s)", self.__name__, first_line(error))
            return self.eager(*args, **kwargs)


rms_norm = _LazilyCompiled(fused_ops.rms_norm)
add_rms_norm = _LazilyCompiled(fused_ops.add_rms_norm)
norm_rotary = _LazilyCompiled(fused_ops.norm_rotary)
prepend_keys_values = _LazilyCompiled(fused_ops.prepend_keys_values)
silu_mul = _LazilyCompiled(fused_ops.silu_mul)
relu_square = _LazilyCompiled(fused_ops.relu_square)
