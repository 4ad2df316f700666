"""Test-wide settings for a 2-core CPU machine: one thread, no OpenMP spinning, nnU-Net in process."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("nnUNet_def_n_proc", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from fixtures_nnunet import *  # noqa: E402,F401,F403 - session fixtures: nnunet_env, tiny_dataset_502, geometric_run, stock_run
