"""Trainers with the guards researchers add so training "never goes NaN": written as a researcher writes them.

Used by tests/test_watch.py through nnUNet_extTrainer; geodiag never imports them.
"""
import torch
import torch.nn.functional as F
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def boundary_term(probs):
    # edge strength of the foreground map; exactly flat regions give sqrt(0)
    p = probs[:, 1:2]
    gx = F.pad(p[:, :, :, 1:] - p[:, :, :, :-1], (0, 1, 0, 0))
    gy = F.pad(p[:, :, 1:, :] - p[:, :, :-1, :], (0, 0, 0, 1))
    flat = (p > 0.5).float()  # hard mask: its gradient magnitude is exactly 0 almost everywhere
    return torch.sqrt((gx * flat) ** 2 + (gy * flat) ** 2).mean()


class nnUNetTrainerGuardBeforeClip(nnUNetTrainer):
    """From iteration 2 on, a boundary term is added; a bad gradient makes the step return before clip and step."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1
        self.it = 0

    def train_step(self, batch):
        data = batch["data"].to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        self.optimizer.zero_grad(set_to_none=True)
        output = self.network(data)
        loss = self.loss(output, target)
        if self.it >= 2:
            loss = loss + 0.01 * boundary_term(torch.softmax(output[0], 1))
        self.it += 1
        loss.backward()
        # my NaN guard: never let a bad gradient touch the weights
        for p in self.network.parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                self.optimizer.zero_grad(set_to_none=True)
                return {"loss": loss.detach().cpu().numpy()}
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def perform_actual_validation(self, save_probabilities=False):
        print("no final validation")


class nnUNetTrainerEveryOtherStep(nnUNetTrainer):
    """Steps the optimizer only on odd iterations (accumulating over two batches); nothing is ever non-finite."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 1
        self.it = 0

    def train_step(self, batch):
        data = batch["data"].to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        if self.it % 2 == 0:
            self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.network(data), target) / 2
        loss.backward()
        self.it += 1
        if self.it % 2 == 0:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def perform_actual_validation(self, save_probabilities=False):
        print("no final validation")
