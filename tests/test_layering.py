"""The package's layers import only downwards, and the pure layers stay pure."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cosmos3_offload"
BASE = {"errors", "units", "caches"}
LAYERS = (
    "model",
    "request",
    "planning",
    "offload",
    "quant",
    "kernels",
    "parallel",
    "split",
    "stepcache",
    "vae",
    "loading",
    "app",
    "serve",
    "integration",
    "main",
)
# What each layer may import from this package (itself and `base` always).
ALLOWED = {
    "base": set(),
    "model": set(),
    "request": {"model"},
    "planning": {"model"},
    "offload": set(),
    "quant": set(),
    "kernels": set(),
    "parallel": {"planning"},
    "split": {"kernels", "parallel"},
    "stepcache": set(),
    "vae": {"model", "planning", "offload"},
    "loading": {"model", "planning", "offload", "quant", "vae"},
    "app": set(LAYERS[: LAYERS.index("app")]),
    # The two ways in besides the CLI, side by side: an HTTP server and diffusers' pipeline.
    "serve": set(LAYERS[: LAYERS.index("app") + 1]),
    "integration": set(LAYERS[: LAYERS.index("app") + 1]),
    # The console script and `python -m`: they dispatch to every way in.
    "main": set(LAYERS),
}
# Third-party modules a layer must not import: the planner is arithmetic, the model facts are
# plain data, the offload engine is generic (no diffusers model classes).
FORBIDDEN = {
    "model": {"torch", "diffusers", "numpy", "safetensors"},
    "request": {"torch", "diffusers", "numpy", "safetensors", "transformers", "accelerate"},
    "planning": {"torch", "diffusers", "numpy", "safetensors", "transformers", "accelerate"},
    "offload": {"diffusers", "transformers"},
    "quant": {"diffusers", "transformers", "safetensors"},
    "kernels": {"diffusers", "transformers", "safetensors"},
    "parallel": {"diffusers", "transformers", "safetensors"},
    "split": {"safetensors"},
}


def layer_of(module: str) -> str:
    """'cosmos3_offload.planning.plan' -> 'planning'; the base modules and the package root -> 'base'."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in BASE:
        return "base"
    if parts[1] in ("__main__", "main"):  # the console script and `python -m cosmos3_offload`
        return "main"
    assert parts[1] in LAYERS, f"{module} is in no known layer; add it to tests/test_layering.py"
    return parts[1]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["cosmos3_offload", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(module: str, path: Path) -> list[str]:
    """Absolute names of every module `module` imports (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names.append(target)
            names += [f"{target}.{alias.name}" for alias in node.names]  # `from . import x` may name a module
    return names


def edges() -> list[tuple[str, str]]:
    known = modules()
    found = []
    for module, path in known.items():
        for name in imports(module, path):
            if name.startswith("cosmos3_offload") and name in known:
                found.append((module, name))
            elif not name.startswith("cosmos3_offload"):
                found.append((module, name.split(".")[0]))
    return found


def test_every_layer_is_known():
    """A new subpackage must be placed in the layer order before it can land."""
    for module in modules():
        layer_of(module)


def test_imports_only_go_down():
    """No module imports a layer above it or beside it (e.g. the offload engine never imports model or split)."""
    wrong = []
    for module, target in edges():
        if not target.startswith("cosmos3_offload") or module == "cosmos3_offload":
            continue  # the package root re-exports the API lazily
        source, destination = layer_of(module), layer_of(target)
        if destination not in {source, "base"} | ALLOWED[source]:
            wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_pure_layers_import_no_heavy_libraries():
    """planning imports no torch (nothing that runs kernels), model is plain data, offload no model classes."""
    wrong = [
        f"{module} -> {target}"
        for module, target in edges()
        if not target.startswith("cosmos3_offload") and target in FORBIDDEN.get(layer_of(module), set())
    ]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The import scanner resolves relative imports, so a wrong edge would be found."""
    fake = tmp_path / "engine.py"
    fake.write_text("from ..model.groups import REASONER\nfrom . import arena\nimport torch\n")
    names = imports("cosmos3_offload.offload.engine", fake)
    assert "cosmos3_offload.model.groups" in names and "cosmos3_offload.offload.arena" in names and "torch" in names


@pytest.mark.parametrize(
    "module",
    [
        "cosmos3_offload.planning.search",
        "cosmos3_offload.model.groups",
        "cosmos3_offload.request.spec",
        "cosmos3_offload.loading.files",
        "cosmos3_offload.app.launch",
        "cosmos3_offload.main",
    ],
)
def test_importing_a_pure_layer_loads_no_torch(module):
    """The planner, the model facts, the request's declaration, the file checks and the entry point run
    without torch: importing
    them loads none (checked in a fresh process)."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
