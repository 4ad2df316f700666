"""GeometricLoss behaviour: gradients, stability on hard inputs and precisions, taps, batching, no host sync."""

import pytest
import torch

from geodiag.losses import STABILIZERS, GeometricLoss
from geodiag.diagnostics.instruments.host_sync import HostReadDetector
from shapes import disk, ellipse, logits_from, two_class

torch.manual_seed(0)


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("stabilizer", STABILIZERS)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("reference", ["target", "prior"])
def test_gradcheck_fp64(stabilizer, ndim, reference):
    gen = torch.Generator().manual_seed(1)
    shape = (2, 3, 9, 10) if ndim == 2 else (1, 2, 6, 7, 5)
    logits = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=gen).double()
    loss = GeometricLoss(classes=tuple(range(1, shape[1])), softmax=True, stabilizer=stabilizer, eps=1e-3,
                         reference=reference, min_area=2.0)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,), eps=1e-6, atol=1e-6)


def test_gradcheck_seed_aspect_formula():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn((2, 2, 12, 12), dtype=torch.float64, generator=gen, requires_grad=True)
    target = (torch.rand((2, 1, 12, 12), generator=gen) > 0.5).double()
    loss = GeometricLoss.from_preset("v2.3", softmax=True, min_area=2.0)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- stability
def _hard_inputs(n: int = 32) -> dict[str, torch.Tensor]:
    """Foreground masks that break naive implementations: [1, 1, n, n]."""
    single = torch.zeros(1, 1, n, n, dtype=torch.float64)
    single[..., n // 2, n // 2] = 1
    gen = torch.Generator().manual_seed(3)
    return {
        "empty": torch.zeros(1, 1, n, n, dtype=torch.float64),
        "full": torch.ones(1, 1, n, n, dtype=torch.float64),
        "single_pixel": single,
        "disk": disk(9, n=n, centre=(15.3, 16.1)),
        "uncertain": (0.5 + 0.05 * torch.randn(1, 1, n, n, generator=gen, dtype=torch.float64)),
    }


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SETTINGS = [dict(stabilizer=s, eps=e) for s in STABILIZERS for e in (1e-4, 1e-2)] + [
    dict(stabilizer="shifted", eps=1e-8), dict(preset="v2.3"), dict(preset="v2.4"), dict(preset="production")]


def _build(setting: dict) -> GeometricLoss:
    setting = dict(setting)
    preset = setting.pop("preset", None)
    if preset:
        return GeometricLoss.from_preset(preset, softmax=True)
    return GeometricLoss(softmax=True, **setting)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("saturation", [30.0, 2.0])
def test_loss_and_gradient_are_finite_on_hard_inputs(precision, setting, saturation):
    loss_fn = _build(setting)
    for name, fg in _hard_inputs().items():
        for target_fg in (fg, disk(9, n=32, centre=(15.3, 16.1))):
            logits = logits_from(fg, scale=saturation).float().requires_grad_(True)
            target = target_fg.round().float()
            with torch.autocast("cpu", dtype=PRECISIONS[precision], enabled=PRECISIONS[precision] is not None):
                value = loss_fn(logits, target)
            value.backward()
            assert torch.isfinite(value), (name, value)
            assert torch.isfinite(logits.grad).all(), name
            assert value.dtype == torch.float32


def test_geometric_terms_run_in_fp32_under_autocast():
    seen = {}
    loss_fn = GeometricLoss(softmax=True)
    loss_fn.register_tap(lambda name, t: seen.__setitem__(name, t.dtype))
    logits = logits_from(disk(9, n=32, centre=(15.3, 16.1)), 5.0).half()
    with torch.autocast("cpu", dtype=torch.float16):
        loss_fn(logits, torch.zeros(1, 1, 32, 32))
    assert set(seen.values()) == {torch.float32}


def test_empty_prediction_keeps_a_graph_and_a_finite_gradient():
    logits = logits_from(torch.zeros(1, 1, 32, 32), 30.0).requires_grad_(True)
    value = GeometricLoss(softmax=True, reference="prior")(logits)
    assert value.grad_fn is not None
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_unprotected_sqrt_is_kept_as_a_reproducible_failure():
    """additive with eps = 0 is a bare sqrt: at s = 0 exactly, 0 * inf = NaN in backward."""
    logits = logits_from(disk(9, n=32, centre=(15.3, 16.1)), 30.0).double().requires_grad_(True)
    GeometricLoss(softmax=True, reference="prior", stabilizer="additive", eps=0.0, aspect_weight=0)(logits).backward()
    assert torch.isnan(logits.grad).any()


def test_clamp_at_zero_masks_the_sqrt_pole():
    """clamp's backward is where(s > min, grad, 0): it drops sqrt's inf at s = 0 instead of multiplying it."""
    logits = logits_from(disk(9, n=32, centre=(15.3, 16.1)), 30.0).double().requires_grad_(True)
    GeometricLoss(softmax=True, reference="prior", stabilizer="clamp", eps=0.0, aspect_weight=0)(logits).backward()
    assert torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------- semantics
def test_perfect_prediction_against_its_own_target_costs_nothing():
    mask = ellipse(30, 12, n=96, centre=(48.2, 47.7))
    probs = two_class(mask)
    assert GeometricLoss()(probs, mask).item() == pytest.approx(0.0, abs=1e-12)


def test_prior_prefers_a_disk_to_an_ellipse_of_the_same_area():
    n = 96
    fn = GeometricLoss(reference="prior")
    round_ = fn(two_class(disk(20, n=n, centre=(48.2, 47.7))))
    elongated = fn(two_class(ellipse(40, 10, n=n, centre=(48.2, 47.7))))
    assert round_ < elongated


def test_absent_class_in_target_gets_no_geometric_term():
    probs = two_class(ellipse(30, 10, n=64, centre=(32.2, 31.7)))
    assert GeometricLoss()(probs, torch.zeros(1, 1, 64, 64, dtype=torch.float64)).item() == 0.0


def test_batch_result_equals_the_mean_of_single_image_results():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 3, 24, 24, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, (4, 1, 24, 24), generator=gen).double()
    fn = GeometricLoss(classes=(1, 2), softmax=True, min_area=2.0)
    singles = torch.stack([fn(logits[i:i + 1], target[i:i + 1]) for i in range(4)])
    assert fn(logits, target).item() == pytest.approx(singles.mean().item(), rel=1e-12)
    per_image = GeometricLoss(classes=(1, 2), softmax=True, min_area=2.0, reduction="none")(logits, target)
    assert per_image.shape == (4, 2)


def test_one_hot_and_label_map_targets_agree():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 20, 20, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 20, 20), generator=gen)
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).double()
    fn = GeometricLoss(classes=(1, 2), softmax=True, min_area=2.0)
    assert fn(logits, labels.double()).item() == pytest.approx(fn(logits, onehot).item(), rel=1e-12)


def test_presets_replay_the_seed_clamps():
    assert str(GeometricLoss.from_preset("v2.3").stabilizer) == "clamp(eps=0.0001)"
    assert str(GeometricLoss.from_preset("v2.4").stabilizer) == "clamp(eps=0.01)"
    assert GeometricLoss.from_preset("v2.4").aspect_formula == "seed"


def _settings(loss: GeometricLoss) -> tuple:
    return (loss.classes, loss.compactness_weight, loss.aspect_weight, loss.reference, loss.stabilizer,
            loss.aspect_formula, loss.sobel, loss.softmax, loss.min_area, loss.huber_beta, loss.reduction)


def test_constructor_defaults_are_the_production_preset():
    """A bare GeometricLoss() is what geodiag recommends, not the seed's V2.4 eps 1e-2."""
    assert _settings(GeometricLoss()) == _settings(GeometricLoss.from_preset("production"))
    assert GeometricLoss().stabilizer.eps == 1e-10


@pytest.mark.parametrize("preset,eps", [("v2.3", 1e-4), ("v2.4", 1e-2)])
def test_replay_presets_tap_the_seeds_s_in_the_seeds_units(preset, eps):
    """The seed's s: raw Sobel [-1 0 1; -2 0 2; -1 0 1] with zero padding (its F.conv2d(p, k, padding=1)),
    computed by an independent numpy fp64 implementation on one soft prediction, including its border."""
    import numpy as np

    from sobel_reference import sobel_squared_magnitude

    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 2, 40, 40, generator=gen, dtype=torch.float64) + 4 * (2 * disk(9, n=40) - 1).repeat(
        1, 2, 1, 1) * torch.tensor([-0.5, 0.5], dtype=torch.float64).view(1, 2, 1, 1)
    fn = GeometricLoss.from_preset(preset, softmax=True, reference="prior")
    seen = {}
    fn.register_tap(lambda name, t: seen.__setitem__(name, t.detach()),
                    names=("probabilities", "compactness.grad_mag_squared", "compactness.sqrt_input"))
    fn(logits)
    foreground = torch.softmax(logits, dim=1)[0, 1].numpy()
    expected = sobel_squared_magnitude(foreground, raw=True, padding="constant")
    np.testing.assert_allclose(seen["compactness.grad_mag_squared"][0, 0].numpy(), expected, rtol=1e-12, atol=1e-15)
    # the clamp acts on that s, at the seed's own threshold
    np.testing.assert_allclose(seen["compactness.sqrt_input"][0, 0].numpy(), np.maximum(expected, eps), rtol=1e-12)
    # and the normalised s of production is 1/64 of it away from the border (replicate vs zero padding there)
    production = GeometricLoss(softmax=True, reference="prior")
    production.register_tap(lambda name, t: seen.__setitem__("normalised", t.detach()),
                            names=("compactness.grad_mag_squared",))
    production(logits)
    np.testing.assert_allclose(64 * seen["normalised"][0, 0, 1:-1, 1:-1].numpy(), expected[1:-1, 1:-1], rtol=1e-12)


@pytest.mark.parametrize("preset", ["v2.3", "v2.4"])
def test_replay_presets_take_moments_in_pixel_coordinates_as_the_seed(preset):
    """The seed's aspect term: covariance of the soft mask in pixel coordinates (numpy, fp64, computed here)."""
    import numpy as np

    mask = ellipse(12, 5, n=40, centre=(19.3, 20.6), angle=0.4)
    seen = {}
    fn = GeometricLoss.from_preset(preset, classes=(0,), reference="prior", compactness_weight=0)
    fn.register_tap(lambda name, t: seen.__setitem__(name, t.detach()), names=("aspect.moments",))
    fn(mask)
    weights = mask[0, 0].numpy()
    ys, xs = np.indices(weights.shape, dtype=np.float64)
    expected = np.cov(np.stack([ys.ravel(), xs.ravel()]), aweights=weights.ravel(), bias=True)
    np.testing.assert_allclose(seen["aspect.moments"][0, 0].numpy(), expected, rtol=1e-10)


def test_seed_sobel_reads_a_constant_map_as_a_border_step():
    """Zero padding: a constant 0.5 map has s = 0 inside and a step to 0 at the border (the seed's arithmetic)."""
    seen = {}
    fn = GeometricLoss(classes=(0,), reference="prior", sobel="seed", aspect_weight=0)
    fn.register_tap(lambda name, t: seen.__setitem__(name, t.detach()), names=("compactness.grad_mag_squared",))
    fn(torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64))
    s = seen["compactness.grad_mag_squared"][0, 0]
    assert s[1:-1, 1:-1].abs().max().item() == 0.0
    # an edge pixel (not a corner): the derivative across the border is (0 - 0.5) * (1 + 2 + 1) = -2
    assert s[0, 5].item() == pytest.approx(4.0, rel=1e-12)


@pytest.mark.parametrize("kwargs,message", [
    (dict(stabilizer="sqrtish"), "unknown stabilizer"),
    (dict(eps=-1.0), "eps must be"),
    (dict(eps=float("nan")), "eps must be"),
    (dict(reference="square"), "unknown reference"),
    (dict(classes=()), "at least one"),
    (dict(sobel="raw"), "unknown sobel"),
])
def test_invalid_settings_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GeometricLoss(**kwargs)


def test_wrong_dimensionality_is_refused():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        GeometricLoss()(torch.rand(2, 2, 8), torch.zeros(2, 1, 8))


# ----------------------------------------------------------------------------- taps
def test_taps_see_every_intermediate_with_batch_and_class_dimensions():
    seen = {}
    fn = GeometricLoss(classes=(1, 2), softmax=True)
    with fn.register_tap(lambda name, t: seen.__setitem__(name, tuple(t.shape))):
        fn(torch.randn(3, 3, 16, 16), torch.randint(0, 3, (3, 1, 16, 16)).float())
    assert seen["compactness.grad_mag_squared"] == (3, 2, 16, 16)
    assert seen["area"] == seen["compactness"] == seen["aspect.term"] == (3, 2)
    assert seen["aspect.moments"] == (3, 2, 2, 2)
    assert seen["loss"] == ()
    assert not fn.has_taps


def test_tap_name_filter_and_unknown_names():
    fn = GeometricLoss(softmax=True)
    seen = []
    fn.register_tap(lambda name, t: seen.append(name), names=["perimeter"])
    fn(torch.randn(1, 2, 16, 16), torch.zeros(1, 1, 16, 16))
    assert seen == ["perimeter"]
    with pytest.raises(ValueError, match="unknown tap names"):
        fn.register_tap(lambda name, t: None, names=["grad_mag"])


def test_tapped_tensor_receives_its_backward_gradient():
    """The gradient reaching s equals dP/ds of the shifted sqrt: 1 / (2 sqrt(s + eps)) (times dL/dP)."""
    eps = 1e-3
    fn = GeometricLoss(classes=(0,), reference="prior", stabilizer="shifted", eps=eps, aspect_weight=0)
    grads = {}
    tensors = {}

    def tap(name, t):
        tensors[name] = t
        if name in ("compactness.grad_mag_squared", "perimeter"):
            t.register_hook(lambda g, n=name: grads.__setitem__(n, g))

    fn.register_tap(tap)
    fn(disk(10, n=40, centre=(20.2, 19.6)).requires_grad_(True)).backward()
    s = tensors["compactness.grad_mag_squared"].detach()
    expected = grads["perimeter"][0, 0] / (2 * torch.sqrt(s + eps))
    assert torch.allclose(grads["compactness.grad_mag_squared"], expected, rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------- no host sync
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("preset", ["production", "v2.3"])
def test_forward_and_backward_make_no_host_sync(ndim, preset):
    if preset == "v2.3" and ndim == 3:
        pytest.skip("the seed's aspect formula is 2D only")
    shape = (2, 2, 24, 24) if ndim == 2 else (2, 2, 12, 12, 12)
    logits = torch.randn(shape, requires_grad=True)
    target = torch.randint(0, 2, (shape[0], 1, *shape[2:])).float()
    fn = GeometricLoss.from_preset(preset, softmax=True)
    with HostReadDetector() as detector:
        fn(logits, target).backward()
    assert detector.seen == []


def test_sync_detector_catches_item():
    with HostReadDetector() as detector:
        torch.ones(3).sum().item()
    assert detector.seen == ["aten::_local_scalar_dense"]


@pytest.mark.parametrize("preset", ["production", "v2.3"])
def test_every_tapped_tensor_that_needs_grad_receives_its_gradient(preset):
    emitted, reached = set(), set()

    def tap(name, t):
        if t.requires_grad:
            emitted.add(name)
            t.register_hook(lambda g, n=name: reached.add(n))

    fn = GeometricLoss.from_preset(preset, softmax=True, reference="prior")
    fn.register_tap(tap)
    fn(torch.randn(2, 2, 20, 20, requires_grad=True)).backward()
    assert len(emitted) >= 10
    assert reached == emitted


@pytest.mark.parametrize("stabilizer", ["additive", "shifted"])
def test_seed_discriminant_rounding_below_zero_does_not_reach_the_sqrt(stabilizer):
    """An axis-aligned square has tr^2 - 4 det = 0 exactly; fp32 cancellation makes it -2 for this one
    (the two products of ~1e7 px^2 agree to fp32's 24 bits only). Below -eps, sqrt(disc + eps) would be NaN."""
    from shapes import square

    probs = square(180, n=256, centre=(128.0, 128.0)).float().requires_grad_(True)
    seen = {}
    fn = GeometricLoss(classes=(0,), reference="prior", compactness_weight=0, aspect_formula="seed",
                       stabilizer=stabilizer, eps=1e-4)
    fn.register_tap(lambda name, t: seen.__setitem__(name, t.detach()), names=["aspect.discriminant"])
    value = fn(probs)
    value.backward()
    assert seen["aspect.discriminant"].item() < -1e-4  # the hazard is real in fp32
    assert torch.isfinite(value) and torch.isfinite(probs.grad).all()
