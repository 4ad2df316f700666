"""nnU-Net's environment for geodiag: trainer discovery folders, data folders, and the `doctor` checks.

nnU-Net finds ``-tr NAME`` first inside its own package tree, then in each folder of ``nnUNet_extTrainer``
(in order). The seed's drift came from exactly this: a stale copy of the trainer inside site-packages (warm-up 5
instead of 20) silently won. ``diagnose`` finds which class ``nnUNetv2_train -tr NAME`` would get, walking nnU-Net's
folders in nnU-Net's order, and compares it with this geodiag's class. It reads their source
(``trainer_source``): an environment check that imported every trainer module, as nnU-Net's lookup does, would
take as long as starting a training run; where the source alone cannot say, nnU-Net's own lookup runs in a fresh
interpreter with the user's environment.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from ..instruments.errors import ArgumentError, GeodiagError
from .trainer_source import (NNUNET_BASE_CLASS, SourceUnclear, class_in_module, class_settings, find_trainer,
                             subclasses_nnunet_trainer)

EXT_TRAINER_VAR = "nnUNet_extTrainer"
DEFAULT_TRAINER = "nnUNetTrainerGeometric"
# The settings a resolved trainer class is compared on.
COMPARED_SETTINGS = ("warmup_epochs", "geometric_preset", "stabilizer", "eps", "compactness_weight",
                     "aspect_weight", "geometric_reference")
# Single-threaded, non-spinning, in-process settings for nnU-Net on a small CPU (see the project notes).
CPU_FRIENDLY_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "nnUNet_compile": "f", "nnUNet_n_proc_DA": "0",
                    "nnUNet_def_n_proc": "1"}


def _package_folder(package: str) -> Path:
    """A geodiag package's folder, found without importing it (geodiag.losses imports torch)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GeodiagError(f"cannot locate the package {package}; is geodiag installed?")
    return Path(spec.submodule_search_locations[0])


def trainer_folders() -> list[Path]:
    """Folders nnU-Net must search for geodiag's trainers: the loss shim, and the monitor's when it exists.

    Shim folders, never a package root: nnU-Net drops every module imported from a searched folder out of
    sys.modules afterwards.
    """
    folders = [_package_folder("geodiag.losses") / "nnunet_ext"]
    monitor = _package_folder("geodiag.diagnostics") / "nnunet_ext"
    if monitor.is_dir():
        folders.append(monitor)
    return folders


def ext_trainer_value(existing: Optional[str] = None) -> str:
    """nnUNet_extTrainer with geodiag's folders first, then the other folders of ``existing`` (deduplicated)."""
    ours = [str(f) for f in trainer_folders()]
    others = [p for p in (existing or "").split(os.pathsep) if p.strip() and p not in ours]
    return os.pathsep.join(ours + list(dict.fromkeys(others)))


@dataclass(frozen=True)
class NnunetDirs:
    """nnU-Net's three data folders."""

    raw: Path
    preprocessed: Path
    results: Path

    @classmethod
    def under(cls, root: str | Path) -> "NnunetDirs":
        root = Path(root).absolute()
        return cls(root / "nnUNet_raw", root / "nnUNet_preprocessed", root / "nnUNet_results")

    def create(self) -> "NnunetDirs":
        for folder in (self.raw, self.preprocessed, self.results):
            if folder.exists() and not folder.is_dir():
                raise GeodiagError(f"{folder} exists and is not a folder")
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def as_env(self) -> dict[str, str]:
        return {"nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                "nnUNet_results": str(self.results)}


def nnunet_env(dirs: Optional[NnunetDirs] = None, base: Optional[Mapping[str, str]] = None,
               **overrides: str) -> dict[str, str]:
    """An environment for running nnU-Net's tools with geodiag's trainers (for subprocesses).

    Starts from ``base`` (default os.environ), adds the CPU-friendly defaults where unset, geodiag's trainer
    folders, ``dirs`` and finally ``overrides``.
    """
    env = dict(os.environ if base is None else base)
    for key, value in CPU_FRIENDLY_ENV.items():
        env.setdefault(key, value)
    env[EXT_TRAINER_VAR] = ext_trainer_value(env.get(EXT_TRAINER_VAR))
    if dirs is not None:
        env.update(dirs.as_env())
    env.update(overrides)
    return env


def export_lines(root: Optional[str | Path] = None) -> list[str]:
    """Shell lines for ``eval "$(geodiag env)"``; with ``root``, its nnU-Net data folders are created and exported."""
    values = {EXT_TRAINER_VAR: ext_trainer_value(os.environ.get(EXT_TRAINER_VAR))}
    if root is not None:
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ArgumentError(f"{{root}} {root} exists and is not a folder", "root")
        values.update(NnunetDirs.under(root).create().as_env())
    return [f"export {key}={shlex.quote(value)}" for key, value in values.items()]


# ---------------------------------------------------------------------------------------------- doctor
# The module that holds geodiag's trainers, and the class-level settings doctor reads off a trainer class.
OUR_TRAINERS = "geodiag.losses.nnunet.trainer"
CLASS_SETTINGS = ("warmup_epochs", "geometric_preset", "compactness_weight", "aspect_weight", "geometric_reference")
LOOKUP_FROM_SOURCE = "read from the source (no trainer module imported)"

_RESOLVE_SCRIPT = r"""
import importlib, inspect, json, sys
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from geodiag.diagnostics.nnunet.environment import CLASS_SETTINGS, OUR_TRAINERS, compared_settings

# nnU-Net drops modules of nnUNet_extTrainer folders from sys.modules after the lookup: record their files.
module_files = {}
_import_module = importlib.import_module
def _recording_import(name, package=None):
    module = _import_module(name, package)
    module_files[module.__name__] = getattr(module, "__file__", None)
    return module
importlib.import_module = _recording_import

def describe(cls):
    file = module_files.get(cls.__module__) or inspect.getfile(cls)
    settings = compared_settings({key: getattr(cls, key, None) for key in CLASS_SETTINGS})
    return {"module": cls.__module__, "file": file, "settings": settings}

name = sys.argv[1]
result = {}
try:
    result["resolved"] = describe(recursive_find_trainer_class_by_name(name))
except Exception as exc:
    result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
ours = importlib.import_module(OUR_TRAINERS)
result["ours"] = describe(getattr(ours, name)) if hasattr(ours, name) else None
print("GEODIAG_RESOLVED " + json.dumps(result))
"""


@dataclass
class Diagnosis:
    """What ``geodiag doctor`` found: facts to print, problems (empty when all is well), and the trainer lookup's
    result (``resolve_trainer``)."""

    facts: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    resolution: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def compared_settings(values: Mapping[str, object]) -> dict:
    """A trainer class's settings as doctor compares them: its class values (other than scalars, their repr), and
    the stabiliser and eps of its preset (None for a preset geodiag does not know)."""
    settings = {key: value if isinstance(value, (int, float, str, type(None))) else repr(value)
                for key, value in values.items()}
    settings["stabilizer"] = settings["eps"] = None
    preset = settings.get("geometric_preset")
    if isinstance(preset, str):
        from geodiag.losses.presets import PRESETS  # torch: not at import (``geodiag env`` imports this module)

        if preset in PRESETS:
            settings["stabilizer"], settings["eps"] = PRESETS[preset]["stabilizer"], PRESETS[preset]["eps"]
    return settings


def resolve_trainer(trainer: str, env: Mapping[str, str]) -> dict:
    """Which class ``nnUNetv2_train -tr trainer`` gets under ``env`` (``resolved``, or an ``error``), and geodiag's
    class of that name (``ours``, None if geodiag has none); ``lookup`` says how it was found.

    Read from the source, no module imported; where the source alone cannot say, nnU-Net's own lookup runs in a
    fresh interpreter with ``env`` (it imports every trainer module it passes).
    """
    try:
        return _resolve_from_source(trainer, env)
    except SourceUnclear as unclear:
        result = _resolve_by_import(trainer, env)
        result["lookup"] = f"nnU-Net's own, by importing (the source alone cannot say: {unclear})"
        return result


def _resolve_from_source(trainer: str, env: Mapping[str, str]) -> dict:
    def described(cls, with_settings: bool) -> dict:
        settings = compared_settings(class_settings(cls, CLASS_SETTINGS)) if with_settings else {}
        return {"module": cls.module.name, "file": str(cls.module.file), "settings": settings}

    ours = class_in_module(OUR_TRAINERS, trainer)
    result = {"lookup": LOOKUP_FROM_SOURCE, "ours": None if ours is None else described(ours, True)}
    found = find_trainer(trainer, env.get(EXT_TRAINER_VAR))
    if found is not None and not subclasses_nnunet_trainer(found):
        result["error"] = f"{trainer} in {found.module.file} does not subclass nnU-Net's {NNUNET_BASE_CLASS}"
    elif found is not None:
        result["resolved"] = described(found, ours is not None)
    return result  # neither: nnU-Net finds no such class, which doctor reports


def _resolve_by_import(trainer: str, env: Mapping[str, str]) -> dict:
    """nnU-Net's trainer lookup run in a fresh interpreter with ``env``."""
    proc = subprocess.run([sys.executable, "-c", _RESOLVE_SCRIPT, trainer], env=dict(env),
                          capture_output=True, text=True, timeout=300)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("GEODIAG_RESOLVED "):
            return json.loads(line[len("GEODIAG_RESOLVED "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise GeodiagError(f"the trainer lookup subprocess failed (exit {proc.returncode}): {tail}")


def diagnose(trainer: str = DEFAULT_TRAINER, env: Optional[Mapping[str, str]] = None) -> Diagnosis:
    """Check that ``nnUNetv2_train -tr <trainer>`` resolves to this geodiag's class with its settings."""
    env = dict(os.environ if env is None else env)
    diagnosis = Diagnosis()
    facts, problems = diagnosis.facts, diagnosis.problems
    for dist in ("geodiag", "nnunetv2", "torch"):
        facts[f"{dist} version"] = _version(dist)
    from ..instruments import kernels  # torch: not at import (``geodiag env`` imports this module)

    facts["CPU kernels"] = kernels.state()
    facts[EXT_TRAINER_VAR] = env.get(EXT_TRAINER_VAR, "(unset)")
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        facts[key] = env.get(key, "(unset)")

    searched = [p for p in env.get(EXT_TRAINER_VAR, "").split(os.pathsep) if p.strip()]
    if not searched:
        problems.append(f'{EXT_TRAINER_VAR} is unset: nnU-Net cannot see geodiag\'s trainers; run eval "$(geodiag env)"')
    else:
        missing = [str(f) for f in trainer_folders() if str(f) not in searched]
        if missing:
            problems.append(f"{EXT_TRAINER_VAR} lacks geodiag's trainer folder(s) {os.pathsep.join(missing)}; "
                            'run eval "$(geodiag env)"')

    result = diagnosis.resolution = resolve_trainer(trainer, env)
    facts["trainer lookup"] = result["lookup"]
    ours = result.get("ours")
    if ours is None:
        problems.append(f"geodiag has no trainer named {trainer}")
        return diagnosis
    facts["geodiag's trainer file"] = ours["file"]
    resolved = result.get("resolved")
    if resolved is None:
        problems.append(f"nnUNetv2_train -tr {trainer} would fail: {result.get('error', 'not found')}")
        return diagnosis
    facts["resolved trainer file"] = resolved["file"]
    for key in ("warmup_epochs", "geometric_preset", "stabilizer", "eps"):
        facts[f"resolved {key}"] = str(resolved["settings"].get(key))

    same_class = (resolved["module"] == ours["module"]
                  and os.path.realpath(resolved["file"]) == os.path.realpath(ours["file"]))
    if not same_class:
        problems.append(f"a stale copy shadows geodiag's {trainer}: nnUNetv2_train would use {resolved['file']} "
                        f"(module {resolved['module']}) instead of {ours['file']}")
    differing = [f"{key} {resolved['settings'].get(key)!r} (geodiag: {ours['settings'].get(key)!r})"
                 for key in COMPARED_SETTINGS if resolved["settings"].get(key) != ours["settings"].get(key)]
    if differing:
        problems.append("settings differ: " + ", ".join(differing))
    return diagnosis
