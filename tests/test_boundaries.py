"""The rooms' import boundaries, enforced: what a room may not import is blocked while every one of its modules is
imported in a fresh interpreter (so transitive and module-level imports count), and what it may not import lazily,
inside a function, is found by reading its import statements."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The reports' standard-library modules that the producer (diagnostics) imports too: the tables' contract and the
# seed's facts.
SHARED = ("geodiag.reports.schema", "geodiag.reports.seed")
# Importing any of these names (or a submodule) raises ImportError in the child interpreter.
BLOCKER = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Blocker())
"""


def _modules(folder: str, package: str, skip: tuple[str, ...] = ()) -> list[str]:
    names = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        if parts[-1] in ("__init__", "__main__"):
            parts = parts[:-1]
        if any(part in skip for part in parts):
            continue
        names.append(".".join((package, *parts)))
    return names


def _import_with_blocked(modules: list[str], blocked: tuple[str, ...], absent: tuple[str, ...] = ()) -> list[str]:
    """Import ``modules`` in a fresh interpreter with ``blocked`` unimportable; the ``absent`` prefixes it loaded."""
    code = (f"BLOCKED = {blocked!r}\n{BLOCKER}\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(sorted(n for n in sys.modules if n.startswith({absent!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]
    return eval(result.stdout.strip().splitlines()[-1])


def _imported_names(folder: str, package: str) -> dict[str, set[str]]:
    """Per file of ``folder``, the absolute module names its import statements name (at any depth)."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        module_parts = [*package.split("."), *path.relative_to(ROOT / folder).with_suffix("").parts]
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(module_parts[:-node.level] + ([base] if base else []))
                names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        found[str(path.relative_to(ROOT))] = names
    return found


def _offending(folder: str, package: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    def within(name: str, prefixes: tuple[str, ...]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    return [f"{file} imports {name}" for file, names in _imported_names(folder, package).items() for name in names
            if within(name, forbidden) and not within(name, allowed)]


@pytest.mark.parametrize("room", ["instruments", "nonfinite"])
def test_device_side_rooms_import_without_nnunet(room):
    modules = _modules(f"diagnostics/{room}", f"geodiag.diagnostics.{room}")
    assert len(modules) > 3
    loaded = _import_with_blocked(modules, ("nnunetv2", "pandas"), ("geodiag.diagnostics.nnunet", "geodiag.reports"))
    assert loaded in ([], ["geodiag.reports", "geodiag.reports.schema"])


@pytest.mark.parametrize("room, forbidden", [
    ("instruments", ("nnunetv2", "geodiag.reports", "geodiag.diagnostics.nonfinite", "geodiag.diagnostics.nnunet",
                     "geodiag.diagnostics.tools", "geodiag.diagnostics.study", "geodiag.diagnostics.cli")),
    ("nonfinite", ("nnunetv2", "geodiag.reports", "geodiag.diagnostics.nnunet", "geodiag.diagnostics.tools",
                   "geodiag.diagnostics.study", "geodiag.diagnostics.cli")),
    ("nnunet", ("geodiag.diagnostics.tools", "geodiag.diagnostics.study", "geodiag.diagnostics.cli")),
    ("tools", ("geodiag.diagnostics.study", "geodiag.diagnostics.cli")),
    ("study", ("geodiag.diagnostics.cli",)),
])
def test_rooms_never_import_what_their_docstring_forbids(room, forbidden):
    shared = SHARED  # the standard-library modules every room may use
    assert _offending(f"diagnostics/{room}", f"geodiag.diagnostics.{room}", forbidden, shared) == []


def test_the_loss_package_imports_without_nnunet_and_without_diagnostics():
    modules = _modules("losses", "geodiag.losses", skip=("trainer", "nnunet_ext"))
    assert "geodiag.losses.geometric_loss" in modules
    assert _import_with_blocked(modules, ("nnunetv2", "geodiag.diagnostics"), ("geodiag.diagnostics",)) == []
    assert _offending("losses", "geodiag.losses", ("geodiag.diagnostics", "geodiag.reports")) == []


def test_reports_never_import_torch_or_diagnostics():
    modules = _modules("reports", "geodiag.reports")
    assert "geodiag.reports.schema" in modules
    assert _import_with_blocked(modules, ("torch", "geodiag.diagnostics", "geodiag.losses"), ("torch",)) == []
    assert _offending("reports", "geodiag.reports", ("torch", "geodiag.diagnostics", "geodiag.losses")) == []


@pytest.mark.parametrize("module", SHARED)
def test_the_modules_shared_by_both_sides_are_standard_library_only(module):
    assert _import_with_blocked([module], ("numpy", "pandas", "torch", "matplotlib"), ("numpy", "pandas")) == []


def test_the_shared_fp16_limits_are_torchs():
    import torch

    from geodiag.reports import schema

    assert schema.FP16_MAX == float(torch.finfo(torch.float16).max)
    assert schema.FP16_SMALLEST_SUBNORMAL == float(torch.finfo(torch.float16).smallest_normal) / 2 ** 10
    assert schema.GRAD_SCALER_INITIAL_SCALE == torch.amp.GradScaler("cpu", enabled=True).get_scale()
