"""Each loss term's gradient at a checkpoint, on training batches: what it sends to the logits and to the network,
and its share of the step's gradient (the norm clip_grad_norm_ sees before clipping), measured by the product's
own ``tools.loss_share`` (analyze-checkpoint's share table comes from the same code).

The batches come from a stock nnUNetTrainer built from the checkpoint (nnU-Net's own data loader and augmentation,
its deep-supervision Dice+CE), so they are what training fed the network; the geometric terms are the run's own
loss with one weight kept at a time: a user's loss through its SPEC (never imported from the checkpoint), geodiag's
from the run's recorded settings.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from ..tools import loss_share

Term = Callable[[list, list], torch.Tensor]  # (deep-supervision outputs, targets) -> weighted term value


def user_loss_terms(spec: str, weights: Mapping[str, str], samples: int) -> dict[str, Term]:
    """A user's loss (``--loss`` SPEC) split into its terms by their weight attributes (``loss_share.weight_terms``,
    as ``--term NAME=ATTRIBUTE`` splits it), each called on the softmax of the first ``samples`` full-resolution
    outputs."""
    from ..nonfinite.loss_spec import load_loss

    terms = loss_share.weight_terms(load_loss(spec), weights)
    return {name: (lambda outputs, targets, term=term: term(outputs[0][:samples], targets[0][:samples]))
            for name, term in terms.items()}


def geometric_loss_terms(settings: Mapping) -> dict[str, Term]:
    """geodiag's GeometricLoss as its trainer recorded it (geometric_settings.json), one weighted term at a time,
    on the full-resolution logits and target of every sample."""
    from geodiag.losses import GeometricLoss

    weights = dict(settings["weights"])
    terms = {}
    for term, weight in weights.items():
        loss = GeometricLoss.from_preset(
            settings["geometric_preset"], classes=tuple(settings["classes"]), softmax=True,
            reference=settings["reference"], stabilizer=settings["stabilizer"], eps=settings["eps"],
            aspect_formula=settings["aspect_formula"], sobel=settings["sobel"],
            compactness_weight=weight if term == "compactness" else 0.0,
            aspect_weight=weight if term == "aspect" else 0.0)
        terms[term] = lambda outputs, targets, loss=loss: loss(outputs[0], targets[0])
    return terms


def _trainer(checkpoint_path: Path, device: torch.device):
    """A stock nnUNetTrainer with the checkpoint's plans, configuration and weights, initialised (loss, loaders)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from ..nnunet.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    args = checkpoint.init_args
    plans = dict(args["plans"], continue_training=False)
    trainer = nnUNetTrainer(plans, args["configuration"], args["fold"], args["dataset_json"], device)
    trainer.initialize()
    trainer.network.load_state_dict(checkpoint.data["network_weights"])
    return trainer


def measure(checkpoint_path: Path, terms: Mapping[str, Term], batches: int, device: str = "cpu",
            seed: int = 0) -> list[dict]:
    """Rows (``TERM_GRADIENT_COLUMNS`` of reports/schema.py without run, dataset and checkpoint): per training
    batch, Dice+CE and each term (value, gradients, share). ``seed`` seeds the loader's numpy and python draws and
    torch's, so a study run again measures the same batches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    dev = torch.device(device)
    trainer = _trainer(checkpoint_path, dev)
    loader, _ = trainer.get_dataloaders()
    network = trainer.network.train()
    params = [p for p in network.parameters() if p.requires_grad]
    rows = []
    for index in range(batches):
        batch = next(loader)
        data = batch["data"].to(dev)
        target = [t.to(dev) for t in batch["target"]]
        outputs = network(data)
        values = {loss_share.DICE_CE: trainer.loss(outputs, target)}
        values.update({name: term(outputs, target) for name, term in terms.items()})
        shares = loss_share.gradient_shares(values, outputs[0], params, step=list(values))
        rows += [{"batch": index, "term": name, "value": row["value"],
                  "max_abs_grad_logits": row["max_abs_grad_logits"], "grad_norm_network": row["grad_norm_params"],
                  "share_of_step": row["share_params"], "norm_ratio": row["norm_ratio_params"],
                  "step_grad_norm": row["step_grad_norm_params"], "nonfinite_grad_logits": row["nonfinite_grad_logits"],
                  "nonfinite_grad_network": row["nonfinite_grad_params"]} for name, row in shares.items()]
    return rows
