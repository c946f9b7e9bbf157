"""Where the package keeps, across processes, what it measures and compiles.

The folder: `$COSMOS3_OFFLOAD_CACHE`, else `$XDG_CACHE_HOME/cosmos3-offload` (an absolute path only),
else `~/.cache/cosmos3-offload`. It holds the attention probe's rates (kernels/probe.py), the fast
preview's colour maps (app/previews.py) and torch.compile's caches, under `inductor/`.

torch.compile: Inductor keeps its FX graph cache, AOTAutograd cache, generated kernels and Triton
binaries under `$TORCHINDUCTOR_CACHE_DIR`, by default `/tmp/torchinductor_<user>`, which a reboot or
a fresh container empties, so every such run compiles the fused kernels again (7.7 s of an H100's
prefill). Before the first compile of a process, `use_persistent_compile_cache` points Inductor at
`<cache folder>/inductor`, so the next process loads the kernels instead of compiling them (Dynamo
still traces the graphs: seconds, not the compile). It keeps a `$TORCHINDUCTOR_CACHE_DIR` the user set, and
`COSMOS3_COMPILE_CACHE=0` leaves Inductor's defaults alone.

Never a failed run: a folder that cannot be created or written, or a disk with less than
`MIN_FREE_BYTES` free, costs one warning and Inductor's default folder for this process. Entries
Inductor cannot unpickle are misses to Inductor itself, compiled again; of its warnings (one per
entry, with a traceback) one line is kept. A cache that makes a compile raise (a kernel binary cut
short by a crash): `run_compiled` compiles once more in a fresh temporary folder and, when that
works, deletes the broken cache so the next run builds it anew (one warning). A compile that fails
in both folders (no C++ compiler, no Triton) leaves the cache as it is; the caller's eager fallback
warns.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import first_line

logger = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_ENV = "COSMOS3_OFFLOAD_CACHE"
COMPILE_CACHE_ENV = "COSMOS3_COMPILE_CACHE"  # "0": leave Inductor's cache where Inductor puts it
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
INDUCTOR_FOLDER = "inductor"
# A Nano-size run's compiled kernels take a few MiB (tens with Triton's binaries); below this much
# free space the cache would fail its writes, and a compile with it.
MIN_FREE_BYTES = 256 * 2**20
# What Inductor logs, with a traceback, for each FX graph cache entry it cannot unpickle.
_FX_CACHE_LOGGER = "torch._inductor.codecache"
_FX_CACHE_UNREADABLE = "fx graph cache unable to load compiled graph"
# Errors of a disk that cannot take a write, not of a broken cache: the cache is kept.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def cache_dir() -> Path:
    """$COSMOS3_OFFLOAD_CACHE, else $XDG_CACHE_HOME/cosmos3-offload (an absolute path only, as the XDG
    spec says), else ~/.cache/cosmos3-offload."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "cosmos3-offload"
    try:
        return Path.home() / ".cache" / "cosmos3-offload"
    except RuntimeError:  # no $HOME and no password entry: a cache in the temporary folder still helps
        return Path(tempfile.gettempdir()) / "cosmos3-offload"


class _CompileCache:
    """The process's choice of Inductor cache folder: made once, before the first compile."""

    def __init__(self) -> None:
        self.decided = False
        self.folder: Path | None = None  # ours, while Inductor uses it; None: Inductor's own or the user's
        self.retried = False

    def use(self) -> Path | None:
        if not self.decided:
            self.decided = True
            self.folder = _persistent_folder()
            if self.folder is not None:
                os.environ[INDUCTOR_ENV] = str(self.folder)
                _caches_on()
                logging.getLogger(_FX_CACHE_LOGGER).addFilter(_OneUnreadableEntryLine(self.folder))
        return self.folder

    def run(self, compile_and_run: Callable[[], T]) -> T:
        try:
            return compile_and_run()
        except Exception as error:
            if self.folder is None or self.retried or _is_out_of_memory(error):
                raise
            self.retried = True
            broken = self.folder
            os.environ[INDUCTOR_ENV] = tempfile.mkdtemp(prefix="cosmos3-inductor-")
            _clear_inductor_memory()
            try:
                result = compile_and_run()
            except Exception:
                os.environ[INDUCTOR_ENV] = str(broken)  # not the cache's fault: keep it, for later compiles too
                raise
            self.folder = None
            kept = _is_disk_error(error)
            if not kept:
                _delete_folder(broken)
            logger.warning(
                "compiling with the cache in %s failed (%s), and worked in a temporary folder; %s",
                broken,
                first_line(_root_cause(error)),
                "the disk is full or read-only" if kept else "the cache was cleared, so the next run rebuilds it",
            )
            return result


class _OneUnreadableEntryLine(logging.Filter):
    """Inductor logs each FX graph cache entry it cannot unpickle with a traceback, then compiles the
    graph again: one line for the first, nothing for the rest."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != _FX_CACHE_UNREADABLE:
            return True
        if self.said:
            return False
        self.said = True
        problem = "" if not record.exc_info or record.exc_info[1] is None else f" ({first_line(record.exc_info[1])})"
        record.msg, record.args, record.exc_info, record.exc_text = (
            f"compiled kernels cached in {self.folder} could not be read{problem}; they are compiled again",
            (),
            None,
            None,
        )
        return True


_state = _CompileCache()


def use_persistent_compile_cache() -> Path | None:
    """Point Inductor at `<cache folder>/inductor` (once per process; call before torch.compile).

    Returns the folder in use, or None where Inductor keeps its own: the user set
    $TORCHINDUCTOR_CACHE_DIR, COSMOS3_COMPILE_CACHE=0, or the folder cannot take the cache (one warning).
    """
    return _state.use()


def run_compiled(compile_and_run: Callable[[], T]) -> T:
    """`compile_and_run()` (a compiled function's call, which may compile); where it raises while our
    cache is in use, once more in a fresh temporary folder (once per process).

    If the second try works the cache was broken: this process stays in the temporary folder, the
    cache is deleted (kept on a full or read-only disk) and one warning says so. If it fails too the
    cache is not to blame: it stays in use and the error is raised, for the caller's eager fallback.
    """
    return _state.run(compile_and_run)


def _persistent_folder() -> Path | None:
    if os.environ.get(COMPILE_CACHE_ENV, "1") == "0":
        return None
    chosen = os.environ.get(INDUCTOR_ENV)
    if chosen and chosen != _inductor_default():
        return None  # the user's folder (Inductor writes its default into the environment itself)
    folder = cache_dir() / INDUCTOR_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(folder).free
    except OSError as error:
        logger.warning("compiled kernels are not kept across runs: %s cannot be written (%s)", folder, error)
        return None
    if free < MIN_FREE_BYTES:
        logger.warning(
            "compiled kernels are not kept across runs: %s has %d MiB free, fewer than %d",
            folder,
            free // 2**20,
            MIN_FREE_BYTES // 2**20,
        )
        return None
    return folder


def _inductor_default() -> str | None:
    """The folder Inductor picks when $TORCHINDUCTOR_CACHE_DIR is unset (its import writes it there)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # an older torch: any folder in the environment counts as the user's
        return None
    return os.path.abspath(default_cache_dir())


def _caches_on() -> None:
    """The FX graph and AOTAutograd caches on (torch's default since 2.6), unless the user's
    environment turned them off."""
    import torch._functorch.config
    import torch._inductor.config

    if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:
        torch._inductor.config.fx_graph_cache = True
    if "TORCHINDUCTOR_AUTOGRAD_CACHE" not in os.environ:
        torch._functorch.config.enable_autograd_cache = True


def _clear_inductor_memory() -> None:
    """Forget the code Inductor loaded by path, so the next compile reads nothing of the broken folder."""
    from torch._inductor.utils import clear_caches

    clear_caches()


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what it wraps (torch wraps the OSError of a failed write, or of a bad binary)."""
    chain: list[BaseException] = [error]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and inner not in chain:
        chain.append(inner)
    return chain


def _is_out_of_memory(error: BaseException) -> bool:
    """The device ran out of memory: a compile in another folder would not help."""
    return type(error).__name__ == "OutOfMemoryError"


def _root_cause(error: BaseException) -> BaseException:
    return _causes(error)[-1]


def _is_disk_error(error: BaseException) -> bool:
    return any(isinstance(cause, OSError) and cause.errno in _DISK_ERRNOS for cause in _causes(error))


def _delete_folder(folder: Path) -> None:
    """Rename first (one step, so a concurrent run never reads half a folder), then delete."""
    aside = folder.with_name(f"{folder.name}.broken-{uuid.uuid4().hex[:8]}")
    try:
        folder.rename(aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)
