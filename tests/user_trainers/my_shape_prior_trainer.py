"""nnU-Net trainer with my compactness prior (Dice+CE + lambda * compactness), switched on after a warm-up.

Written the way a researcher writes one: a train_step override, host syncs to check the term, NaN masking, no
autocast, nnU-Net's clip at 12. Used by tests/test_watch.py through nnUNet_extTrainer; geodiag never imports it.
"""
import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

SOBEL_X = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]


def edge_magnitude(p):
    kx = torch.tensor(SOBEL_X, device=p.device, dtype=p.dtype).view(1, 1, 3, 3)
    ky = kx.transpose(2, 3)
    gx = F.conv2d(p, kx, padding=1)
    gy = F.conv2d(p, ky, padding=1)
    return torch.sqrt(gx ** 2 + gy ** 2)


def compactness_loss(probs, gt):
    # only look at the labelled object, the background should not count for the shape
    p = probs[:, 1:2] * (gt > 0).float()
    area = p.sum(dim=(2, 3))
    perimeter = edge_magnitude(p).sum(dim=(2, 3))
    compact = 4 * np.pi * area / (perimeter ** 2 + 1e-2)
    return (1 - compact.clamp(0, 1)).mean()


class nnUNetTrainerMyShapePrior(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1
        self.shape_weight = 0.1
        self.shape_start_epoch = 1

    def train_step(self, batch):
        data = batch["data"].to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        self.optimizer.zero_grad(set_to_none=True)

        output = self.network(data)
        loss = self.loss(output, target)
        if self.current_epoch >= self.shape_start_epoch:
            probs = torch.softmax(output[0], dim=1)
            shape = compactness_loss(probs, target[0])
            if torch.isnan(shape).item() or torch.isinf(shape).item():
                print("compactness is nan, skipping it for this batch")
                shape = output[0].sum() * 0
            loss = loss + self.shape_weight * shape
            self.print_to_log_file(f"shape term {shape.item():.4f}")

        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def perform_actual_validation(self, save_probabilities=False):
        print("skipping the final validation while I debug the prior")


class nnUNetTrainerMyShapePriorCompiled(nnUNetTrainerMyShapePrior):
    """The same, with the network compiled (nnU-Net compiles only on CUDA; this compiles on the CPU too)."""

    def initialize(self):
        super().initialize()
        self.network = torch.compile(self.network)
