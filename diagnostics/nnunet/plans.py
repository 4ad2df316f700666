"""nnU-Net planning for small CPU runs: plan+preprocess a dataset and add a tiny ``2d_tiny`` configuration.

``2d_tiny`` inherits from ``2d`` (so it shares its ``data_identifier`` and reuses the 2d preprocessed data:
nothing to preprocess again) and replaces the whole ``architecture`` dict, because nnU-Net's inheritance is a
shallow update of the configuration's keys.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from .environment import NnunetDirs, nnunet_env
from ..instruments.errors import GeodiagError

PLANS_NAME = "nnUNetPlans"
TINY_CONFIGURATION = "2d_tiny"
# Per-stage lists of PlainConvUNet's arch_kwargs that are cut to the first n stages (the decoder has n - 1).
_STAGE_KEYS = ("kernel_sizes", "strides", "n_conv_per_stage")


def tiny_architecture(architecture: dict, n_stages: int = 4, base_features: int = 8,
                      max_features: int = 64) -> dict:
    """A copy of a planned PlainConvUNet ``architecture`` cut to its first ``n_stages`` stages.

    Features double per stage from ``base_features`` up to ``max_features``. Keeping the first stages' strides
    keeps the patch size divisible by the total downsampling.
    """
    tiny = copy.deepcopy(architecture)
    kwargs = tiny["arch_kwargs"]
    n_stages = min(n_stages, int(kwargs["n_stages"]))
    if n_stages < 2:
        raise GeodiagError(f"a U-Net needs at least 2 stages, got {n_stages}")
    kwargs["n_stages"] = n_stages
    kwargs["features_per_stage"] = [min(base_features * 2 ** i, max_features) for i in range(n_stages)]
    for key in _STAGE_KEYS:
        kwargs[key] = list(kwargs[key][:n_stages])
    kwargs["n_conv_per_stage_decoder"] = list(kwargs["n_conv_per_stage_decoder"][:n_stages - 1])
    return tiny


def tiny_configuration(plans: dict, parent: str = "2d", n_stages: int = 4, base_features: int = 8,
                       max_features: int = 64, patch_size: Optional[Sequence[int]] = None) -> dict:
    """A configuration inheriting from ``parent`` of ``plans`` with a tiny architecture and, if given, its own
    patch size (which must stay divisible by the kept stages' total stride)."""
    configurations = plans["configurations"]
    if parent not in configurations:
        raise GeodiagError(f"the plans have no configuration {parent!r} to inherit from")
    if "architecture" not in configurations[parent]:
        raise GeodiagError(f"configuration {parent!r} has no architecture of its own")
    configuration = {
        "inherits_from": parent,
        "architecture": tiny_architecture(configurations[parent]["architecture"], n_stages, base_features,
                                          max_features),
    }
    if patch_size is not None:
        configuration["patch_size"] = [int(p) for p in patch_size]
    return configuration


def add_tiny_configuration(plans_file: str | Path, name: str = TINY_CONFIGURATION, parent: str = "2d",
                           n_stages: int = 4, base_features: int = 8, max_features: int = 64,
                           patch_size: Optional[Sequence[int]] = None) -> dict:
    """Add (or replace) configuration ``name`` (see ``tiny_configuration``) in a plans file; returns it."""
    plans_file = Path(plans_file)
    if not plans_file.is_file():
        raise GeodiagError(f"no plans file at {plans_file}; run planning first")
    plans = json.loads(plans_file.read_text())
    configuration = tiny_configuration(plans, parent, n_stages, base_features, max_features, patch_size)
    plans["configurations"][name] = configuration
    plans_file.write_text(json.dumps(plans, indent=4) + "\n")
    return configuration


def dataset_folder_name(dataset_id: int, dirs: NnunetDirs) -> str:
    """``DatasetXXX_Name`` of a raw dataset id."""
    matches = sorted(p.name for p in dirs.raw.glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir())
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(matches)
        raise GeodiagError(f"expected one raw dataset {int(dataset_id):03d} in {dirs.raw}, found {found}")
    return matches[0]


def plans_file(dataset_id: int, dirs: NnunetDirs) -> Path:
    return dirs.preprocessed / dataset_folder_name(dataset_id, dirs) / f"{PLANS_NAME}.json"


def nnunet_tool(name: str) -> str:
    """An nnU-Net console script, preferring the one installed beside this interpreter."""
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if path is None:
        raise GeodiagError(f"{name} not found; is nnunetv2 installed in this environment?")
    return path


def plan_and_preprocess(dataset_id: int, dirs: NnunetDirs, tiny: bool = True, log_file: Optional[Path] = None,
                        configuration: str = "2d") -> Path:
    """Run ``nnUNetv2_plan_and_preprocess -d ID -c CONFIGURATION -np 1 -npfp 1`` and, for 2d, add ``2d_tiny``;
    returns the plans file.

    nnUNet_n_proc_DA=0 (in-process augmentation for training) makes planning crash (torch.set_num_threads(0)
    in its VRAM estimate), so the planning subprocess gets 1.
    """
    dataset_folder_name(dataset_id, dirs)
    dirs.create()
    log_file = log_file or dirs.preprocessed / f"plan_and_preprocess_{int(dataset_id):03d}.log"
    command = [nnunet_tool("nnUNetv2_plan_and_preprocess"), "-d", str(int(dataset_id)), "-c", configuration,
               "-np", "1", "-npfp", "1"]
    with open(log_file, "w") as log:
        code = subprocess.run(command, env=nnunet_env(dirs, nnUNet_n_proc_DA="1"), stdout=log,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise GeodiagError(f"nnUNetv2_plan_and_preprocess failed (exit {code}); see {log_file}")
    plans = plans_file(dataset_id, dirs)
    if tiny and configuration == "2d":
        add_tiny_configuration(plans)
    return plans
