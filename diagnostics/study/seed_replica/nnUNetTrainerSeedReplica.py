"""UNSAFE replica of the seed's geometric loss and trainer (V2.3 / V2.4), kept only to replay the seed's design.

Do not train models with it. It is written the way the seed's author wrote theirs, not the way geodiag would:
pixel units, a raw Sobel kernel with zero padding, clamps everywhere, NaN/Inf masked to zero with `.item()` host
syncs, a `train_step` override without autocast. geodiag imports nothing from this file: its study treats it as
any user's code, found by nnU-Net through `nnUNet_extTrainer` pointing at this folder, and its loss read through
`--loss path/to/nnUNetTrainerSeedReplica.py:loss_v23` (or `loss_v24`).

Loss (per batch, on softmax probabilities of class 1, images with area < 50 dropped):
  compactness  1 - clamp(4*pi*A / (P^2 + 1e-2), 0, 1), P = sum sqrt(clamp(gx^2 + gy^2, min=eps)), A in [50, 1e6],
               P in [10, 1e6]
  aspect       central moments; sqrt(clamp(tr^2 - 4 det, min=eps, max=1e12)); lambda = (tr +- sqrt)/2 + 1e-2 in
               [0.1, 1e6]; r = lambda1/lambda2 in [0.1, 10]; |r - 1| / (r + 1)
  boundary     Laplacian clamped to +-10, masked where p > 0.1; variance + 0.1 * mean |.|
  total        0.1 compactness + 0.15 aspect + 0.05 boundary; eps 1e-4 (V2.3) or 1e-2 (V2.4)
Trainer: forward, Dice+CE (nnU-Net's deep supervision loss) plus the loss on the softmax of the first 4 samples of
the full-resolution output from epoch `warmup_epochs` (5) on, backward, clip_grad_norm_(params, 12),
optimizer.step(); batch size capped at 8.

Short runs: SEED_EPOCHS, SEED_ITERATIONS, SEED_WARMUP and SEED_SAVE_EVERY_EPOCH=1 (a checkpoint_epoch_XXXX.pth
after every epoch) in the environment.
"""
import math
import os
from os.path import join

import torch
import torch.nn as nn
import torch.nn.functional as F
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class GeometricLosses(nn.Module):
    def __init__(self, eps=1e-4, w_compactness=0.1, w_aspect=0.15, w_boundary=0.05, min_area=50.0):
        super().__init__()
        self.eps = eps
        self.w_compactness = w_compactness
        self.w_aspect = w_aspect
        self.w_boundary = w_boundary
        self.min_area = min_area
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("sobel_x", sobel_x.view(1, 1, 3, 3))
        self.register_buffer("sobel_y", sobel_x.t().contiguous().view(1, 1, 3, 3))
        laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("laplacian", laplacian.view(1, 1, 3, 3))
        self.last_terms = {}

    def compactness_loss(self, p):
        grad_x = F.conv2d(p, self.sobel_x.to(p.dtype), padding=1)
        grad_y = F.conv2d(p, self.sobel_y.to(p.dtype), padding=1)
        grad_mag_squared = grad_x ** 2 + grad_y ** 2
        grad_mag_squared = torch.clamp(grad_mag_squared, min=self.eps)
        grad_mag = torch.sqrt(grad_mag_squared)
        area = torch.clamp(p.sum(dim=(1, 2, 3)), 50.0, 1e6)
        perimeter = torch.clamp(grad_mag.sum(dim=(1, 2, 3)), 10.0, 1e6)
        circularity = torch.clamp(4 * math.pi * area / (perimeter ** 2 + 1e-2), 0.0, 1.0)
        return (1 - circularity).mean()

    def aspect_loss(self, p):
        b, _, h, w = p.shape
        ys = torch.arange(h, device=p.device, dtype=p.dtype).view(1, 1, h, 1)
        xs = torch.arange(w, device=p.device, dtype=p.dtype).view(1, 1, 1, w)
        area = torch.clamp(p.sum(dim=(1, 2, 3)), min=1.0)
        cx = (p * xs).sum(dim=(1, 2, 3)) / area
        cy = (p * ys).sum(dim=(1, 2, 3)) / area
        dx = xs - cx.view(b, 1, 1, 1)
        dy = ys - cy.view(b, 1, 1, 1)
        mu20 = torch.clamp((p * dx ** 2).sum(dim=(1, 2, 3)) / area, min=1e-3)
        mu02 = torch.clamp((p * dy ** 2).sum(dim=(1, 2, 3)) / area, min=1e-3)
        mu11 = (p * dx * dy).sum(dim=(1, 2, 3)) / area
        trace = mu20 + mu02
        det = mu20 * mu02 - mu11 ** 2
        discriminant = trace ** 2 - 4 * det
        discriminant = torch.clamp(discriminant, min=self.eps, max=1e12)
        sqrt_term = torch.sqrt(discriminant)
        lambda1 = torch.clamp((trace + sqrt_term) / 2 + 1e-2, 0.1, 1e6)
        lambda2 = torch.clamp((trace - sqrt_term) / 2 + 1e-2, 0.1, 1e6)
        ratio = torch.clamp(lambda1 / lambda2, 0.1, 10.0)
        return (torch.abs(ratio - 1) / (ratio + 1)).mean()

    def boundary_loss(self, p):
        lap = F.conv2d(p, self.laplacian.to(p.dtype), padding=1)
        lap = torch.clamp(lap, -10.0, 10.0)
        mask = (p > 0.1).float()
        lap = lap * mask
        return lap.var() + 0.1 * lap.abs().mean()

    def forward(self, probs, target=None):
        zero = probs.sum() * 0  # keeps the graph when a term is dropped
        p = probs[:, 1:2]
        area = p.sum(dim=(1, 2, 3))
        keep = area >= self.min_area
        if keep.sum().item() == 0:
            self.last_terms = {"compactness": 0.0, "aspect": 0.0, "boundary": 0.0}
            return zero
        p = p[keep]
        terms = {"compactness": self.compactness_loss(p), "aspect": self.aspect_loss(p),
                 "boundary": self.boundary_loss(p)}
        for name, value in terms.items():
            if torch.isnan(value).item() or torch.isinf(value).item():
                print(f"WARNING: {name} loss is NaN/Inf, replaced by 0")
                terms[name] = zero
        self.last_terms = {name: value.item() for name, value in terms.items()}
        return (self.w_compactness * terms["compactness"] + self.w_aspect * terms["aspect"]
                + self.w_boundary * terms["boundary"])


def loss_v23():
    return GeometricLosses(eps=1e-4)


def loss_v24():
    return GeometricLosses(eps=1e-2)


class nnUNetTrainerSeedReplica(nnUNetTrainer):
    geometric_eps = 1e-4
    warmup_epochs = 5
    geometric_samples = 4
    max_batch_size = 8
    save_every_epoch = False

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("SEED_EPOCHS", 100))
        self.num_iterations_per_epoch = int(os.environ.get("SEED_ITERATIONS", self.num_iterations_per_epoch))
        self.warmup_epochs = int(os.environ.get("SEED_WARMUP", self.warmup_epochs))
        self.save_every_epoch = os.environ.get("SEED_SAVE_EVERY_EPOCH", "0") == "1" or self.save_every_epoch
        if self.configuration_manager.batch_size > self.max_batch_size:
            self.configuration_manager.configuration["batch_size"] = self.max_batch_size
        self.geometric_loss = GeometricLosses(eps=self.geometric_eps).to(self.device)
        print(f"{type(self).__name__} initialised: eps {self.geometric_eps}, warm-up {self.warmup_epochs} epochs")

    def train_step(self, batch):
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)

        output = self.network(data)
        dc_ce = self.loss(output, target)
        loss = dc_ce
        geometric = None
        if self.current_epoch >= self.warmup_epochs:
            full_res = output[0] if isinstance(output, (list, tuple)) else output
            probs = torch.softmax(full_res[:self.geometric_samples], dim=1)
            geometric = self.geometric_loss(probs)
            loss = dc_ce + geometric

        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.optimizer.step()

        result = {"loss": loss.detach().cpu().numpy(), "dc_ce": dc_ce.detach().cpu().numpy()}
        if geometric is not None:
            result["geometric"] = geometric.detach().cpu().numpy()
            result.update(self.geometric_loss.last_terms)
        return result

    def on_epoch_end(self):
        epoch = self.current_epoch
        super().on_epoch_end()
        if self.save_every_epoch:
            # save_checkpoint writes current_epoch + 1 and super() has already counted this epoch
            self.current_epoch = epoch
            self.save_checkpoint(join(self.output_folder, f"checkpoint_epoch_{epoch:04d}.pth"))
            self.current_epoch = epoch + 1


class nnUNetTrainerSeedReplicaV23(nnUNetTrainerSeedReplica):
    geometric_eps = 1e-4


class nnUNetTrainerSeedReplicaV24(nnUNetTrainerSeedReplica):
    geometric_eps = 1e-2
