"""Each loss term's gradient at a checkpoint, on training batches: what it sends to the logits and to the network,
and its share of the step's gradient (the norm clip_grad_norm_ sees before clipping).

Why: a term whose clamp or units make its gradient a millionth of Dice+CE's is inert, one whose gradient dwarfs
it dominates the clipped step; neither shows in the loss values nnU-Net logs. The batches come from a stock
nnUNetTrainer built from the checkpoint (nnU-Net's own data loader and augmentation, its deep-supervision Dice+CE),
so they are what training fed the network; the geometric terms are the run's own loss with one weight kept at a
time: a user's loss through its SPEC (never imported from the checkpoint), geodiag's from the run's recorded
settings.
"""
from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

Term = Callable[[list, list], torch.Tensor]  # (deep-supervision outputs, targets) -> weighted term value


def user_loss_terms(spec: str, weights: Mapping[str, str], samples: int) -> dict[str, Term]:
    """A user's loss (``--loss`` SPEC) split into its terms: for each ``term: weight attribute`` a copy of the loss
    with the other weights set to 0, called on the softmax of the first ``samples`` full-resolution outputs."""
    from ..nonfinite.loss_spec import load_loss

    loss = load_loss(spec)
    terms = {}
    for term in weights:
        single = copy.deepcopy(loss)
        for other, attribute in weights.items():
            if other != term:
                setattr(single.fn, attribute, 0.0)
        terms[term] = lambda outputs, targets, single=single: single(outputs[0][:samples], targets[0][:samples])
    return terms


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
        values = {"dice_ce": trainer.loss(outputs, target)}
        values.update({name: term(outputs, target) for name, term in terms.items()})
        grads = {}
        for name, value in values.items():
            found = torch.autograd.grad(value, [outputs[0], *params], retain_graph=True, allow_unused=True)
            logits = found[0] if found[0] is not None else torch.zeros_like(outputs[0])
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                              for g, p in zip(found[1:], params)]).double()
            grads[name] = (value.detach(), logits.detach(), flat)
        step = sum(flat for _, _, flat in grads.values())
        step_norm = torch.linalg.vector_norm(step)
        for name, (value, logits, flat) in grads.items():
            norm = torch.linalg.vector_norm(flat)
            rows.append({"batch": index, "term": name, "value": float(value),
                         "max_abs_grad_logits": float(logits.abs().max()), "grad_norm_network": float(norm),
                         "share_of_step": float(torch.dot(flat, step) / step_norm ** 2),
                         "norm_ratio": float(norm / step_norm), "step_grad_norm": float(step_norm),
                         "nonfinite_grad_logits": int((~torch.isfinite(logits)).sum()),
                         "nonfinite_grad_network": int((~torch.isfinite(flat)).sum())})
    return rows

