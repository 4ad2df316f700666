"""Automatic taps and bound overrides on a loss written the researcher's way (tests/seed_style_loss.py).

References: line numbers are found in the loss file's text; at-bound fractions are recounted in numpy fp64 from
the same prediction; the override's reference is a copy of the loss file edited by text replacement.
"""
import math
import os

import numpy as np
import pytest
import torch

from geodiag.diagnostics.instruments.errors import GeodiagError
from geodiag.diagnostics.instruments.recorder import Recorder
from geodiag.diagnostics.nonfinite.autotaps import AutoTaps
from geodiag.diagnostics.tools.bench_autotaps import autotap_overhead
from geodiag.diagnostics.nonfinite.loss_spec import load_loss
from geodiag.diagnostics.nonfinite.override import BoundOverride
from geodiag.diagnostics.nonfinite.sites import exception_site
from geodiag.losses import GeometricLoss

LOSS_FILE = os.path.join(os.path.dirname(__file__), "seed_style_loss.py")
SIZE = 64


def line_of(snippet: str, path: str = LOSS_FILE) -> int:
    lines = [i for i, text in enumerate(open(path).read().splitlines(), start=1) if snippet in text]
    assert len(lines) == 1, (snippet, lines)
    return lines[0]


def site(snippet: str) -> str:
    return f"{os.path.relpath(LOSS_FILE)}:{line_of(snippet)}"


def two_shapes_logits() -> torch.Tensor:
    """Image 0: a 3 x 40 px bar (aspect ratio far above 10); image 1: a disc of radius 15. Two-class logits."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    bar = (np.abs(yy - 32) <= 1) & (np.abs(xx - 32) < 20)
    disc = (yy - 30) ** 2 + (xx - 34) ** 2 <= 15 ** 2
    logits = []
    for mask in (bar, disc):
        fg = np.where(mask, 4.0, -4.0)
        logits.append(np.stack([-fg, fg]))
    return torch.tensor(np.stack(logits), dtype=torch.float32)


def probabilities_np(logits: torch.Tensor) -> np.ndarray:
    x = logits.double().numpy()
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True))[:, 1]


def sobel_np(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw (gain 8) Sobel as a cross-correlation with zero padding, like F.conv2d(padding=1)."""
    kx = np.array([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]])
    padded = np.pad(p, 1)
    gx, gy = np.zeros_like(p), np.zeros_like(p)
    for i in range(3):
        for j in range(3):
            window = padded[i:i + p.shape[0], j:j + p.shape[1]]
            gx += kx[i, j] * window
            gy += kx.T[i, j] * window
    return gx, gy


def aspect_ratio_np(p: np.ndarray) -> float:
    """λ1/λ2 of the loss's aspect term (pixel units, its clamps), before the ratio clamp."""
    ys, xs = np.mgrid[:p.shape[0], :p.shape[1]].astype(np.float64)
    area = max(p.sum(), 1.0)
    cy, cx = (p * ys).sum() / area, (p * xs).sum() / area
    mu20 = max((p * (xs - cx) ** 2).sum() / area, 1e-3)
    mu02 = max((p * (ys - cy) ** 2).sum() / area, 1e-3)
    mu11 = (p * (xs - cx) * (ys - cy)).sum() / area
    tr, det = mu20 + mu02, mu20 * mu02 - mu11 ** 2
    disc = math.sqrt(min(max(tr ** 2 - 4 * det, 1e-4), 1e12))
    lam1 = min(max((tr + disc) / 2 + 1e-2, 0.1), 1e6)
    lam2 = min(max((tr - disc) / 2 + 1e-2, 0.1), 1e6)
    return lam1 / lam2


def tapped(loss, logits, **kwargs):
    taps = AutoTaps(**kwargs)
    leaf = logits.clone().requires_grad_(True)
    value = taps.run(loss, leaf, None)
    value.backward()
    return taps.result(), value, leaf.grad


@pytest.fixture(scope="module")
def v23():
    return load_loss(f"{LOSS_FILE}:loss_v23")


def test_sites_are_named_at_the_users_sqrt_and_clamp_lines(v23):
    result, value, _ = tapped(v23, two_shapes_logits())
    names = {(row["site"], row["op"]) for row in result.sites}
    sqrt_clamp = "torch.sqrt(torch.clamp(gx ** 2 + gy ** 2, min=self.eps))"
    assert (site(sqrt_clamp), "sqrt") in names
    assert (site(sqrt_clamp), "clamp") in names
    assert (site("disc = torch.sqrt("), "sqrt") in names
    for snippet in ("area = torch.clamp(p.sum(), 50, 1e6)", "perimeter = torch.clamp(grad_mag.sum(), 10, 1e6)",
                    "lap = torch.clamp(lap, -10, 10)", "r = torch.clamp(lam1 / lam2, 0.1, 10)"):
        assert (site(snippet), "clamp") in names, snippet
    sqrt_row = result.site(site(sqrt_clamp), "sqrt")
    assert sqrt_row["calls"] == 2 and sqrt_row["at_bound_fraction"] is None
    # the sqrt of a value clamped to >= 1e-4 has a local derivative of at most 1 / (2 sqrt(1e-4)) = 50
    assert 0 < sqrt_row["max_local_derivative"] <= 50.0 * (1 + 1e-5)
    assert sqrt_row["max_abs_grad"] > 0 and sqrt_row["nonfinite_forward"] == sqrt_row["nonfinite_backward"] == 0
    assert result.masked_nonfinite == []
    assert torch._C._len_torch_function_stack() == 0  # nothing stays attached after the call


def test_geodiags_own_instruments_on_the_losss_taps_add_no_site():
    """The recorder that analyze attaches to GeometricLoss's taps takes 0.5 * rsqrt(s) of each sqrt input inside
    the loss call; that arithmetic is geodiag's, so the sites are those of the loss alone (no rsqrt: the loss
    has none)."""
    loss = GeometricLoss.from_preset("v2.3", classes=(1,), softmax=True)
    target = (two_shapes_logits()[:, 1:] > 0).float()
    alone, _, _ = tapped(lambda x, _: loss(x, target), two_shapes_logits())
    recorder = Recorder()
    with recorder.attach_loss(loss):
        recorded, _, _ = tapped(lambda x, _: loss(x, target), two_shapes_logits())
    assert any(kind == "local_derivative" for _, kind in recorder.histograms())
    assert {(row["site"], row["op"]) for row in recorded.sites} == {(row["site"], row["op"]) for row in alone.sites}
    assert "rsqrt" not in {row["op"] for row in recorded.sites}


def test_at_bound_fractions_match_a_numpy_recount(v23):
    logits = two_shapes_logits()
    result, _, _ = tapped(v23, logits)
    p = probabilities_np(logits)
    # sqrt(clamp(gx^2 + gy^2, min=1e-4)): pixels raised to the bound
    g2 = np.concatenate([(lambda g: (g[0] ** 2 + g[1] ** 2).ravel())(sobel_np(img)) for img in p])
    below = int((g2 < 1e-4).sum())
    ambiguous = int((np.abs(g2 / 1e-4 - 1) < 1e-2).sum())  # fp32 rounding may put these on either side
    assert 0 < below < g2.size
    row = result.site(site("torch.sqrt(torch.clamp(gx ** 2 + gy ** 2, min=self.eps))"), "clamp")
    assert abs(row["at_min_fraction"] * g2.size - below) <= ambiguous
    assert row["at_max_fraction"] is None and row["bounds"] == [(1e-4, None)]
    # ratio clamp [0.1, 10]: the bar's ratio is far above 10, the disc's near 1
    ratios = [aspect_ratio_np(img) for img in p]
    assert ratios[0] > 10 and 0.1 < ratios[1] < 10
    row = result.site(site("r = torch.clamp(lam1 / lam2, 0.1, 10)"), "clamp")
    assert row["at_max_fraction"] == sum(r > 10 for r in ratios) / 2
    assert row["at_min_fraction"] == sum(r < 0.1 for r in ratios) / 2
    # Laplacian of probabilities in [0, 1] is bounded by 4: the +-10 clamp never binds
    assert result.site(site("lap = torch.clamp(lap, -10, 10)"), "clamp")["at_bound_fraction"] == 0.0


def test_an_intermediate_nan_hidden_by_the_guard_is_reported_as_masked(v23):
    """Logits fed as probabilities: one huge value makes (m * xs).sum() overflow, the centroid inf, det = inf - inf
    NaN; the aspect term's isnan guard swaps in pred.sum() * 0 and the loss stays finite."""
    taps = AutoTaps()
    prediction = torch.softmax(two_shapes_logits(), 1)
    prediction[1, 1, 30, SIZE - 1] = 1e37
    value = taps.run(v23.call, prediction.requires_grad_(True), None)
    assert torch.isfinite(value)
    value.backward()
    result = taps.result()
    masked = {(row["site"], row["op"]) for row in result.masked_nonfinite}
    assert (site("det = mu20 * mu02 - mu11 ** 2"), "sub") in masked
    assert (site("disc = torch.sqrt("), "sqrt") in masked
    assert result.site(site("disc = torch.sqrt("), "sqrt")["nonfinite_forward"] == 1
    assert all(row["calls"] >= 1 for row in result.masked_nonfinite)
    # by risk: the rows whose outputs went non-finite come before every row that stayed finite
    ranked = [row["nonfinite_forward"] > 0 for row in result.by_risk()]
    assert ranked[0] and ranked == sorted(ranked, reverse=True) and not all(ranked)


def test_host_syncs_are_counted_at_their_lines(v23):
    result, _, _ = tapped(v23, two_shapes_logits())
    syncs = {row["site"]: row["host_syncs"] for row in result.sites if row["host_syncs"]}
    assert syncs[site("if p.sum().item() < 50:")] == 2                 # once per image
    for term in ("c", "bd", "a"):                                       # isnan and isinf, per image
        assert syncs[site(f"if torch.isnan({term}).item() or torch.isinf({term}).item():")] == 4
    assert len(syncs) == 4


def test_override_of_one_clamp_equals_the_file_edited_by_hand(v23, tmp_path):
    snippet = "torch.sqrt(torch.clamp(gx ** 2 + gy ** 2, min=self.eps))"
    edited = tmp_path / "edited_by_hand.py"
    text = open(LOSS_FILE).read()
    edited.write_text(text.replace(snippet, snippet.replace("min=self.eps", "min=3e-3")))
    by_hand = load_loss(f"{edited}:loss_v23")
    logits = two_shapes_logits()

    def value_and_grad(loss, override=None):
        leaf = logits.clone().requires_grad_(True)
        if override is None:
            value = loss(leaf, None)
        else:
            with BoundOverride(override):
                value = loss(leaf, None)
        value.backward()
        return value.detach(), leaf.grad

    reference = value_and_grad(by_hand)
    original = value_and_grad(v23)
    overridden = value_and_grad(v23, {f"seed_style_loss.py:{line_of(snippet)}": 3e-3})
    assert not torch.equal(original[1], reference[1])  # the bound matters on this input
    assert torch.equal(overridden[0], reference[0]) and torch.equal(overridden[1], reference[1])
    # taps see the overridden bound when the override is entered inside the tapped call
    def overridden_loss(*args):
        with BoundOverride({site(snippet): 3e-3}):
            return v23(*args)

    taps = AutoTaps()
    taps.run(overridden_loss, logits, None)
    assert taps.result().site(site(snippet), "clamp")["bounds"] == [(3e-3, None)]


SQRT_PLUS_C = '''import torch


def edge_loss(pred):
    p = pred[:, 1]
    step = p[:, 1:, :] - p[:, :-1, :]
    return torch.sqrt(step ** 2 + 1e-8).mean()
'''


def test_override_of_the_constant_added_inside_a_sqrt(tmp_path):
    (tmp_path / "edge.py").write_text(SQRT_PLUS_C)
    (tmp_path / "edge_by_hand.py").write_text(SQRT_PLUS_C.replace("+ 1e-8", "+ 1e-3"))
    logits = two_shapes_logits()
    results = []
    for name, override in (("edge_by_hand", {}), ("edge", {f"edge.py:{line_of('sqrt', str(tmp_path / 'edge.py'))}":
                                                          1e-3}), ("edge", {})):
        loss = load_loss(f"{tmp_path / name}.py:edge_loss")
        leaf = logits.clone().requires_grad_(True)
        with BoundOverride(override):
            value = loss(leaf, None)
        value.backward()
        results.append((value.detach(), leaf.grad))
    (ref_value, ref_grad), (value, grad), (plain_value, _) = results
    assert torch.equal(value, ref_value) and torch.equal(grad, ref_grad)
    assert not torch.equal(plain_value, ref_value)


def test_a_site_matching_no_call_or_no_numeric_min_is_a_one_line_error(v23, tmp_path):
    with pytest.raises(GeodiagError) as error:
        with BoundOverride({"seed_style_loss.py:1": 1e-2}):
            v23(two_shapes_logits(), None)
    message = str(error.value)
    assert "\n" not in message and "seed_style_loss.py:1" in message
    assert f"seed_style_loss.py:{line_of('torch.sqrt(torch.clamp(gx ** 2 + gy ** 2')} (clamp min)" in message
    (tmp_path / "capped.py").write_text("def capped(pred):\n    return pred.clamp(max=0.9).sum()\n")
    capped = load_loss(f"{tmp_path / 'capped.py'}:capped")
    with pytest.raises(GeodiagError, match=r"capped.py:2: its clamp has no numeric min bound; sites found: .*capped"):
        with BoundOverride({"capped.py:2": 1e-2}):
            capped(two_shapes_logits(), None)


INPLACE_MASKING = '''import torch


def distance_loss(pred):
    p = pred[:, 1]
    d = torch.sqrt(p - 0.5)
    d[torch.isnan(d)] = 0.0
    return d.mean()
'''


def test_values_overwritten_in_place_later_are_counted_as_they_were(tmp_path):
    """The sqrt's NaNs are zeroed in place on the next line (a validation metric: no backward, which the in-place
    write would break): they still count, as non-finite and as masked."""
    path = tmp_path / "inplace.py"
    path.write_text(INPLACE_MASKING)
    loss = load_loss(f"{path}:distance_loss", input_kind="logits")
    prediction = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    taps = AutoTaps()
    value = taps.run(loss, prediction, None)
    result = taps.result()
    expected_nan = int((prediction[:, 1].double().numpy() < 0.5).sum())
    sqrt_site = f"{path}:{line_of('torch.sqrt', str(path))}"  # outside the working directory: absolute
    assert 0 < expected_nan < 128 and torch.isfinite(value)
    row = result.site(sqrt_site, "sqrt")
    assert row["nonfinite_forward"] == expected_nan
    assert {"site": sqrt_site, "op": "sqrt", "calls": 1} in result.masked_nonfinite
    mask_line = f"{path}:{line_of('d[torch.isnan(d)] = 0.0', str(path))}"
    assert result.site(mask_line, "boolean index")["host_syncs"] == 1


def test_autotap_overhead_times_both_variants_side_by_side():
    calls = []

    def counted(pred, target):
        calls.append(torch._C._len_torch_function_stack())
        return (pred[:, 1] ** 0.5).mean()

    figures = autotap_overhead(counted, torch.rand(1, 2, 8, 8), repeats=3)
    assert calls == [0, 1] * 4  # warm-up then three pairs, plain (no mode) and tapped (one mode) alternating
    assert figures["ratio"] == pytest.approx(figures["tapped_s"] / figures["plain_s"], rel=1e-12)
    assert figures["plain_s"] > 0


LOGGING_LOSS = '''import math

import torch


def logged_loss(pred):
    fg = pred[:, 1]
    if (fg > 0.99).any():
        fg = fg.clamp(max=0.99)
    area = float(fg.sum())
    stats = fg.mean(dim=(1, 2)).cpu().tolist()
    border = torch.nonzero(fg > 0.5)
    if math.isnan(area) or len(border) == 0:
        return pred.sum() * 0
    return (fg.sum() - area) + fg.mean() * len(stats)
'''


def test_each_kind_of_host_sync_is_counted_at_its_line(tmp_path):
    path = tmp_path / "logged.py"
    path.write_text(LOGGING_LOSS)
    taps = AutoTaps()
    prediction = torch.zeros(2, 2, 8, 8)
    prediction[:, 1, 2:6, 2:6] = 1.0
    taps.run(load_loss(f"{path}:logged_loss", input_kind="logits"), prediction, None)
    syncs = {(row["site"], row["op"]): row["host_syncs"] for row in taps.result().sites if row["host_syncs"]}
    at = lambda snippet: f"{path}:{line_of(snippet, str(path))}"  # noqa: E731
    assert syncs == {(at("if (fg > 0.99).any():"), "bool"): 1, (at("area = float(fg.sum())"), "float"): 1,
                     (at("stats = fg.mean"), "cpu"): 1, (at("stats = fg.mean"), "tolist"): 1,
                     (at("border = torch.nonzero"), "nonzero"): 1}


def test_a_loss_that_raises_is_named_by_the_users_line_and_leaves_nothing_attached(tmp_path):
    path = tmp_path / "only2d.py"
    path.write_text("import torch.nn.functional as F\n\n\ndef only2d(pred):\n"
                    "    weight = pred.new_ones(1, 1, 3, 3)\n"
                    "    return F.conv2d(pred[:, 1:], weight, padding=1).mean()\n")
    loss = load_loss(f"{path}:only2d")
    taps = AutoTaps()
    with pytest.raises(RuntimeError) as error:
        taps.run(loss, torch.zeros(1, 2, 4, 4, 4), None)  # a 3D case
    assert exception_site(error.value) == f"{path}:{line_of('F.conv2d', str(path))}"
    assert torch._C._len_torch_function_stack() == 0
    value = taps.run(loss, torch.zeros(1, 2, 4, 4), None)  # the next call is judged on its own outputs only
    assert torch.isfinite(value) and taps.result().masked_nonfinite == []
