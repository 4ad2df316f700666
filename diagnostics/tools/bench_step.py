"""The workload the overhead benchmarks time: one nnU-Net 2D training step built from the trainer's own settings
(nnU-Net's ``configure_optimizers`` and ``_build_loss``, the clip value ``nnUNetTrainerGeometric`` trains with),
plus the production GeometricLoss on the full-resolution output, on a fixed synthetic batch of disks in noise.

The "lightest real" path: PlainConvUNet built directly (no plans, no data loader, no output folder), the
trainer's methods called on ``trainer_settings``, the few attributes of a trainer instance they read.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch
from torch import nn

from geodiag.losses import GeometricLoss

from .bench_common import Scale

# What nnUNetTrainer.__init__ sets on every instance (there, not on the class, so they cannot be read without
# building a trainer with its output folder and log file).
NNUNET_INITIAL_LR = 1e-2
NNUNET_WEIGHT_DECAY = 3e-5


def trainer_settings(network: nn.Module, pool_op_kernel_sizes: list) -> SimpleNamespace:
    """The attributes of a 2D label-training nnU-Net trainer that ``_build_loss`` and ``configure_optimizers`` read
    (batch Dice, no ignore label, deep supervision, no DDP, no compile)."""
    from geodiag.losses.nnunet.trainer import nnUNetTrainerGeometric

    settings = SimpleNamespace(
        network=network, initial_lr=NNUNET_INITIAL_LR, weight_decay=NNUNET_WEIGHT_DECAY, num_epochs=1000,
        enable_deep_supervision=True, is_ddp=False,
        label_manager=SimpleNamespace(has_regions=False, ignore_label=None),
        configuration_manager=SimpleNamespace(batch_dice=True, pool_op_kernel_sizes=pool_op_kernel_sizes))
    settings._do_i_compile = lambda: False
    settings._get_deep_supervision_scales = \
        lambda: nnUNetTrainerGeometric._get_deep_supervision_scales(settings)
    return settings


class NnUNetStep:
    """One nnU-Net 2D training step on a fixed synthetic batch (disks in noise)."""

    def __init__(self, scale: Scale, device: torch.device, geometric: bool = True) -> None:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
        from geodiag.losses.nnunet.trainer import CLIP_NORM, nnUNetTrainerGeometric

        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)  # the network's initial weights
        stages = len(scale.features)
        self.network = PlainConvUNet(
            1, stages, scale.features, nn.Conv2d, 3, [1] + [2] * (stages - 1), 2, num_classes=2,
            n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm2d,
            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
            deep_supervision=True).to(device)
        settings = trainer_settings(self.network, [[1, 1]] + [[2, 2]] * (stages - 1))
        self.dc_ce = nnUNetTrainerGeometric._build_loss(settings)
        self.optimizer, _ = nnUNetTrainerGeometric.configure_optimizers(settings)
        self.clip_norm = CLIP_NORM
        self.geometric = GeometricLoss.from_preset("production", softmax=True) if geometric else None
        size, batch = scale.step_size, scale.step_batch
        self.label = disk_labels(batch, (size, size), generator).to(device)
        self.image = (self.label.float() + 0.5 * torch.randn(self.label.shape, generator=generator)).to(device)
        self.targets = [self.label[:, :, ::2 ** i, ::2 ** i] for i in range(stages - 1)]

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.network(self.image)
        dc_ce = self.dc_ce(outputs, self.targets)
        total = dc_ce if self.geometric is None else dc_ce + self.geometric(outputs[0], self.label)
        total.backward()
        nn.utils.clip_grad_norm_(self.network.parameters(), self.clip_norm)
        self.optimizer.step()
        return total


def disk_labels(batch: int, spatial: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """[B, 1, *S] label maps, one disk (ball) of random centre and radius per image."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in spatial], indexing="ij")
    labels = []
    for _ in range(batch):
        centre = [n * (0.35 + 0.3 * float(torch.rand((), generator=generator))) for n in spatial]
        radius = min(spatial) * (0.15 + 0.15 * float(torch.rand((), generator=generator)))
        distance = sum((g - c) ** 2 for g, c in zip(grids, centre))
        labels.append((distance < radius ** 2).long())
    return torch.stack(labels)[:, None]


def soft_logits(label: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Two-class logits [B, 2, *S] that agree with ``label`` up to noise: an uncertain, realistic prediction."""
    foreground = (2.0 * label.float() - 1.0) * 3.0 + torch.randn(label.shape, generator=generator)
    return torch.cat([-foreground, foreground], dim=1)


def net_name(scale: Scale) -> str:
    return f"PlainConvUNet {len(scale.features)} stages {scale.features[0]}-{scale.features[-1]}"


def step_name(scale: Scale) -> str:
    return f"nnU-Net 2D step {scale.step_batch}x1x{scale.step_size}^2, {net_name(scale)}"
