"""Load any nnU-Net v2 checkpoint safely and rebuild its network from the plans it carries.

nnU-Net checkpoints fail ``torch.load(weights_only=True)`` because they hold numpy scalars (logged Dice values, the
EMA). They are loaded here with weights_only=True plus an allowlist of exactly those globals, so an untrusted
pickle never runs code; ``trust=True`` (``--trust-checkpoint``) opts out with a warning. Rebuilding the network
resolves class names read from the checkpoint's plans; those names are allowlisted too, since plans from an untrusted
file could otherwise name any importable callable.
"""
from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .errors import GeodiagError

CHECKPOINT_KEYS = ("network_weights", "init_args", "trainer_name")
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")
# Where rebuilt network classes and their layer types may come from.
NETWORK_MODULES = ("dynamic_network_architectures.",)
LAYER_MODULES = ("torch.nn.",)


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


def load_checkpoint(path: str | Path, trust: bool = False) -> Checkpoint:
    """Load an nnU-Net checkpoint on the CPU; a one-line GeodiagError for anything that is not one."""
    path = Path(path)
    if not path.exists():
        raise GeodiagError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise GeodiagError(f"{path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise GeodiagError(f"checkpoint {path} is empty (0 bytes)")
    try:
        if trust:
            warnings.warn(f"loading {path} with weights_only=False: its pickle can run arbitrary code; "
                          "do this only for files you trust", stacklevel=2)
            data = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_numpy_globals()):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "global" in str(exc).lower():
            unsafe = _unsafe_globals(path)
            raise GeodiagError(f"refusing to load {path}: it needs globals outside geodiag's allowlist "
                               f"({', '.join(unsafe) or 'unknown'}); pass --trust-checkpoint only if you trust "
                               "its source") from None
        raise GeodiagError(f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise GeodiagError(f"{path} is not a readable PyTorch checkpoint (truncated or another format: "
                           f"{_first_line(exc)})") from None
    if not isinstance(data, dict) or any(key not in data for key in CHECKPOINT_KEYS):
        found = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise GeodiagError(f"{path} is not an nnU-Net checkpoint: expected keys {', '.join(CHECKPOINT_KEYS)}, "
                           f"found {found}")
    return Checkpoint(path=path, data=data)


def _unsafe_globals(path: Path) -> list[str]:
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_globals()}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # noqa: BLE001 - only used to enrich an error message
        return []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


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


def _check_class_name(name: str, allowed_prefixes: tuple[str, ...], what: str) -> None:
    if not any(name.startswith(prefix) for prefix in allowed_prefixes):
        raise GeodiagError(f"refusing to build {what} {name!r} named in the checkpoint's plans: only "
                           f"{', '.join(allowed_prefixes)}* are allowed (use --trust-checkpoint to override)")


def build_network(checkpoint: Checkpoint, trust: bool = False, inplace_nonlin: bool = False) -> nn.Module:
    """The checkpoint's network with its weights, without deep supervision, in eval mode.

    ``inplace_nonlin=False`` rebuilds LeakyReLU out of place (same weights) so tensor and module hooks see every
    activation; nnU-Net's in-place LeakyReLU breaks full backward hooks.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        plans_manager = PlansManager(checkpoint.plans)
        config = plans_manager.get_configuration(checkpoint.configuration)
    except (KeyError, TypeError, AssertionError) as exc:
        raise GeodiagError(f"checkpoint {checkpoint.path} has no usable configuration "
                           f"{checkpoint.configuration!r} in its plans ({_first_line(exc)})") from None
    arch_kwargs = dict(config.network_arch_init_kwargs)
    if not trust:
        _check_class_name(config.network_arch_class_name, NETWORK_MODULES, "network class")
        for key in config.network_arch_init_kwargs_req_import:
            if arch_kwargs.get(key) is not None:
                _check_class_name(str(arch_kwargs[key]), LAYER_MODULES, f"layer type ({key})")
    if not inplace_nonlin and isinstance(arch_kwargs.get("nonlin_kwargs"), dict):
        arch_kwargs["nonlin_kwargs"] = {**arch_kwargs["nonlin_kwargs"], "inplace": False}
    label_manager = plans_manager.get_label_manager(checkpoint.dataset_json)
    network = get_network_from_plans(
        config.network_arch_class_name, arch_kwargs, config.network_arch_init_kwargs_req_import,
        determine_num_input_channels(plans_manager, config, checkpoint.dataset_json),
        label_manager.num_segmentation_heads, allow_init=False, deep_supervision=False)
    weights = {k[len("module."):] if k.startswith("module.") else k: v
               for k, v in checkpoint.data["network_weights"].items()}
    missing, unexpected = network.load_state_dict(weights, strict=False)
    # Deep-supervision heads of the lower resolutions are unused without deep supervision.
    unexpected = [k for k in unexpected if not k.startswith("decoder.seg_layers.")]
    if missing or unexpected:
        raise GeodiagError(f"checkpoint {checkpoint.path} weights do not fit the network its plans describe "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return network.eval()
