"""Inductor's cache lives in the package's cache folder, so a second process loads the fused kernels
instead of compiling them; a folder that cannot take it, a broken cache or a full disk never fails a run."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from small_disk import fill, small_disk

from cosmos3_offload import caches
from cosmos3_offload.kernels import fused

HAS_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="Inductor's CPU backend needs a C++ compiler")
# One fused kernel, compiled in a fresh process; prints what Inductor's FX graph cache did.
ONE_KERNEL = """
import json, torch
from torch._dynamo.utils import counters
from cosmos3_offload.kernels import fused
out = fused.relu_square(torch.tensor([[-2.0, 3.0], [1.0, -1.0]]))
cache = counters["inductor"]
print(json.dumps({"hits": cache["fxgraph_cache_hit"], "misses": cache["fxgraph_cache_miss"],
                  "eager": fused.compile_failed(), "out": out.tolist()}))
"""


def _run_one_kernel(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "COSMOS3_"))}
    env[caches.CACHE_ENV] = str(cache)
    done = subprocess.run([sys.executable, "-c", ONE_KERNEL], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _relu_square_again(up: torch.Tensor) -> torch.Tensor:
    return torch.relu(up).square()  # another code object, so this process compiles it anew


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A cache folder that a fresh process, then another, compiled relu_square with, and what the cache did in
    each (both fresh: this process's Inductor state, after the suite's other compiles, is not a user's)."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, _run_one_kernel(cache), _run_one_kernel(cache)


@pytest.fixture
def fresh_choice(monkeypatch, tmp_path):
    """This process decides its Inductor folder anew, under tmp_path/cache; the environment is restored after."""
    monkeypatch.setattr(caches, "_state", caches._CompileCache())
    monkeypatch.setenv(caches.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(caches.COMPILE_CACHE_ENV, raising=False)
    monkeypatch.delenv(caches.INDUCTOR_ENV, raising=False)
    return tmp_path / "cache"


@needs_cxx
def test_a_second_process_loads_the_fused_kernel_from_the_cache(warm_cache):
    """This process compiles into <cache>/inductor; a fresh one finds the graph there and compiles nothing."""
    cache, first, second = warm_cache
    assert (cache / caches.INDUCTOR_FOLDER / "fxgraph").is_dir()
    assert first["misses"] >= 1 and first["hits"] == 0
    assert second["hits"] >= 1 and second["misses"] == 0
    assert not first["eager"] and not second["eager"]
    assert second["out"] == [[0.0, 9.0], [1.0, 0.0]]


@needs_cxx
def test_a_broken_cache_is_cleared_and_the_kernel_compiles_again(fresh_choice, monkeypatch, caplog):
    """Kernel binaries cut short (a crash mid-write) make loading raise: the kernel compiles once more
    in a temporary folder, runs compiled, the broken cache is deleted, one warning says so. The cache is this
    process's own (a cache key depends on the process's Inductor state, which the suite's other compiles change)."""
    from torch._inductor.utils import clear_caches

    monkeypatch.setattr(fused._clock, "failed", False)
    fused._LazilyCompiled(_relu_square_again)(torch.tensor([[-2.0, 3.0], [1.0, -1.0]]))
    binaries = [p for p in (fresh_choice / "inductor").rglob("*") if p.suffix in (".so", ".py") and p.is_file()]
    assert binaries
    for path in binaries:  # new files: this process has the old ones mapped, and must not see them change
        path.unlink()
        path.write_bytes(b"\x7fELF cut short")
    clear_caches()  # nothing of it is loaded in this process
    torch._dynamo.reset()  # compile anew: the cache is asked again
    kernel = fused._LazilyCompiled(_relu_square_again)
    with caplog.at_level(logging.WARNING):
        out = kernel(torch.tensor([[-2.0, 3.0], [1.0, -1.0]]))
    assert out.tolist() == [[0.0, 9.0], [1.0, 0.0]]
    assert not fused.compile_failed()
    assert not (fresh_choice / "inductor").exists()
    assert not os.environ[caches.INDUCTOR_ENV].startswith(str(fresh_choice))
    assert [r.name for r in caplog.records if r.levelno >= logging.WARNING] == ["cosmos3_offload.caches"]


def _relu_square_third(up: torch.Tensor) -> torch.Tensor:
    return torch.relu(up).square()  # a third code object: compiled anew here


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@needs_cxx
def test_unreadable_entries_are_compiled_again_with_one_line(fresh_choice, monkeypatch):
    """Entries Inductor cannot unpickle (a disk error, another torch): compiled again; of Inductor's
    warnings, one per entry with a traceback, one line is left. The entries are this process's own (a cache
    key depends on the process's Inductor state, which the suite's other compiles change)."""
    from torch._inductor.utils import clear_caches

    monkeypatch.setattr(fused._clock, "failed", False)
    square, row = torch.tensor([[-2.0, 3.0], [1.0, -1.0]]), torch.tensor([[-2.0, 3.0, 1.0]])
    fused._LazilyCompiled(_relu_square_third)(square)
    fused._LazilyCompiled(_relu_square_third)(row)  # another shape: a second entry
    entries = [p for p in (fresh_choice / "inductor" / "fxgraph").rglob("*") if p.is_file()]
    assert entries
    for path in entries:
        path.write_bytes(b"not a pickle")
    clear_caches()
    torch._dynamo.reset()  # compile anew: the cache is asked again
    records = _Records()
    logger = logging.getLogger("torch._inductor.codecache")
    logger.addHandler(records)
    try:
        fused._LazilyCompiled(_relu_square_third)(square)
        out = fused._LazilyCompiled(_relu_square_third)(row)
    finally:
        logger.removeHandler(records)
    assert out.tolist() == [[0.0, 9.0, 1.0]] and not fused.compile_failed()
    (line,) = records.records
    assert "could not be read" in line.getMessage() and line.exc_info is None


def test_the_cache_goes_to_the_package_cache_folder(fresh_choice):
    """Unset (or at Inductor's default, which its import writes), Inductor's folder becomes <cache>/inductor."""
    assert caches.use_persistent_compile_cache() == fresh_choice / "inductor"
    assert os.environ[caches.INDUCTOR_ENV] == str(fresh_choice / "inductor")
    assert (fresh_choice / "inductor").is_dir() and not list((fresh_choice / "inductor").iterdir())


def test_a_folder_the_user_chose_is_kept(fresh_choice, monkeypatch, tmp_path):
    """$TORCHINDUCTOR_CACHE_DIR set by the user wins."""
    monkeypatch.setenv(caches.INDUCTOR_ENV, str(tmp_path / "mine"))
    assert caches.use_persistent_compile_cache() is None
    assert os.environ[caches.INDUCTOR_ENV] == str(tmp_path / "mine")


def test_the_switch_leaves_inductor_alone(fresh_choice, monkeypatch):
    """COSMOS3_COMPILE_CACHE=0: Inductor's own default folder, nothing created under ours."""
    monkeypatch.setenv(caches.COMPILE_CACHE_ENV, "0")
    assert caches.use_persistent_compile_cache() is None
    assert caches.INDUCTOR_ENV not in os.environ
    assert not fresh_choice.exists()


def test_an_unwritable_folder_costs_one_warning(fresh_choice, caplog):
    """A cache folder that cannot be created: Inductor's default, one warning however many compiles ask."""
    fresh_choice.parent.mkdir(parents=True, exist_ok=True)
    fresh_choice.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING):
        assert caches.use_persistent_compile_cache() is None
        assert caches.use_persistent_compile_cache() is None
    assert caches.INDUCTOR_ENV not in os.environ
    assert len(caplog.records) == 1 and "cannot be written" in caplog.records[0].getMessage()


def test_a_full_disk_costs_one_warning(fresh_choice, tmp_path, monkeypatch, caplog):
    """A full disk under the cache folder: Inductor's default folder for this run, one warning."""
    with small_disk(tmp_path / "disk", size="4M") as disk:
        monkeypatch.setenv(caches.CACHE_ENV, str(disk / "cache"))
        (disk / "cache" / "inductor").mkdir(parents=True)
        fill(disk)
        with caplog.at_level(logging.WARNING):
            assert caches.use_persistent_compile_cache() is None
    assert caches.INDUCTOR_ENV not in os.environ
    assert len(caplog.records) == 1


def _failing(*errors: BaseException):
    """A compile that raises `errors` in turn, then returns "compiled"; it counts its calls."""
    calls = []

    def compile_and_run():
        calls.append(len(calls))
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "compiled"

    return compile_and_run, calls


def test_a_full_disk_keeps_the_cache(fresh_choice, monkeypatch, caplog):
    """A compile that failed writing to a full disk works in a temporary folder; the cache itself is kept."""
    monkeypatch.setattr(caches, "_clear_inductor_memory", lambda: None)
    folder = caches.use_persistent_compile_cache()
    (folder / "entry").write_text("kept")
    failure = RuntimeError("backend='inductor' raised:")
    failure.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    compile_and_run, calls = _failing(failure)
    with caplog.at_level(logging.WARNING):
        assert caches.run_compiled(compile_and_run) == "compiled"
    assert (folder / "entry").read_text() == "kept" and len(calls) == 2
    assert os.environ[caches.INDUCTOR_ENV] != str(folder)
    assert len(caplog.records) == 1 and "full or read-only" in caplog.records[0].getMessage()


def test_a_compile_that_fails_everywhere_keeps_the_cache(fresh_choice, monkeypatch, caplog):
    """No compiler: the second try fails too, so the cache is not to blame: kept, still in use, no warning
    of ours (the caller's eager fallback warns), and no third try later."""
    monkeypatch.setattr(caches, "_clear_inductor_memory", lambda: None)
    folder = caches.use_persistent_compile_cache()
    (folder / "entry").write_text("kept")
    compile_and_run, calls = _failing(RuntimeError("no compiler"), RuntimeError("no compiler"), RuntimeError("again"))
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="no compiler"):
        caches.run_compiled(compile_and_run)
    assert (folder / "entry").read_text() == "kept" and len(calls) == 2
    assert os.environ[caches.INDUCTOR_ENV] == str(folder)
    with pytest.raises(RuntimeError, match="again"):
        caches.run_compiled(compile_and_run)
    assert len(calls) == 3 and not caplog.records
