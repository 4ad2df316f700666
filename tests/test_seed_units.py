"""The seed's shares of small s (28.3% below 1e-2, 0.3% below 1e-4) are compared in the seed's own units: s from
the raw Sobel kernel with zero padding, 64x geodiag's normalised s. The study measures them that way and the
study report's wording of them is pinned in test_seed_replica_report.py."""
from __future__ import annotations

import pandas as pd
import pytest

from geodiag.reports.seed import BELOW_AT_SWITCH_ON
from sobel_reference import sobel_squared_magnitude


def test_study_measures_the_shares_with_the_seeds_arithmetic(geometric_run):
    """s_statistics on a real switch-on checkpoint against an independent numpy raw Sobel of the same
    whole-image prediction (fp64, zero padding), and the normalised shares against the /8, replicate-padded one."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from geodiag.diagnostics.nnunet.cases import find_cases, predict_logits, preprocess
    from geodiag.diagnostics.nnunet.checkpoint import build_network, load_checkpoint
    from geodiag.diagnostics.study.measurements import s_statistics

    path = geometric_run.checkpoints[geometric_run.switch_on_epoch]
    checkpoint = load_checkpoint(path)
    shares, distribution = s_statistics(checkpoint, checkpoint.network(), max_cases=1)
    rows = pd.DataFrame(shares)
    case = preprocess(checkpoint, find_cases(checkpoint)[0])
    patch = PlansManager(checkpoint.plans).get_configuration(checkpoint.configuration).patch_size
    with torch.no_grad():
        logits = predict_logits(build_network(checkpoint), case.image, patch).double()
    foreground = torch.softmax(logits, dim=1)[0, 1].numpy()
    for units, raw, padding in (("seed", True, "constant"), ("normalised", False, "edge")):
        s = sobel_squared_magnitude(foreground, raw=raw, padding=padding)
        for eps in BELOW_AT_SWITCH_ON:
            measured = rows[(rows.units == units) & (rows.eps == eps)].fraction_below.item()
            # fp32 (measured) against fp64 (here): a pixel whose s sits within rounding of eps may fall either side
            assert measured == pytest.approx((s < eps).mean(), abs=3 / s.size), (units, eps)
            bins = pd.DataFrame(distribution).query("units == @units")
            assert bins["pixels"].sum() == s.size
            assert bins.loc[bins["upper"] <= eps, "pixels"].sum() / s.size == pytest.approx((s < eps).mean(),
                                                                                           abs=3 / s.size)
    seed = rows[rows.units == "seed"].set_index("eps").fraction_below
    normalised = rows[rows.units == "normalised"].set_index("eps").fraction_below
    assert (seed <= normalised).all()  # the same threshold on a 64x larger s catches fewer pixels
