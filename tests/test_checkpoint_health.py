"""The health of a saved checkpoint: non-finite weights and momentum named and counted, the GradScaler's inverse
scale in fp32, shared tensors counted once, what is not a checkpoint refused."""
import math

import pytest
import torch
from torch import nn

from geodiag.diagnostics.instruments.checkpoint_health import checkpoint_health
from geodiag.diagnostics.instruments.errors import GeodiagError

FP32_MAX = torch.finfo(torch.float32).max


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(inplace=True), nn.Linear(8, 1))


def _train(steps: int, use_scaler: bool = True):
    """nnU-Net's step order: scale, backward, unscale_, clip_grad_norm_(12), step, update."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16) if use_scaler else None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 4)).square().mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return None, model, optimizer, scaler


def test_a_huge_finite_weight_is_not_reported_as_nonfinite():
    model = _model()
    with torch.no_grad():
        model[0].weight.fill_(1e30)  # its 2-norm overflows fp32; its max-abs norm does not
    assert checkpoint_health({"network_weights": model.state_dict()})["weights"]["nonfinite"] == {}


# ---------------------------------------------------------------------- checkpoints
def _scaler_state(scale: float) -> dict:
    """What GradScaler.state_dict() returns."""
    return {"scale": scale, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
            "_growth_tracker": 0}


def _checkpoint(model: nn.Module, optimizer, scaler_state) -> dict:
    return {"network_weights": model.state_dict(), "optimizer_state": optimizer.state_dict(),
            "grad_scaler_state": scaler_state, "current_epoch": 6, "trainer_name": "nnUNetTrainerGeometric"}


def test_checkpoint_health_counts_and_names_nonfinite_weights_and_momentum():
    _, model, optimizer, _ = _train(2, use_scaler=False)
    with torch.no_grad():
        model[2].weight[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
        optimizer.state[model[0].bias]["momentum_buffer"][5] = math.nan
    report = checkpoint_health(_checkpoint(model, optimizer, None))
    assert report["weights"]["nonfinite"] == {"2.weight": {"nan": 1, "inf": 2, "numel": 8}}
    assert report["weights"]["nonfinite_elements"] == 3
    assert report["optimizer"]["nonfinite"] == {"0.bias.momentum_buffer": {"nan": 1, "inf": 0, "numel": 8}}
    assert report["grad_scaler"] is None
    assert report["healthy"] is False


def test_checkpoint_health_of_a_clean_checkpoint_is_healthy():
    _, model, optimizer, scaler = _train(3)
    report = checkpoint_health(_checkpoint(model, optimizer, scaler.state_dict()))
    assert report["healthy"] is True
    assert report["grad_scaler"]["scale"] == 2.0 ** 16
    assert report["weights"]["elements"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scale, inverse_finite", [(2.9e-39, False), (3.0e-39, True), (65536.0, True)])
def test_checkpoint_health_checks_the_inverse_scale_in_fp32(scale, inverse_finite):
    assert (1 / scale <= FP32_MAX) == inverse_finite  # the reference, in fp64
    _, model, optimizer, _ = _train(1, use_scaler=False)
    report = checkpoint_health(_checkpoint(model, optimizer, _scaler_state(scale)))["grad_scaler"]
    assert report["inv_scale_finite"] is inverse_finite
    assert report["collapsed"] is (scale < 1.0)


def test_checkpoint_health_treats_an_empty_scaler_state_as_no_scaler():
    _, model, optimizer, _ = _train(1, use_scaler=False)
    assert checkpoint_health(_checkpoint(model, optimizer, {}))["grad_scaler"] is None


@pytest.mark.parametrize("bad", [[1, 2], {"weights": {}}, {"network_weights": 3}])
def test_checkpoint_health_rejects_what_is_not_a_checkpoint(bad):
    with pytest.raises(GeodiagError):
        checkpoint_health(bad)


def test_a_tensor_saved_under_several_names_is_counted_once():
    shared = torch.zeros(4)
    shared[0] = float("nan")
    report = checkpoint_health({"network_weights": {"encoder.w": shared, "decoder.encoder.w": shared,
                                                    "other": torch.ones(2)}})
    assert report["weights"]["nonfinite_elements"] == 1
    assert list(report["weights"]["nonfinite"]) == ["encoder.w"]
