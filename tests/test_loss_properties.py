"""Property: GeometricLoss gives a finite loss and finite gradients for any finite logits, in fp32, bf16 and fp16.

Random 2D and small 3D shapes, noise / blob / constant logits up to +-130 (saturated softmax), every
stabiliser with eps from 1e-8 to 1e-1, both aspect formulas, both references, logits or probabilities as
input, under CPU autocast. Derandomised so CI sees the same examples every run.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geodiag.losses import STABILIZERS, GeometricLoss

EXAMPLES_PER_PRECISION = 1200
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@st.composite
def problems(draw):
    """(GeometricLoss kwargs, logits [B, 2, *S] fp32, target label map [B, 1, *S])."""
    ndim = draw(st.sampled_from([2, 3]))
    side = st.integers(3, 40) if ndim == 2 else st.integers(3, 10)
    shape = (draw(st.integers(1, 2)), *[draw(side) for _ in range(ndim)])
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    scale = draw(st.sampled_from([0.0, 0.1, 1.0, 3.0, 30.0, 100.0]))
    offset = draw(st.floats(-30.0, 30.0))
    structure = draw(st.sampled_from(["noise", "blob", "constant"]))
    if structure == "noise":
        margin = offset + scale * torch.randn(shape, generator=generator)
    else:
        centre = torch.rand(ndim, generator=generator) * torch.tensor(shape[1:])
        radius = draw(st.floats(0.0, 20.0))
        grid = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape[1:]], indexing="ij")
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2
        blob = torch.where(inside, 1.0, -1.0).expand(shape) if structure == "blob" else torch.zeros(shape)
        margin = offset + scale * blob
    logits = torch.stack([torch.zeros(shape), margin], dim=1)
    target = (torch.rand(shape, generator=generator) < draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))).long()
    kwargs = dict(
        stabilizer=draw(st.sampled_from(STABILIZERS)),
        eps=10.0 ** draw(st.floats(-8.0, -1.0)),
        aspect_formula=draw(st.sampled_from(["anisotropy", "seed"])) if ndim == 2 else "anisotropy",
        reference=draw(st.sampled_from(["target", "prior"])),
        softmax=draw(st.booleans()),
    )
    return kwargs, logits, target.unsqueeze(1)


@pytest.mark.parametrize("precision", list(DTYPES))
@settings(max_examples=EXAMPLES_PER_PRECISION, deadline=None, derandomize=True)
@given(problem=problems())
def test_finite_logits_give_a_finite_loss_and_finite_gradients(precision, problem):
    kwargs, logits, target = problem
    dtype = DTYPES[precision]
    leaf = logits.clone().requires_grad_(True)
    autocast = contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)
    with autocast:
        network_output = leaf if dtype is None else leaf.to(dtype)  # a network's output dtype under autocast
        loss_input = network_output if kwargs["softmax"] else torch.softmax(network_output.float(), dim=1)
        loss = GeometricLoss(**kwargs)(loss_input, target)
    loss.backward()
    assert torch.isfinite(loss), (kwargs, loss)
    assert torch.isfinite(leaf.grad).all(), (kwargs, (~torch.isfinite(leaf.grad)).sum())
