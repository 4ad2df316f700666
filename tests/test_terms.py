"""The one term-name list: the loss's weighted terms, its taps, the trainer's log keys and the run table's columns
(which reports spell out, since they never import torch) all follow ``GEOMETRIC_TERMS``."""
import torch

from geodiag.losses import GEOMETRIC_TERMS, GeometricLoss
from geodiag.reports import schema


def test_the_run_tables_term_columns_are_the_losses_terms():
    """geodiag's terms in its order, then the seed replica's term geodiag's loss does not have (boundary)."""
    term_columns = [c for c in schema.RUN_COLUMNS if c.startswith("train_")
                    and c not in ("train_loss", "train_dc_ce", "train_geometric")]
    assert term_columns == [f"train_{term}" for term in GEOMETRIC_TERMS] + ["train_boundary"]


def test_each_term_has_a_weight_and_emits_its_tap():
    loss = GeometricLoss.from_preset("production", softmax=True, compactness_weight=0.5, aspect_weight=2.0)
    assert loss.term_weights() == dict(zip(GEOMETRIC_TERMS, (0.5, 2.0)))
    seen = []
    label = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    label[..., 8:24, 10:20] = 1
    with loss.register_tap(lambda name, t: seen.append(name), names=[f"{t}.term" for t in GEOMETRIC_TERMS]):
        loss(torch.randn(1, 2, 32, 32), label)
    assert seen == [f"{term}.term" for term in GEOMETRIC_TERMS]
