"""What watching costs: one nnU-Net training step (``nnUNetTrainer.train_step``, the tiny 2D configuration of a
planned dataset) plain, with watch's always-on recording, and with histograms every 16 iterations, side by side.

Run ``python -m geodiag.diagnostics.tools.watch_overhead DATASET_ID [CONFIGURATION]`` with nnU-Net's environment set.
Each variant is its own trainer built with the same seed, on the same fixed batch; timing is the measuring
XX
"""
from __future__ import annotations

import sys
import tempfile

import torch

from .bench_common import Clock, interleaved_medians
from ..nnunet.watch import Watch, WatchOptions

EVERY_NEVER = 10 ** 9  # always-on statistics only: histograms and the state scan at iteration 0 alone
# (name, watch's every or None for no watch). "plain, again" is a second unwatched trainer: the ratio of the two
# plain variants is the noise floor of the measurement on this machine.
VARIANTS = (("plain", None), ("plain, again", None), ("always-on", EVERY_NEVER), ("histograms every 16", 16))


def _trainer(dataset: str, configuration: str, folder: str):
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.manual_seed(0)
    trainer = get_trainer_from_args(dataset, configuration, 0, device=torch.device("cpu"))
    trainer.output_folder = folder
    trainer.log_file = f"{folder}/log.txt"
    trainer.initialize()
    return trainer


def _batch(trainer) -> dict:
    """Disks in noise at the configuration's patch size, with nnU-Net's deep-supervision targets."""
    generator = torch.Generator().manual_seed(0)
    h, w = trainer.configuration_manager.patch_size
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    label = (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) <= (h / 4) ** 2).float()[None, None]
    label = label.repeat(trainer.batch_size, 1, 1, 1)
    data = 2 * label + torch.randn(label.shape, generator=generator)
    targets = [label[..., ::round(1 / s[0]), ::round(1 / s[1])] for s in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": targets, "keys": [f"disk_{i}" for i in range(trainer.batch_size)]}


def measure(dataset: str, configuration: str, repeats: int = 11, inner: int = 16) -> dict[str, float]:
    """Median seconds per step of each variant, and the ratios to the plain step."""
    torch.set_num_threads(1)
    variants = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, every in VARIANTS:
            trainer = _trainer(dataset, configuration, f"{folder}/{name}")
            if every is not None:
                Watch(trainer, WatchOptions(every=every), progress=lambda message: None).attach().start()
            batch = _batch(trainer)
            variants[name] = lambda trainer=trainer, batch=batch: trainer.train_step(batch)
        times = interleaved_medians(variants, Clock(torch.device("cpu")), repeats, inner)
    return {**{f"{name} s": t for name, t in times.items()},
            **{f"{name} / plain": times[name] / times["plain"] for name in times if name != "plain"}}


if __name__ == "__main__":
    for key, value in measure(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "2d_tiny").items():
        print(f"{key:<32} {value:.4g}")
