"""The seed's shares of small s (28.3% below 1e-2, 0.3% below 1e-4) are compared in the seed's own units: s from
the raw Sobel kernel with zero padding, 64x geodiag's normalised s. The study measures them that way and the
study report words its comparison from the measured values only."""
from __future__ import annotations

import pandas as pd
import pytest

from geodiag.reports import study_report
from sobel_reference import sobel_squared_magnitude


def _small_s(shares: dict[int, dict[float, float]], units: str = "seed") -> pd.DataFrame:
    rows = [{"run": f"{dataset}-V23", "dataset": dataset, "epoch": 5, "case": f"case_{i}", "units": units,
             "eps": eps, "fraction_below": share * (1 + 0.01 * (i - 1)), "pixels": 16384}
            for dataset, by_eps in shares.items() for eps, share in by_eps.items() for i in range(3)]
    return pd.DataFrame(rows, columns=study_report.SWITCH_ON_S_COLUMNS)


def test_switch_on_section_states_the_seed_units_shares_and_words_them_from_the_values():
    frame = pd.concat([_small_s({501: {1e-4: 0.004, 1e-2: 0.30}, 502: {1e-4: 0.6, 1e-2: 0.95}}),
                       _small_s({501: {1e-4: 0.9, 1e-2: 0.99}, 502: {1e-4: 0.9, 1e-2: 0.99}}, units="normalised")])
    body = study_report.switch_on_section(frame).body
    assert "seed's units" in body and "zero padding" in body
    # medians of the seed-unit rows only (the normalised rows would read 99% / 90%)
    assert "Dataset 501: 0.4% below 0.0001 (within a factor of 2 of the seed's 0.3%); 30% below 0.01 (within" in body
    assert "Dataset 502: 60% below 0.0001 (200x more than the seed's 0.3%); 95% below 0.01 (3.36x more" in body
    assert "flatter" not in body and "99%" not in body


def test_switch_on_section_says_none_when_no_pixel_is_below():
    body = study_report.switch_on_section(_small_s({502: {1e-4: 0.0, 1e-2: 0.0}})).body
    assert "none, where the seed reports 0.3%" in body


def test_study_measures_the_shares_with_the_seeds_arithmetic(geometric_run):
    """small_s_shares on a real switch-on checkpoint against an independent numpy raw Sobel of the same
    whole-image prediction (fp64, zero padding), and the normalised shares against the /8, replicate-padded one."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from geodiag.diagnostics.nnunet.cases import find_cases, predict_logits, preprocess
    from geodiag.diagnostics.nnunet.checkpoint import build_network, load_checkpoint
    from geodiag.diagnostics.study.study import small_s_shares

    path = geometric_run.checkpoints[geometric_run.switch_on_epoch]
    rows = pd.DataFrame(small_s_shares(path, max_cases=1))
    checkpoint = load_checkpoint(path)
    case = preprocess(checkpoint, find_cases(checkpoint)[0])
    patch = PlansManager(checkpoint.plans).get_configuration(checkpoint.configuration).patch_size
    with torch.no_grad():
        logits = predict_logits(build_network(checkpoint), case.image, patch).double()
    foreground = torch.softmax(logits, dim=1)[0, 1].numpy()
    for units, raw, padding in (("seed", True, "constant"), ("normalised", False, "edge")):
        s = sobel_squared_magnitude(foreground, raw=raw, padding=padding)
        for eps in study_report.SEED_BELOW:
            measured = rows[(rows.units == units) & (rows.eps == eps)].fraction_below.item()
            # fp32 (measured) against fp64 (here): a pixel whose s sits within rounding of eps may fall either side
            assert measured == pytest.approx((s < eps).mean(), abs=3 / s.size), (units, eps)
    seed = rows[rows.units == "seed"].set_index("eps").fraction_below
    normalised = rows[rows.units == "normalised"].set_index("eps").fraction_below
    assert (seed <= normalised).all()  # the same threshold on a 64x larger s catches fewer pixels
