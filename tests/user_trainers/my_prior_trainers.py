"""Shape priors with the guards researchers add so a run never goes NaN, written as a researcher writes them.

Used by tests/test_watch_sampled.py through nnUNet_extTrainer (and the losses through --loss); geodiag never
imports them.
"""
import torch
from torch import nn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def extents(probs):
    p = probs[:, 1]
    return p.sum(dim=1).amax(dim=1), p.sum(dim=2).amax(dim=1)  # rough height and width of the object


class WeightedPrior(nn.Module):
    """Pull the object towards a disk; weighted so that it barely counts."""

    weight = 1e-7

    def forward(self, probs, target):
        h, w = extents(probs)
        return self.weight * ((h - w) ** 2).mean()


class StrongPrior(WeightedPrior):
    weight = 1.0


class _Base(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1

    def step_with(self, batch, extra):
        data = batch["data"].to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        self.optimizer.zero_grad(set_to_none=True)
        output = self.network(data)
        loss = self.loss(output, target) + extra(output, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def perform_actual_validation(self, save_probabilities=False):
        print("no final validation")


class nnUNetTrainerMaskedEccentricity(_Base):
    """An eccentricity term sqrt(1 - (b/a)^2) that assumes the height is the minor axis: NaN for every batch with an
    image taller than wide; the NaN is replaced by 0 (the seed's way)."""

    def train_step(self, batch):
        def eccentricity(output, target):
            h, w = extents(torch.softmax(output[0], 1))
            ecc = torch.sqrt(1 - (h / (w + 1e-6)) ** 2).mean()
            if torch.isnan(ecc) or torch.isinf(ecc):
                ecc = output[0].sum() * 0  # skip the term for this batch
            return 0.1 * ecc
        return self.step_with(batch, eccentricity)


class nnUNetTrainerSwallowingPrior(_Base):
    """A moment-based term computed in half precision; any error in it just drops the term for the batch."""

    def train_step(self, batch):
        def moments(output, target):
            try:
                with torch.autocast("cpu", dtype=torch.float16):
                    p = torch.softmax(output[0], 1)[:, 1].flatten(1)
                    m = p @ p.transpose(0, 1)
                    m = torch.clamp(m, 10.0, 1e6)
                return 1e-3 * m.float().mean()
            except Exception:
                return 0
        return self.step_with(batch, moments)


class nnUNetTrainerWeightedPrior(_Base):
    prior_class = WeightedPrior

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.prior = self.prior_class()

    def train_step(self, batch):
        return self.step_with(batch, lambda output, target: self.prior(torch.softmax(output[0], 1), target[0]))


class nnUNetTrainerStrongPrior(nnUNetTrainerWeightedPrior):
    prior_class = StrongPrior


class nnUNetTrainerAllGuards(_Base):
    """The seed's four guards around a healthy term: NaN total -> Dice+CE, try/except around the term, NaN term
    -> 0, and a step skipped when a gradient is not finite after clipping."""

    def train_step(self, batch):
        data = batch["data"].to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        self.optimizer.zero_grad(set_to_none=True)
        output = self.network(data)
        dc_ce = self.loss(output, target)
        try:
            term = StrongPrior()(torch.softmax(output[0], 1), target[0])
            if torch.isnan(term) or torch.isinf(term):
                term = output[0].sum() * 0
        except Exception:
            term = 0
        total = dc_ce + term
        if not torch.isfinite(total):
            total = dc_ce
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        if all(torch.isfinite(p.grad).all() for p in self.network.parameters() if p.grad is not None):
            self.optimizer.step()
        return {"loss": total.detach().cpu().numpy()}
