"""The layers declared in pyproject.toml hold for every module, and no project import hides in a function.

``lint-imports`` checks the phi3mlx/ folder; it does not follow the package-dir mapping that installs
convert/ and finetune/ as phi3mlx.convert and phi3mlx.finetune, so this test reads every source file
itself and applies the same layer list to all of them, imports inside functions included.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"phi3mlx": ROOT / "phi3mlx", "phi3mlx.convert": ROOT / "convert", "phi3mlx.finetune": ROOT / "finetune"}


def _layers() -> list[list[str]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [c for c in cfg["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    # "(name)" marks a layer import-linter may not find (convert/ and finetune/ are outside phi3mlx/)
    return [[m.strip().strip("()") for m in layer.split("|")] for layer in contract["layers"]]


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in FOLDERS.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg] + parts)
            if pkg == "phi3mlx" and parts and parts[0] in ("convert", "finetune"):
                continue
            mods[name] = f
    return mods


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, int, bool]]:
    """(target project module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []

    def resolve(base: str) -> str:
        while base and base not in modules:
            base = base.rpartition(".")[0]
        return base

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "phi3mlx":
                        out.append((resolve(a.name), child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    pkg = name if is_pkg else name.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{child.module}" if child.module else pkg
                else:
                    base = child.module or ""
                if base.split(".")[0] != "phi3mlx":
                    continue
                for a in child.names:
                    full = f"{base}.{a.name}"
                    out.append((full if full in modules else resolve(base), child.lineno, in_function))
            visit(child, inside)

    visit(tree, False)
    return out


def _layer_of(module: str, layers) -> tuple | None:
    best = None
    for i, layer in enumerate(layers):
        for entry in layer:
            if module == entry or module.startswith(entry + "."):
                if best is None or len(entry) > len(best[1]):
                    best = (i, entry)
    return best


def test_every_module_belongs_to_a_layer():
    layers = _layers()
    outside = [m for m in _modules() if _layer_of(m, layers) is None
               and m not in ("phi3mlx", "phi3mlx.__main__", "phi3mlx.convert", "phi3mlx.finetune", "phi3mlx.models")]
    assert not outside, f"modules in no layer of pyproject.toml's contract: {outside}"


def test_imports_only_go_down_and_none_hides_in_a_function():
    layers = _layers()
    modules = _modules()
    problems = []
    for name, path in modules.items():
        src = _layer_of(name, layers)
        for target, line, in_function in _imports(name, path, modules):
            where = f"{path.relative_to(ROOT)}:{line}"
            if in_function:
                problems.append(f"{where}: import of {target} inside a function")
            if target == name or src is None:
                continue
            if target == "phi3mlx":  # the package root (the public API) sits above everything but the CLI
                if src[0] != 0:
                    problems.append(f"{where}: {name} imports the package root phi3mlx")
                continue
            dst = _layer_of(target, layers)
            if dst is None:
                continue
            if dst[0] < src[0]:
                problems.append(f"{where}: {name} (layer {src[0]}) imports {target} from a higher layer ({dst[0]})")
            elif dst[0] == src[0] and dst[1] != src[1]:
                problems.append(f"{where}: {name} imports its sibling {target} (layer {src[0]} siblings are independent)")
    assert not problems, "\n".join(problems)


def test_the_checker_catches_an_upward_import(tmp_path):
    """The checker itself: an upward import hidden in a function is reported twice."""
    f = tmp_path / "cache.py"
    f.write_text("def f():\n    from .generate import generate_step\n")
    found = _imports("phi3mlx.cache", f, {"phi3mlx.cache": f, "phi3mlx.generate": f})
    assert found == [("phi3mlx.generate", 2, True)]
    assert _layer_of("phi3mlx.generate", _layers())[0] < _layer_of("phi3mlx.cache", _layers())[0]


def test_lint_imports_passes():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.fail("lint-imports is not installed (it is part of the test extra)")
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
