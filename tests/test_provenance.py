"""NonFiniteProvenance names the op that produced NaN/Inf (not one that passed it on), forward and backward; every test
with fp32 CPU outputs read by the compiled min/max kernel and by torch.aminmax (as on CUDA)."""
import math
import warnings

import pytest
import torch
from torch import nn

from geodiag.diagnostics.instruments import kernels
from geodiag.diagnostics.instruments.errors import GeodiagError
from geodiag.diagnostics.nonfinite.provenance import NonFiniteProvenance
from geodiag.losses import GeometricLoss

SYNC_MODES = ("step", "op")


@pytest.fixture(autouse=True, params=["kernel", "aminmax"])
def output_check(request, monkeypatch):
    if request.param == "aminmax":
        monkeypatch.setattr(kernels, "compiled", None)
    elif kernels.compiled is None:
        pytest.skip("the CPU kernels are not built here")
    return request.param


def disk(size: int, radius: float, centre: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    return (((yy - centre) ** 2 + (xx - centre) ** 2) <= radius ** 2).to(torch.float32)


def pixel_unit_first_moments(probs: torch.Tensor) -> torch.Tensor:
    """DELIBERATELY BROKEN (the seed's pattern): sum p * (y, x) by einsum in pixel units, [B, K, 2].

    Under autocast einsum runs in fp16, and for a 256^2 disk the sums reach ~2.6e6, far above fp16's 65504.
    """
    h, w = probs.shape[-2:]
    coords = torch.stack(torch.meshgrid(torch.arange(h, dtype=probs.dtype), torch.arange(w, dtype=probs.dtype),
                                        indexing="ij"))
    return torch.einsum("bkhw,chw->bkc", probs, coords)


@pytest.mark.parametrize("sync", SYNC_MODES)
def test_backward_sqrt_at_zero_blames_sqrt_not_the_mul_that_turns_its_inf_into_nan(sync):
    x = torch.zeros(3, requires_grad=True)
    with NonFiniteProvenance(sync=sync) as prov:
        torch.sqrt(x * x).sum().backward()
    report = prov.report()
    assert report is not None and report.produced
    assert report.phase == "backward"
    assert report.node == "SqrtBackward0"
    assert report.forward_op == "aten.sqrt.default"
    assert report.op == "aten.div.Tensor"  # grad / (2 * sqrt(x)) with sqrt(x) = 0: +Inf
    assert "torch.sqrt(x * x)" in report.source
    if sync == "op":
        assert (report.outputs[0].nan, report.outputs[0].posinf, report.outputs[0].neginf) == (0, 3, 0)
    assert torch.isnan(x.grad).all()  # the mul of MulBackward0 turned +Inf * 0 into NaN


def test_detect_anomaly_blames_mul_backward_for_the_same_sqrt():
    """Why this module exists: torch's anomaly mode names the node that first shows a NaN, not the producer."""
    x = torch.zeros(3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autograd.detect_anomaly():
            with pytest.raises(RuntimeError, match="MulBackward0"):
                torch.sqrt(x * x).sum().backward()


@pytest.mark.parametrize("sync", SYNC_MODES)
def test_fp16_overflow_of_pixel_unit_moments_under_autocast_blames_the_einsum(sync):
    probs = disk(256, 80.0, 128.0)[None, None]
    # Independent fp64 reference: sum p * y = area * centre, far above fp16's range.
    reference = pixel_unit_first_moments(probs.double())
    assert reference.abs().max() > 30 * torch.finfo(torch.float16).max
    with NonFiniteProvenance(sync=sync) as prov:
        with torch.autocast("cpu", dtype=torch.float16):
            moments = pixel_unit_first_moments(probs)
    report = prov.report()
    assert not torch.isfinite(moments).all()
    assert report is not None and report.produced and report.phase == "forward"
    assert report.op in ("aten.bmm.default", "aten.mm.default")  # what CPU autocast runs einsum as
    assert "torch.einsum" in report.source and "pixel_unit_first_moments" in report.source
    output = report.outputs[0]
    assert output.dtype == torch.float16
    assert all(i.dtype == torch.float16 for i in report.inputs)
    coords = [i for i in report.inputs if i.max_abs_finite is not None and i.max_abs_finite > 1]
    if sync == "op" or coords:
        assert max(i.max_abs_finite for i in report.inputs) == 255.0  # the largest pixel coordinate
    if sync == "op":
        assert output.posinf == 2 and output.nan == 0  # both (y, x) sums overflow
    assert "float16 max 6.55e+04" in report.message


@pytest.mark.parametrize("sync", SYNC_MODES)
def test_forward_log_of_zero_is_blamed_not_the_product_that_makes_it_nan(sync):
    with NonFiniteProvenance(sync=sync) as prov:
        x = torch.tensor([0.0, 1.0, 2.0])
        y = torch.log(x) * x  # log(0) = -Inf, then -Inf * 0 = NaN
    report = prov.report()
    assert torch.isnan(y[0])
    assert report.op == "aten.log.default" and report.phase == "forward"
    assert "torch.log(x) * x" in report.source
    if sync == "op":
        assert (report.outputs[0].nan, report.outputs[0].posinf, report.outputs[0].neginf) == (0, 0, 1)
        assert report.outputs[0].max_abs_finite == pytest.approx(math.log(2.0))


@pytest.mark.parametrize("numerator, counts", [(0.0, (1, 0, 0)), (1.0, (0, 1, 0)), (-1.0, (0, 0, 1))])
def test_division_by_zero_is_blamed_with_nan_and_signed_inf_counts(numerator, counts):
    with NonFiniteProvenance(sync="op") as prov:
        torch.tensor([numerator, 4.0]) / torch.tensor([0.0, 2.0])
    report = prov.report()
    assert report.op == "aten.div.Tensor"
    assert (report.outputs[0].nan, report.outputs[0].posinf, report.outputs[0].neginf) == counts


@pytest.mark.parametrize("sync", SYNC_MODES)
def test_whitelisted_masking_is_not_reported_but_a_later_producer_is(sync):
    scores = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.tensor([[False, True, False]])
    with NonFiniteProvenance(allow=["masked_fill"], sync=sync) as prov:
        weights = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        clean = prov.step_end()
        torch.log(weights)  # log(0) at the masked position: not intentional
        later = prov.step_end()
    assert torch.isfinite(weights).all()
    assert clean is None
    assert later.op == "aten.log.default" and later.step == 1


def test_masking_without_whitelist_is_reported():
    with NonFiniteProvenance() as prov:
        torch.tensor([1.0, 2.0]).masked_fill(torch.tensor([True, False]), float("-inf"))
    assert prov.report().op == "aten.masked_fill.Scalar"


@pytest.mark.parametrize("sync", SYNC_MODES)
@pytest.mark.parametrize("stabilizer, grad_reaches_input", [("clamp", False), ("additive", True)])
def test_unprotected_sqrt_in_geometric_loss_is_traced_to_compactness_sqrt_and_its_tap(
        sync, stabilizer, grad_reaches_input):
    target = disk(64, 14.0, 32.0)[None, None]
    foreground = disk(64, 12.0, 30.0)  # saturated binary prediction, not equal to the target
    probs = torch.stack([1 - foreground, foreground])[None].requires_grad_(True)
    loss = GeometricLoss(stabilizer=stabilizer, eps=0.0, aspect_weight=0.0)
    with NonFiniteProvenance(loss=loss, sync=sync) as prov:
        value = loss(probs, target.long())
        value.backward()
    report = prov.report()
    assert torch.isfinite(value)  # the forward is fine: sqrt(0) = 0
    # clamp(s, min=0)'s backward zeroes the gradient where s = 0, so its Inf never reaches the input: only a
    # per-op check sees it. sqrt(s + 0) lets it through (Inf * 0 = NaN in the backward of s = gx^2 + gy^2).
    assert bool(torch.isfinite(probs.grad).all()) != grad_reaches_input
    assert report.phase == "backward" and report.produced
    assert report.node == "SqrtBackward0" and report.forward_op == "aten.sqrt.default"
    assert report.tap == "compactness.sqrt_input"
    assert "GeometricLoss" in report.module
    assert "sqrt" in report.source


def test_clean_steps_give_no_report_and_a_failing_step_is_numbered():
    layer = nn.Linear(4, 2)
    with NonFiniteProvenance(model=layer) as prov:
        for _ in range(2):
            layer(torch.randn(3, 4)).square().mean().backward()
            assert prov.step_end() is None
        layer(torch.randn(3, 4)).log().sum().backward()  # log of negative outputs: NaN
        report = prov.step_end()
    assert report.step == 2 and report.op == "aten.log.default"
    assert report.module is None  # log runs after the module returned
    assert prov.report() is report


def test_nan_weight_from_outside_is_not_blamed_on_the_layer_that_reads_it():
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with NonFiniteProvenance(model=layer, sync="op") as prov:
        layer(torch.ones(1, 4))
    report = prov.report()
    assert not report.produced
    assert "Linear" in report.module
    assert any(i.origin.endswith("weight") and i.nan == 1 for i in report.inputs)


def test_module_path_is_reported_for_a_producer_inside_a_submodule():
    class Divide(nn.Module):
        def forward(self, x):
            return x / x.sum()

    model = nn.Sequential(nn.Identity(), Divide())
    with NonFiniteProvenance(model=model, sync="op") as prov:
        model(torch.tensor([1.0, -1.0]))
    assert prov.report().module == "Sequential.1 (Divide)"


def test_unknown_sync_mode_is_a_geodiag_error():
    with pytest.raises(GeodiagError, match="sync"):
        NonFiniteProvenance(sync="sometimes")


def test_a_recorded_step_keeps_no_per_op_objects_for_the_garbage_collector_beyond_its_weak_references(output_check):
    """Objects that live until step_end survive the collector's young generations and make it run full collections
    of the whole process a few steps later: per op only the weak reference to its output may stay tracked (the one
    to ``weight``, from outside the step, is shared by all ops) and, on the aminmax path, the two 0-d results."""
    import gc

    weight = torch.ones(8)
    value = torch.rand(8)
    ops = 2000
    with NonFiniteProvenance() as watch:
        value = value * weight              # the first op under a dispatch mode imports what torch loads lazily
        gc.collect()
        before = len(gc.get_objects())
        for _ in range(ops):
            value = value * weight          # one output, one input from this step, one from outside (weight)
        gc.collect()
        per_op = (len(gc.get_objects()) - before) / ops
        assert watch.step_end() is None
    assert per_op <= (1 if output_check == "kernel" else 3) + 0.01, per_op
