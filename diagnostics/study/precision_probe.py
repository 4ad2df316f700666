"""Whether a user's loss runs at all in each precision, called as nnU-Net's train_step calls it under autocast.

Why: a loss written for fp32 can raise under fp16 autocast before producing any value (a ``clamp(max=1e6)`` on a
Half tensor cannot even convert its bound), and one such precision would abort an analysis or a sweep of every
other precision. The probe runs the loss forward and backward once per precision on a checkpoint's first case
(whole image, as nnU-Net predicts it) and names the exception and the line of the user's file that raised it, so
the study analyses the precisions that run and reports the others as findings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..instruments.devices import PRECISIONS


def probe(checkpoint_path: Path, loss_spec: str, precisions: Sequence[str], device: str = "cpu") -> list[dict]:
    """Rows (LOSS_PRECISION_COLUMNS of reports/schema.py without ``run``): per precision, whether the loss ran
    forward and backward, else why and where."""
    from ..nnunet.cases import find_cases, predict_logits, preprocess
    from ..nnunet.checkpoint import load_checkpoint
    from ..nonfinite.loss_spec import load_loss
    from ..tools.own_loss import LossRaised, raising_as_finding, trainer_call

    dev = torch.device(device)
    checkpoint = load_checkpoint(checkpoint_path)
    case = preprocess(checkpoint, find_cases(checkpoint)[0])
    network = checkpoint.network().to(dev)
    loss = load_loss(loss_spec)
    rows = []
    for precision in precisions:
        dtype = PRECISIONS[precision]
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = predict_logits(network, case.image, checkpoint.patch_size)
        leaf = logits.detach().requires_grad_(True)
        label = case.label[None].to(dev) if case.label is not None else None
        try:
            with raising_as_finding(unknown_site="the backward pass (autograd)"):
                trainer_call(loss, dtype, dev)(leaf, label).backward()
            rows.append({"precision": precision, "runs": True, "error": "", "site": ""})
        except LossRaised as raised:
            rows.append({"precision": precision, "runs": False, "error": raised.message, "site": raised.site})
    return rows
