"""Load any nnU-Net v2 checkpoint safely and rebuild its network from the plans it carries.

nnU-Net checkpoints fail ``torch.load(weights_only=True)`` because they hold numpy scalars (logged Dice values, the
EMA). They are loaded here with weights_only=True plus an allowlist of exactly those globals, so an untrusted
pickle never runs code; ``trust=True`` (``--trust-checkpoint``) opts out with a warning. Rebuilding the network
resolves class names read from the checkpoint's plans; nnU-Net resolves them with pydoc.locate, which imports any
module and follows any attribute, so plans from an untrusted file could name any importable callable
(``os.system``, or ``dynamic_network_architectures.architectures.unet.torch.hub.load`` behind an innocent prefix).
Here each name is resolved without leaving an allowlisted package and must denote an nn.Module subclass defined in
it; the classes nnU-Net looks up by bare name (reader, preprocessor, label manager, resampling) are type-checked.

A ``Checkpoint`` is built once per file and answers everything read from it: nnU-Net's plans manager, configuration
and label manager (each made once), the patch size, the foreground classes, the dataset id, the geodiag trainer class
it names (its recorded settings) and whether its geometric term was on, and the network on demand.
"""
from __future__ import annotations

import importlib
import pickle
import re
import types
import warnings
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..instruments.errors import ArgumentError, GeodiagError

CHECKPOINT_KEYS = ("network_weights", "init_args", "trainer_name")
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")
# The packages whose classes a checkpoint's plans may name: the network, and its layer types (conv, norm, ...).
NETWORK_PACKAGES = ("dynamic_network_architectures",)
LAYER_PACKAGES = ("torch.nn",)
# The first bytes of what torch.save writes: a zip archive (torch >= 1.6) or a bare pickle (the legacy format).
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def _numpy_globals() -> list:
    """The numpy globals nnU-Net's logging puts into a checkpoint (numpy 1.x and 2.x module names)."""
    core = getattr(np, "_core", None) or np.core
    dtype_classes = [type(np.dtype(code)) for code in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [core.multiarray.scalar, np.dtype, *dtype_classes]


@dataclass
class Checkpoint:
    """A loaded nnU-Net checkpoint and what it says about itself."""

    path: Path
    data: dict

    @property
    def trainer_name(self) -> str:
        return str(self.data["trainer_name"])

    @property
    def init_args(self) -> dict:
        return self.data["init_args"]

    @property
    def plans(self) -> dict:
        return self.init_args["plans"]

    @property
    def dataset_json(self) -> dict:
        return self.init_args["dataset_json"]

    @property
    def configuration(self) -> str:
        return str(self.init_args["configuration"])

    @property
    def fold(self):
        return self.init_args.get("fold")

    @property
    def epoch(self) -> Optional[int]:
        """The last finished epoch (nnU-Net stores current_epoch + 1)."""
        value = self.data.get("current_epoch")
        return None if value is None else int(value) - 1

    @cached_property
    def plans_manager(self):
        """nnU-Net's PlansManager of the checkpoint's plans."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans)

    @cached_property
    def configuration_manager(self):
        """nnU-Net's ConfigurationManager of the configuration the checkpoint was trained in."""
        return self.plans_manager.get_configuration(self.configuration)

    @cached_property
    def label_manager(self):
        return self.plans_manager.get_label_manager(self.dataset_json)

    @property
    def patch_size(self) -> list[int]:
        return [int(p) for p in self.configuration_manager.patch_size]

    @cached_property
    def foreground_classes(self) -> tuple[int, ...]:
        """The label values the geometric loss measures; region-based checkpoints have none it can use."""
        if self.label_manager.has_regions:
            raise GeodiagError("region-based checkpoints (nnU-Net 'regions') are not supported by the geometric loss")
        return tuple(int(c) for c in self.label_manager.foreground_labels)

    @property
    def trainer_class(self) -> Optional[type]:
        """The geodiag trainer class the checkpoint names (its class attributes are the recorded settings:
        preset, weights, warm-up, oversampling); None for a trainer geodiag does not define."""
        return geodiag_trainer(self.trainer_name)

    @property
    def dataset_id(self) -> Optional[int]:
        """The numeric id in the plans' dataset name (DatasetXXX_Name); None without one."""
        match = re.match(r"Dataset(\d+)", str(self.plans.get("dataset_name", "")))
        return int(match.group(1)) if match else None

    @property
    def geometric_active(self) -> Optional[bool]:
        """Whether the geometric term was on in the last epoch: what geodiag's trainers logged, else their class's
        warm-up; None for other trainers."""
        logged = self.data.get("logging", {}).get("geometric_active")
        if logged and self.epoch is not None and self.epoch < len(logged):
            return bool(logged[self.epoch])
        try:
            trainer = self.trainer_class
        except ImportError:
            return None
        warmup = getattr(trainer, "warmup_epochs", None)
        if warmup is None or self.epoch is None:
            return None
        return self.epoch >= warmup

    def network(self, trust: bool = False, inplace_nonlin: bool = False) -> nn.Module:
        """The checkpoint's network with its weights (see ``build_network``); built anew on each call."""
        return build_network(self, trust=trust, inplace_nonlin=inplace_nonlin)

    def untrained_network(self, seed: int) -> nn.Module:
        """The checkpoint's architecture as nnU-Net initialises it before any training step, with torch seeded by
        ``seed`` (the global generator is left as it was): what a run of these plans starts from."""
        return build_network(self, initial_seed=seed)


def geodiag_trainer(name: str) -> Optional[type]:
    """geodiag's nnU-Net trainer class of that name, or None."""
    from geodiag.losses.nnunet import trainer as nnunet_trainer

    return getattr(nnunet_trainer, name, None)


def load_checkpoint(path: str | Path, trust: bool = False) -> Checkpoint:
    """Load an nnU-Net checkpoint on the CPU; a one-line GeodiagError for anything that is not one."""
    path = Path(path)
    if not path.exists():
        raise GeodiagError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise GeodiagError(f"{path} is a folder, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise GeodiagError(f"checkpoint {path} is empty (0 bytes)")
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head.startswith(CHECKPOINT_MAGIC):
        raise GeodiagError(f"{path} is not a PyTorch checkpoint: it starts with {head!r}, not with a zip archive "
                           "or pickle header as torch.save writes")
    try:
        if trust:
            warnings.warn(f"loading {path} with weights_only=False: its pickle can run arbitrary code; "
                          "do this only for files you trust", stacklevel=2)
            data = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_numpy_globals()):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path, exc)
        if unsafe:
            raise ArgumentError(f"refusing to load {path}: its pickle calls globals outside geodiag's allowlist "
                               f"({', '.join(unsafe)}); pass {{trust}} only if you trust its source "
                               "(full pickle runs them)", "trust") from None
        raise GeodiagError(f"{path} is not a readable PyTorch checkpoint ({_pickle_problem(exc)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise GeodiagError(f"{path} is not a readable PyTorch checkpoint ({size} bytes; truncated or another "
                           f"format: {_first_line(exc)})") from None
    if not isinstance(data, dict) or any(key not in data for key in CHECKPOINT_KEYS):
        found = sorted(map(str, data))[:6] if isinstance(data, dict) else type(data).__name__
        raise GeodiagError(f"{path} is not an nnU-Net checkpoint: expected keys {', '.join(CHECKPOINT_KEYS)}, "
                           f"found {found}")
    checkpoint = Checkpoint(path=path, data=data)
    _check_structure(checkpoint)
    if not trust:
        check_plans_lookups(checkpoint)
    return checkpoint


def _check_structure(checkpoint: Checkpoint) -> None:
    """The parts of a checkpoint that geodiag reads, with the types it reads them as."""
    where = f"checkpoint {checkpoint.path}"
    if not hasattr(checkpoint.data["network_weights"], "items"):
        raise GeodiagError(f"{where}: 'network_weights' is not a state dict")
    init_args = checkpoint.data["init_args"]
    if not isinstance(init_args, dict):
        raise GeodiagError(f"{where}: 'init_args' is not a dict")
    for key, kind in (("plans", dict), ("dataset_json", dict), ("configuration", str)):
        if not isinstance(init_args.get(key), kind):
            raise GeodiagError(f"{where}: init_args[{key!r}] is missing or not a {kind.__name__}")
    configurations = checkpoint.plans.get("configurations")
    if not isinstance(configurations, dict) or checkpoint.configuration not in configurations:
        known = ", ".join(map(str, configurations)) if isinstance(configurations, dict) else "none"
        raise GeodiagError(f"{where}: configuration {checkpoint.configuration!r} is not in its plans "
                           f"(plans have: {known})")
    if not isinstance(checkpoint.dataset_json.get("labels"), dict):
        raise GeodiagError(f"{where}: its dataset.json has no 'labels'")


def _unsafe_globals(path: Path, exc: pickle.UnpicklingError) -> list[str]:
    """The non-allowlisted globals the pickle names: all of them for a zip checkpoint, else the first one torch
    reports in ``exc``."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_globals()}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - the legacy format is not supported there; fall back to torch's message
        found = re.findall(r"GLOBAL (\S+)", str(exc))
    return [g for g in found if g not in allowed]


def _pickle_problem(exc: pickle.UnpicklingError) -> str:
    """The specific line of torch's multi-paragraph weights_only message."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines()]
    specific = [line for line in lines if line and not line.startswith(boilerplate)]
    return (specific[0] if specific else _first_line(exc))[:200]


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's run on for several)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first.split(". ")[0][:200]


def find_checkpoints(path: str | Path, fold: Optional[str] = None) -> list[Path]:
    """A checkpoint file as given, or the checkpoints of a results folder (trainer folder or fold_X folder).

    In a trainer folder, ``fold`` picks fold_<fold> (default: every fold present). Within a fold, the final
    checkpoint is preferred, then best, then latest, then per-epoch checkpoints.
    """
    path = Path(path)
    if not path.exists():
        raise GeodiagError(f"not found: {path}")
    if path.is_file():
        return [path]
    if (path / "plans.json").exists() or any(path.glob("fold_*")):
        folds = sorted(path.glob(f"fold_{fold}" if fold is not None else "fold_*"))
        if not folds:
            raise GeodiagError(f"no fold_{fold if fold is not None else '*'} folder in {path}")
    elif path.name.startswith("fold_"):
        folds = [path]
    else:
        raise GeodiagError(f"{path} is neither a checkpoint nor an nnU-Net results folder "
                           "(expected plans.json and fold_* inside, or a fold_* folder)")
    found = []
    for folder in folds:
        named = [folder / name for name in CHECKPOINT_NAMES if (folder / name).exists()]
        found.append(named[0] if named else None)
        if not named:
            epochs = sorted(folder.glob("checkpoint_epoch_*.pth"))
            if not epochs:
                raise GeodiagError(f"no checkpoint in {folder}")
            found[-1] = epochs[-1]
    return found


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def resolve_plans_class(name: object, packages: tuple[str, ...], what: str) -> type:
    """The nn.Module subclass that a dotted name from a checkpoint's plans denotes, found without importing or
    following anything outside ``packages``: only modules inside them are imported, every attribute on the way must
    be such a module, no name part may be private, and the result must be an nn.Module subclass defined there."""
    def refuse(why: str) -> GeodiagError:
        return ArgumentError(f"refusing to build {what} {name!r} named in the checkpoint's plans: {why} "
                            "(use {trust} to override)", "trust")

    if not isinstance(name, str) or not _within(name, packages):
        raise refuse(f"only classes from {', '.join(p + '.*' for p in packages)} are allowed")
    parts = name.split(".")
    if any(not part.isidentifier() or part.startswith("_") for part in parts):
        raise refuse("it has an empty, invalid or private name part")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        if not _within(module_name, packages):
            break
        try:
            target: object = importlib.import_module(module_name)
        except ImportError:
            continue
        for attribute in parts[split:-1]:
            target = getattr(target, attribute, None)
            if not (isinstance(target, types.ModuleType) and _within(target.__name__, packages)):
                raise refuse(f"{attribute!r} leads outside {', '.join(packages)}")
        found = getattr(target, parts[-1], None)
        if not (isinstance(found, type) and issubclass(found, nn.Module) and _within(found.__module__, packages)):
            raise refuse(f"it is not an nn.Module class defined in {', '.join(packages)}")
        return found
    raise refuse("no such module")


def check_plans_lookups(checkpoint: Checkpoint) -> None:
    """Check what nnU-Net finds by the bare names in the plans before anything calls it.

    nnU-Net looks up its reader/writer, preprocessor, label manager and resampling functions with getattr on its own
    modules, so a crafted name can pick anything those modules import. Each must be what its role requires.
    """
    from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    def refuse(role: str, value: object) -> GeodiagError:
        return ArgumentError(f"refusing checkpoint {checkpoint.path}: its plans name {value!r} as the {role}, "
                            "which is not one nnU-Net provides (use {trust} to override)", "trust")

    try:
        plans = checkpoint.plans_manager
        config = checkpoint.configuration_manager
        roles = [("image reader/writer", checkpoint.plans.get("image_reader_writer"),
                  lambda: plans.image_reader_writer_class, BaseReaderWriter),
                 ("label manager", checkpoint.plans.get("label_manager"), lambda: plans.label_manager_class,
                  LabelManager),
                 ("preprocessor", config.configuration.get("preprocessor_name"), lambda: config.preprocessor_class,
                  DefaultPreprocessor)]
        for role, value, lookup, base in roles:
            found = lookup()
            if not (isinstance(found, type) and issubclass(found, base)):
                raise refuse(role, value)
        for key in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"):
            function = getattr(config, key).func
            if not (isinstance(function, types.FunctionType) and _within(function.__module__, ("nnunetv2",))):
                raise refuse(key, config.configuration.get(key))
    except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise GeodiagError(f"checkpoint {checkpoint.path} has unusable plans ({type(exc).__name__}: "
                           f"{_first_line(exc)})") from None


def build_network(checkpoint: Checkpoint, trust: bool = False, inplace_nonlin: bool = False,
                  initial_seed: Optional[int] = None) -> nn.Module:
    """The checkpoint's network with its weights, without deep supervision, in eval mode; with ``initial_seed``,
    nnU-Net's initialisation under that seed instead of the weights.

    Without ``trust`` every class name in the plans goes through ``resolve_plans_class`` before nnU-Net's
    pydoc.locate sees it. ``inplace_nonlin=False`` rebuilds LeakyReLU out of place (same weights) so tensor and
    module hooks see every activation; nnU-Net's in-place LeakyReLU breaks full backward hooks.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    try:
        plans_manager = checkpoint.plans_manager
        config = checkpoint.configuration_manager
        arch_class_name = config.network_arch_class_name
        arch_kwargs = dict(config.network_arch_init_kwargs)
        req_import = list(config.network_arch_init_kwargs_req_import)
    except (KeyError, TypeError, AssertionError, RuntimeError) as exc:
        raise GeodiagError(f"checkpoint {checkpoint.path} has no usable configuration "
                           f"{checkpoint.configuration!r} in its plans ({_first_line(exc)})") from None
    if not trust:
        resolve_plans_class(arch_class_name, NETWORK_PACKAGES, "network class")
        for key in req_import:
            if arch_kwargs.get(key) is not None:
                arch_kwargs[key] = resolve_plans_class(arch_kwargs[key], LAYER_PACKAGES, f"layer type ({key})")
        req_import = []  # resolved here; nnU-Net's pydoc.locate sees only the network class name checked above
    if not inplace_nonlin and isinstance(arch_kwargs.get("nonlin_kwargs"), dict):
        arch_kwargs["nonlin_kwargs"] = {**arch_kwargs["nonlin_kwargs"], "inplace": False}
    label_manager = checkpoint.label_manager
    with torch.random.fork_rng(devices=[]):
        if initial_seed is not None:
            torch.manual_seed(initial_seed)
        network = get_network_from_plans(
            arch_class_name, arch_kwargs, req_import,
            determine_num_input_channels(plans_manager, config, checkpoint.dataset_json),
            label_manager.num_segmentation_heads, allow_init=initial_seed is not None, deep_supervision=False)
    if initial_seed is not None:
        return network.eval()
    weights = {k[len("module."):] if k.startswith("module.") else k: v
               for k, v in checkpoint.data["network_weights"].items()}
    missing, unexpected = network.load_state_dict(weights, strict=False)
    # Deep-supervision heads of the lower resolutions are unused without deep supervision.
    unexpected = [k for k in unexpected if not k.startswith("decoder.seg_layers.")]
    if missing or unexpected:
        raise GeodiagError(f"checkpoint {checkpoint.path} weights do not fit the network its plans describe "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return network.eval()
