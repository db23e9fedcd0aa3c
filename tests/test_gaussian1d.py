"""Exact 1-D f-distill: gradient identity, Fig. 4a variances, mode-seeking fits (fdistill_paper.md section 12)."""

from __future__ import annotations

import math

import pytest

from fdistill_lab.divergences import PAPER_NAMES
from fdistill_lab.gaussian1d import exact as g

# d/dtheta D_f(N(1, 1.3^2) || N(theta, 0.8^2)) at theta = 0.2 (section 12)
REFERENCE_GRAD = {"rkl": -0.473373, "srkl": -0.214789, "js": -0.258584, "sh": -0.151438, "fkl": -1.25,
                  "jeffreys": -1.723373}


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_gradient_identity_matches_finite_differences_and_reference(name):
    p = g.gaussian(1.0, 1.3)
    est = g.fdistill_gradient(name, p, 0.2, 0.8)
    fd = g.finite_difference_gradient(name, p, 0.2, 0.8)
    assert est[0] == pytest.approx(fd[0], abs=1e-6)
    assert est[1] == pytest.approx(fd[1], abs=1e-6)
    assert est[0] == pytest.approx(REFERENCE_GRAD[name], abs=1e-6)


def test_gradient_identity_with_noise_level_and_mixture_teacher():
    p = g.bimodal(3.0, 0.7, 0.6)
    for name in ("js", "fkl"):
        est = g.fdistill_gradient(name, p, 0.4, 0.9, sigma=0.5)
        fd = g.finite_difference_gradient(name, p, 0.4, 0.9, sigma=0.5)
        assert est == pytest.approx(fd, abs=1e-6)


def test_normalizing_h_rescales_but_keeps_direction():
    p = g.gaussian(1.0, 1.3)
    raw = g.fdistill_gradient("js", p, 0.2, 0.8)
    norm = g.fdistill_gradient("js", p, 0.2, 0.8, normalize=True)
    assert raw[0] / norm[0] == pytest.approx(raw[1] / norm[1], rel=1e-9)
    assert g.fdistill_gradient("rkl", p, 0.2, 0.8, normalize=True) == pytest.approx(
        g.fdistill_gradient("rkl", p, 0.2, 0.8), rel=1e-6)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 3.0])
def test_normalized_variance_closed_forms(mu):
    assert g.normalized_variance("fkl", mu) == pytest.approx(math.exp(mu**2) - 1, rel=1e-4)
    assert g.normalized_variance("sh", mu) == pytest.approx(math.exp(mu**2 / 4) - 1, rel=1e-6)
    assert g.normalized_variance("rkl", mu) == pytest.approx(0.0, abs=1e-12)


def test_normalized_variance_order_at_mu2():
    v = {n: g.normalized_variance(n, 2.0) for n in PAPER_NAMES}
    assert v["js"] == pytest.approx(1.22, abs=0.01) and v["srkl"] == pytest.approx(0.103, abs=0.001)
    assert v["jeffreys"] == pytest.approx(13.4, abs=0.05)
    assert v["fkl"] > v["jeffreys"] > v["sh"] > v["js"] > v["srkl"] > v["rkl"]


def test_reverse_kl_locks_forward_kl_spreads():
    teacher = g.bimodal(4.0, 0.5)
    rkl = g.fit_gaussian("rkl", teacher, 1.0, 1.0, steps=150, lr=0.1, n=501)
    fkl = g.fit_gaussian("fkl", teacher, 1.0, 1.0, steps=150, lr=0.1, n=501)
    assert rkl.final == pytest.approx((2.0, 0.5), abs=0.01) and g.modes_kept(rkl, teacher) == 1
    assert fkl.final[1] == pytest.approx(math.sqrt(0.25 + 4.0), abs=0.02) and g.modes_kept(fkl, teacher) == 2
    assert rkl.mean.shape == (151,) and rkl.final_value >= 0


def test_forward_kl_matches_moments_of_imbalanced_teacher():
    teacher = g.bimodal(4.0, 0.8)
    fit = g.fit_gaussian("fkl", teacher, 1.0, 1.0, steps=200, lr=0.1, n=501)
    mean = 0.8 * -2 + 0.2 * 2
    std = math.sqrt(0.25 + 4.0 - mean**2)
    assert fit.final == pytest.approx((mean, std), abs=0.02)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="weight of the left mode"):
        g.bimodal(4.0, 1.0)
    with pytest.raises(ValueError, match="std must be > 0"):
        g.gaussian(0.0, 0.0)
    with pytest.raises(ValueError, match="unknown divergence 'nope'"):
        g.fdistill_gradient("nope", g.gaussian(0, 1), 0.0, 1.0)
    with pytest.raises(ValueError, match="lr > 0"):
        g.fit_gaussian("js", g.bimodal(), steps=10, lr=0.0)
    with pytest.raises(ValueError, match="sigmas"):
        g.fit_gaussian("js", g.bimodal(), steps=10, sigmas=())
    # a ratio beyond float64 (very narrow student) is reported, not clipped
    with pytest.raises(FloatingPointError, match="not finite"):
        g.divergence_value("pearson", g.gaussian(0.0, 1.0), g.gaussian(0.0, 0.1))
