"""nnU-Net's ``-tr NAME`` lookup read from the source: the class ``nnUNetv2_train`` would get, and its class-level
settings, without importing (running) any trainer module.

nnU-Net imports every module of its trainer folder, then of each ``nnUNet_extTrainer`` folder, until one has the
name; that pulls in most of nnU-Net and torch, and runs the user's modules, for a check that only needs to name a
file. This walks the same folders in the same order (``pkgutil.iter_modules``, modules before subpackages) and
parses each module with ``ast``: a module has the name when a top-level statement binds it, and a
``from M import NAME`` is followed to M. Where the source alone cannot say (a star import, a binding under an
``if`` or ``try``, a base class that is not a plain name, a setting that is not a literal, a module without Python
source) it raises ``SourceUnclear``, and the caller asks nnU-Net itself. It cannot see a module that fails when
imported: ``nnUNetv2_train`` reports that one itself, at its start.
"""
from __future__ import annotations

import ast
import builtins
import os
import pkgutil
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from typing import Any, Iterable, Optional

# The class every trainer must subclass (nnU-Net asserts it after the lookup), by module and name.
NNUNET_BASE_MODULE, NNUNET_BASE_CLASS = "nnunetv2.training.nnUNetTrainer.nnUNetTrainer", "nnUNetTrainer"
_COMPOUND = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.With, ast.AsyncWith, ast.Match, ast.Delete,
             *((ast.TryStar,) if hasattr(ast, "TryStar") else ()))
_MAX_HOPS = 32  # from-import hops followed from one name (a real chain is a few long; a cycle never ends)


class SourceUnclear(Exception):
    """The source alone does not say which class nnU-Net would get, or its settings (the message says why)."""


@dataclass(frozen=True)
class ModuleSource:
    """A module as nnU-Net's lookup imports it: its dotted name, its file, and the folder first on sys.path then."""

    name: str
    file: Path
    search_path: Optional[str]


@dataclass(frozen=True, eq=False)
class ClassSource:
    """A class statement (``node``) of a module; a builtin such as ``object`` has neither."""

    name: str
    module: Optional[ModuleSource] = None
    node: Optional[ast.ClassDef] = field(default=None, repr=False)

    def _key(self) -> tuple:
        return (str(self.module.file) if self.module else None, self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassSource) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


OBJECT = ClassSource("object")


# ---------------------------------------------------------------------------------------------- the lookup
def find_trainer(name: str, ext_trainer: Optional[str]) -> Optional[ClassSource]:
    """The class ``nnUNetv2_train -tr name`` would get with nnUNet_extTrainer ``ext_trainer``; None when nnU-Net
    would find none."""
    root = nnunet_folder()
    found = _search(os.path.join(root, "training", "nnUNetTrainer"), name, "nnunetv2.training.nnUNetTrainer", root)
    if found is None and ext_trainer is not None:
        for path in ext_trainer.split(os.pathsep):
            if path.strip() and os.path.exists(path):
                found = _search(path, name, None, path)
                if found is not None:
                    break
    return found


def nnunet_folder() -> str:
    spec = _find_spec("nnunetv2", None)
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnclear("nnunetv2 is not installed in this interpreter")
    return list(spec.submodule_search_locations)[0]


def class_in_module(module_name: str, name: str) -> Optional[ClassSource]:
    """The class ``module_name`` binds as ``name`` at top level (followed through from-imports); None if unbound."""
    module = _module(module_name, None)
    statement = _binding(module, name)
    return None if statement is None else _class_bound(module, name, statement, 0)


def _search(folder: str, name: str, package: Optional[str], search_path: str) -> Optional[ClassSource]:
    """nnU-Net's recursive search of ``folder``: its modules in order, then its subpackages."""
    found = list(pkgutil.iter_modules([folder]))
    for info in found:
        if not info.ispkg:
            spec = info.module_finder.find_spec(info.name)
            module = _source_of(spec, _dotted(package, info.name), search_path)
            statement = _binding(module, name)
            if statement is not None:
                return _class_bound(module, name, statement, 0)
    for info in found:
        if info.ispkg:
            result = _search(os.path.join(folder, info.name), name, _dotted(package, info.name), search_path)
            if result is not None:
                return result
    return None


def _dotted(package: Optional[str], name: str) -> str:
    return name if not package else f"{package}.{name}"


# ---------------------------------------------------------------------------------------------- modules
def _find_spec(fullname: str, search_path: Optional[str]) -> Optional[ModuleSpec]:
    """importlib's own finders asked for ``fullname`` level by level (no module executed), ``search_path`` first on
    sys.path as during nnU-Net's lookup."""
    spec, path = None, None
    parts = fullname.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        spec = PathFinder.find_spec(name, [search_path]) if depth == 1 and search_path else None
        spec = spec or next((found for finder in sys.meta_path
                             if (found := _ask(finder, name, path)) is not None), None)
        if spec is None or (depth < len(parts) and spec.submodule_search_locations is None):
            return None
        path = spec.submodule_search_locations
    return spec


def _ask(finder: Any, name: str, path: Optional[Iterable[str]]) -> Optional[ModuleSpec]:
    find = getattr(finder, "find_spec", None)
    return find(name, path) if find is not None else None


def _module(fullname: str, search_path: Optional[str]) -> ModuleSource:
    return _source_of(_find_spec(fullname, search_path), fullname, search_path)


def _source_of(spec: Optional[ModuleSpec], fullname: str, search_path: Optional[str]) -> ModuleSource:
    if spec is None:
        raise SourceUnclear(f"cannot locate the module {fullname}")
    if not spec.origin or not spec.origin.endswith(".py"):
        raise SourceUnclear(f"the module {fullname} has no Python source ({spec.origin})")
    return ModuleSource(fullname, Path(spec.origin), search_path)


def _parse(file: Path) -> ast.Module:
    try:
        return _parse_version(str(file), file.stat().st_mtime_ns)
    except OSError as exc:
        raise SourceUnclear(f"cannot read {file}: {exc}") from None


@lru_cache(maxsize=256)
def _parse_version(file: str, mtime_ns: int) -> ast.Module:
    try:
        return ast.parse(Path(file).read_text(encoding="utf-8"), file)
    except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
        raise SourceUnclear(f"cannot parse {file}: {exc}") from None


# ---------------------------------------------------------------------------------------------- bindings
def _binding(module: ModuleSource, name: str, before: Optional[ast.stmt] = None) -> Optional[ast.stmt]:
    """The last top-level statement of ``module`` (before ``before``) that binds ``name``; None if none does."""
    found, star = None, None
    for statement in _parse(module.file).body:
        if statement is before:
            break
        if isinstance(statement, ast.ImportFrom) and any(alias.name == "*" for alias in statement.names):
            star = statement
        elif name in _direct_names(statement):
            found, star = statement, None
        elif _binds_inside(statement, name) or (isinstance(statement, ast.FunctionDef)
                                                 and statement.name == "__getattr__"):
            raise SourceUnclear(f"{module.file}:{statement.lineno}: {name} may be bound here at run time")
    if star is not None:
        raise SourceUnclear(f"{module.file}:{star.lineno}: a star import may bind {name}")
    return found


def _direct_names(statement: ast.stmt) -> set[str]:
    """Names a top-level statement binds unconditionally."""
    if isinstance(statement, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return {statement.name}
    if isinstance(statement, ast.Import):
        return {alias.asname or alias.name.split(".")[0] for alias in statement.names}
    if isinstance(statement, ast.ImportFrom):
        return {alias.asname or alias.name for alias in statement.names}
    if isinstance(statement, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        if isinstance(statement, ast.AnnAssign) and statement.value is None:
            return set()
        return {node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name)}
    return set()


def _binds_inside(statement: ast.stmt, name: str) -> bool:
    """Whether a compound statement (if, try, for, with, del...) may bind ``name`` somewhere inside."""
    if not isinstance(statement, _COMPOUND):
        return False
    for node in ast.walk(statement):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load) and node.id == name:
            return True
        if isinstance(node, ast.stmt) and not isinstance(node, _COMPOUND) and name in _direct_names(node):
            return True
    return False


def _class_bound(module: ModuleSource, name: str, statement: ast.stmt, hops: int) -> ClassSource:
    """The class a binding statement gives ``name``: its class statement, or the one its from-import names."""
    if isinstance(statement, ast.ClassDef):
        return ClassSource(name, module, statement)
    if not isinstance(statement, ast.ImportFrom) or hops > _MAX_HOPS:
        raise SourceUnclear(f"{module.file}:{statement.lineno}: {name} is bound by neither a class statement nor "
                            "a from-import")
    alias = next(alias for alias in statement.names if (alias.asname or alias.name) == name)
    target = _module(_absolute(module, statement), module.search_path)
    found = _binding(target, alias.name)
    if found is None:
        raise SourceUnclear(f"{target.file} binds no {alias.name} at top level (a submodule?)")
    return _class_bound(target, alias.name, found, hops + 1)


def _absolute(module: ModuleSource, statement: ast.ImportFrom) -> str:
    """The absolute module name of a (possibly relative) from-import in ``module``."""
    if statement.level == 0:
        return statement.module
    package = module.name if module.file.name == "__init__.py" else module.name.rpartition(".")[0]
    parts = package.split(".") if package else []
    if statement.level > len(parts):
        raise SourceUnclear(f"{module.file}:{statement.lineno}: a relative import beyond the top-level package")
    base = ".".join(parts[:len(parts) - statement.level + 1])
    return f"{base}.{statement.module}" if statement.module else base


# ---------------------------------------------------------------------------------------------- classes
def _bases(cls: ClassSource) -> list[ClassSource]:
    node = cls.node
    if node.keywords:
        raise SourceUnclear(f"{cls.module.file}:{node.lineno}: class {cls.name} has keywords (a metaclass?)")
    bases = []
    for expression in node.bases:
        if not isinstance(expression, ast.Name):
            raise SourceUnclear(f"{cls.module.file}:{node.lineno}: base {ast.unparse(expression)} of {cls.name} "
                                "is not a plain name")
        statement = _binding(cls.module, expression.id, before=node)
        if statement is None and isinstance(getattr(builtins, expression.id, None), type):
            bases.append(ClassSource(expression.id))
        elif statement is None:
            raise SourceUnclear(f"{cls.module.file}:{node.lineno}: base {expression.id} of {cls.name} is not bound")
        else:
            bases.append(_class_bound(cls.module, expression.id, statement, 0))
    return bases or [OBJECT]


def method_resolution_order(cls: ClassSource) -> list[ClassSource]:
    """Python's C3 linearisation of ``cls`` and its bases, as read from the source."""
    if cls.node is None:
        return [cls]
    bases = _bases(cls)
    sequences = [method_resolution_order(base) for base in bases] + [bases]
    order = [cls]
    while any(sequences):
        head = next((seq[0] for seq in sequences if seq and not any(seq[0] in other[1:] for other in sequences)),
                    None)
        if head is None:
            raise SourceUnclear(f"no consistent method resolution order for {cls.name}")
        order.append(head)
        sequences = [seq[1:] if seq and seq[0] == head else seq for seq in sequences]
    return order


def subclasses_nnunet_trainer(cls: ClassSource) -> bool:
    base = _module(NNUNET_BASE_MODULE, None).file.resolve()
    return any(c.module is not None and c.name == NNUNET_BASE_CLASS and c.module.file.resolve() == base
               for c in method_resolution_order(cls))


def class_settings(cls: ClassSource, keys: Iterable[str]) -> dict[str, Any]:
    """The class-level value of each key as ``getattr(cls, key, None)`` would give it, read from literal
    assignments in the class statements of its method resolution order."""
    order = method_resolution_order(cls)
    settings = {}
    for key in keys:
        settings[key] = next((value for c in order if c.node is not None
                              for found, value in [_assigned(c, key)] if found), None)
    return settings


def _assigned(cls: ClassSource, key: str) -> tuple[bool, Any]:
    """(whether the class statement binds ``key``, its literal value), the last assignment winning."""
    found, value = False, None
    for statement in cls.node.body:
        simple = isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None and all(
            isinstance(target, ast.Name) for target in _targets(statement))
        if simple and key in {target.id for target in _targets(statement)}:
            try:
                found, value = True, ast.literal_eval(statement.value)
            except ValueError:
                raise SourceUnclear(f"{cls.module.file}:{statement.lineno}: {cls.name}.{key} is not a literal "
                                    f"({ast.unparse(statement.value)})") from None
        elif not simple and (key in _direct_names(statement) or _binds_inside(statement, key)):
            raise SourceUnclear(f"{cls.module.file}:{statement.lineno}: {cls.name}.{key} is not a plain assignment")
    for statement in _parse(cls.module.file).body:
        if isinstance(statement, ast.Assign) and any(_is_attribute(target, cls.name, key)
                                                     for target in statement.targets):
            raise SourceUnclear(f"{cls.module.file}:{statement.lineno}: {cls.name}.{key} is set after the class")
    return found, value


def _targets(statement: ast.stmt) -> list[ast.expr]:
    return statement.targets if isinstance(statement, ast.Assign) else [statement.target]


def _is_attribute(target: ast.expr, owner: str, attribute: str) -> bool:
    return (isinstance(target, ast.Attribute) and target.attr == attribute and isinstance(target.value, ast.Name)
            and target.value.id == owner)
