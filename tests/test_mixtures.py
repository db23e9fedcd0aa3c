"""Analytic Gaussian-mixture teachers: density, score and sampling at any noise level."""

import math

import pytest
import torch

from fdistill_lab.mixtures import GaussianMixture, ring, unequal_weights


def _mixture(dim=3, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g, dtype=torch.float64) * 2
    stds = torch.rand(k, dim, generator=g, dtype=torch.float64) * 0.5 + 0.2
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    return GaussianMixture(means, stds, w)


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_score_matches_autograd(dim):
    gm = _mixture(dim)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, dim, generator=g, dtype=torch.float64) * 3
    for sigma in (0.0, 0.01, 0.5, 3.0, 80.0, torch.rand(32, generator=g, dtype=torch.float64) * 10):
        xg = x.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(gm.log_prob(xg, sigma).sum(), xg)
        torch.testing.assert_close(gm.score(x, sigma), ref, rtol=1e-10, atol=1e-12)


def test_log_prob_integrates_to_one_1d():
    gm = _mixture(dim=1)
    grid = torch.linspace(-30, 30, 200001, dtype=torch.float64)[:, None]
    for sigma in (0.0, 1.0):
        dens = gm.log_prob(grid, sigma).exp()
        assert float(torch.trapezoid(dens, grid[:, 0])) == pytest.approx(1.0, abs=1e-8)


def test_single_gaussian_closed_form():
    gm = GaussianMixture(torch.tensor([[1.0, -2.0]]), 0.5)
    x = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    var = 0.25 + 4.0
    ref = -0.5 * ((1 + 4) / var + 2 * math.log(2 * math.pi * var))
    assert float(gm.log_prob(x, 2.0)) == pytest.approx(ref, rel=1e-12)
    torch.testing.assert_close(gm.denoise(x, 2.0), x + 4.0 * (gm.means - x) / var)


def test_sampling_matches_weights_and_noise():
    gm = _mixture(dim=2)
    g = torch.Generator().manual_seed(2)
    x, comp = gm.sample(40000, generator=g, return_components=True)
    freq = torch.bincount(comp, minlength=4).double() / 40000
    torch.testing.assert_close(freq, gm.weights, atol=0.01, rtol=0)
    xs = gm.sample(40000, sigma=2.0, generator=g)
    mean = (gm.weights[:, None] * gm.means).sum(0)
    torch.testing.assert_close(xs.mean(0), mean, atol=0.05, rtol=0)
    # per-sample sigma
    assert gm.sample(5, sigma=torch.arange(5.0), generator=g).shape == (5, 2)


def test_ring_and_weights():
    w = unequal_weights(8, 0.30, 0.03)
    assert float(w.sum()) == pytest.approx(1.0)
    assert float(w[0] / w[-1]) == pytest.approx(10.0)
    gm = ring(8, radius=2.0, std=0.1, weights=w)
    assert torch.allclose(gm.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    other = ring(8, radius=2.0, std=0.1)
    lr = gm.log_ratio(other, gm.means, 0.5)
    assert lr.shape == (8,) and float(lr[0]) > 0 > float(lr[-1])


def test_bad_input():
    with pytest.raises(ValueError, match=r"x must be \[N, 2\]"):
        ring().score(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="sigma must be"):
        ring().score(torch.zeros(3, 2), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        ring().log_prob(torch.zeros(3, 2), -1.0)
    with pytest.raises(ValueError, match="stds must be > 0"):
        GaussianMixture(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="weights must be"):
        GaussianMixture(torch.zeros(2, 2), 1.0, torch.ones(3))


def test_shared_std_mixture_equals_the_general_mixture():
    """The KDE fast path (one matrix product for the distances) gives the general mixture's densities, score,
    denoiser and ratio gradient to rounding, at the noise levels the toy oracle uses."""
    from fdistill_lab.mixtures import SharedStdMixture

    g = torch.Generator().manual_seed(0)
    centers = 2 * torch.randn(256, 2, generator=g, dtype=torch.float64)
    general, shared = GaussianMixture(centers, 0.05), SharedStdMixture(centers, 0.05)
    x = 2 * torch.randn(512, 2, generator=g, dtype=torch.float64)
    sigma = 0.01 + 3 * torch.rand(512, generator=g, dtype=torch.float64)
    for name in ("log_prob", "responsibilities", "score", "denoise"):
        a, b = getattr(general, name)(x, sigma), getattr(shared, name)(x, sigma)
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), name
    teacher = GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), 0.2, torch.tensor([0.9, 0.1]))
    grads = []
    for model in (general, shared):
        xg = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(teacher.log_ratio(model, xg, sigma).sum(), xg)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-9, atol=1e-9)
    assert shared.to(torch.float32).means.dtype == torch.float32
    with pytest.raises(ValueError, match="one number shared"):
        SharedStdMixture(centers, torch.ones(256))
