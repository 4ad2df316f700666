"""pyproject.toml declares what the code imports: a missing declaration breaks a fresh install, an unused one
installs dead weight. Imports are read from the source with ast (no import runs) and mapped to distributions."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("losses", "diagnostics", "reports")


def _imported_modules(folders: tuple[str, ...]) -> set[str]:
    """Top-level names of absolute imports in every .py file under ``folders``."""
    names = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def _third_party(names: set[str]) -> set[str]:
    """The distributions (normalised names) providing the third-party ones among ``names``."""
    # geodiag itself, the tests' helper modules, and the user-loss module test_bounds.py writes at run time
    local = {"geodiag", "geodiag_user_losses"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    providers = importlib.metadata.packages_distributions()
    wanted = names - set(sys.stdlib_module_names) - local - {"__future__"}
    missing = {name for name in wanted if name not in providers}
    assert not missing, f"imported but not installed: {sorted(missing)}"
    return {_normalised(providers[name][0]) for name in wanted}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(requirements: list[str]) -> set[str]:
    return {_normalised(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]) for requirement in requirements}


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = _declared(PROJECT["dependencies"])
TEST = _declared(PROJECT["optional-dependencies"]["test"])


def test_every_package_import_is_a_declared_dependency():
    assert _third_party(_imported_modules(PACKAGE_FOLDERS)) <= RUNTIME


def test_every_test_import_is_declared_for_tests():
    assert _third_party(_imported_modules(("tests",))) <= RUNTIME | TEST


def test_every_runtime_dependency_is_imported_by_the_package():
    assert RUNTIME <= _third_party(_imported_modules(PACKAGE_FOLDERS))
