"""EDM preconditioning, noise-level samplers, conversions and the Heun sampler."""

import math

import pytest
import torch

from fdistill_lab import edm
from fdistill_lab.mixtures import GaussianMixture


def test_precond_formulas():
    sigma = torch.tensor([0.002, 0.5, 5.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.precond(sigma)
    sd = 0.5
    for i, s in enumerate(sigma.tolist()):
        assert float(c_skip[i]) == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
        assert float(c_out[i]) == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert float(c_in[i]) == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert float(c_noise[i]) == pytest.approx(math.log(s) / 4, rel=1e-12)
    # unit-variance training targets: c_skip^2 sd^2 + c_out^2 = ... the effective target has unit var
    assert float(c_skip[0]) == pytest.approx(1.0, abs=2e-5)  # D(x) ~ x at tiny sigma
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        edm.precond(torch.tensor([0.5, 0.0]))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and > 0"):
            edm.precond(torch.tensor([0.5, bad]))


def test_conversions_roundtrip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 4, generator=g)
    x0 = torch.randn(5, 3, 4, 4, generator=g)
    sigma = torch.rand(5, generator=g) + 0.1
    s = edm.x0_to_score(x0, x, sigma)
    torch.testing.assert_close(edm.score_to_x0(s, x, sigma), x0, rtol=1e-5, atol=1e-5)
    eps = edm.x0_to_eps(x0, x, sigma)
    torch.testing.assert_close(edm.eps_to_x0(eps, x, sigma), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, -eps / sigma.reshape(-1, 1, 1, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one value per sample"):
        edm.x0_to_score(x0, x, sigma[:3])
    with pytest.raises(ValueError, match="> 0"):
        edm.x0_to_score(x0, x, torch.zeros(5))
    torch.testing.assert_close(edm.x0_to_eps(x0, x, sigma[:, None, None, None]), eps)  # [B, 1, 1, 1] is fine
    # [B, 1] with 4-D images (B == H here) used to broadcast over the height; it is one value per sample
    wide, wide0 = torch.randn(5, 3, 5, 4, generator=g), torch.randn(5, 3, 5, 4, generator=g)
    torch.testing.assert_close(edm.x0_to_eps(wide0, wide, sigma[:, None]), edm.x0_to_eps(wide0, wide, sigma))
    for bad in (sigma[:, None].expand(5, 3), torch.rand(5, 3, 5, 4) + 0.1):  # anything else is refused
        with pytest.raises(ValueError, match="one value per sample"):
            edm.x0_to_eps(wide0, wide, bad)
    for fn in (edm.score_to_x0, edm.eps_to_x0):  # the inverse directions check sigma too
        with pytest.raises(ValueError, match="> 0"):
            fn(x0, x, -sigma)


def test_loss_weight():
    s = torch.tensor([0.5])
    assert float(edm.loss_weight(s)) == pytest.approx((0.25 + 0.25) / (0.25 * 0.25))
    with pytest.raises(ValueError):
        edm.loss_weight(torch.tensor([-1.0]))


def test_karras_grid_and_samplers():
    t = edm.karras_sigmas(18)
    assert t.dtype == torch.float64 and float(t[0]) == pytest.approx(80) and float(t[-1]) == pytest.approx(0.002)
    assert bool((t[:-1] > t[1:]).all())
    grid = edm.karras_grid(1000)
    assert float(grid[0]) == pytest.approx(0.002) and float(grid[-1]) == pytest.approx(80)
    g = torch.Generator().manual_seed(0)
    s = edm.sample_sigma_grid(20000, 2, 998, generator=g)
    assert float(s.min()) >= float(grid[2]) - 1e-12 and float(s.max()) <= float(grid[998]) + 1e-12
    # about 64% of FastGen's draws land below sigma = 8 (fdistill_paper.md section 5)
    assert float((s < 8.0).double().mean()) == pytest.approx(0.64, abs=0.02)
    ln = edm.sample_sigma_lognormal(50000, generator=g).log()
    assert float(ln.mean()) == pytest.approx(-1.2, abs=0.03) and float(ln.std()) == pytest.approx(1.2, abs=0.03)
    with pytest.raises(ValueError, match="min_index"):
        edm.sample_sigma_grid(4, 10, 5)
    with pytest.raises(ValueError, match="n must be"):
        edm.karras_sigmas(1)


def _two_mode_mixture():
    means = torch.tensor([[-1.5, 0.0], [1.0, 1.0]], dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.15, 0.25]), torch.tensor([0.7, 0.3]))


@pytest.mark.parametrize("churn", [0.0, 10.0])
def test_heun_sampler_reproduces_mixture(churn):
    """Driven by the exact mixture denoiser, Heun recovers the mixture's weights and means."""
    gm = _two_mode_mixture()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    x = edm.heun_sampler(lambda x, s: gm.denoise(x, s), z, num_steps=40, s_churn=churn, generator=g)
    resp = gm.responsibilities(x)
    comp = resp.argmax(1)
    weights = torch.bincount(comp, minlength=2).double() / len(comp)
    assert weights.tolist() == pytest.approx([0.7, 0.3], abs=0.03)
    for k in range(2):
        torch.testing.assert_close(x[comp == k].mean(0), gm.means[k], atol=0.03, rtol=0)
        assert float(x[comp == k].std(0).mean()) == pytest.approx(float(gm.stds[k, 0]), rel=0.1)


@pytest.mark.gpu
def test_heun_churn_with_a_cpu_generator_on_cuda_latents_matches_the_cpu_run():
    def denoise(x, s):
        return x / (1 + s.view(-1, 1) ** 2)
    z = torch.randn(16, 2, dtype=torch.float64)
    run = {dev: edm.heun_sampler(denoise, z.to(dev), num_steps=6, s_churn=10.0,
                                 generator=torch.Generator().manual_seed(1)) for dev in ("cpu", "cuda")}
    torch.testing.assert_close(run["cuda"].cpu(), run["cpu"])


def test_heun_feeds_the_denoiser_at_least_float32():
    seen = []

    def denoise(x, s):
        seen.append((x.dtype, s.dtype, float(s[0])))
        return torch.zeros_like(x)

    out = edm.heun_sampler(denoise, torch.randn(2, 3, dtype=torch.bfloat16), num_steps=3)
    assert out.dtype == torch.bfloat16
    assert {d[:2] for d in seen} == {(torch.float32, torch.float32)}
    assert min(d[2] for d in seen) == pytest.approx(edm.SIGMA_MIN, rel=1e-6)  # not bfloat16's 0.0019989


def test_heun_one_step_is_denoiser():
    gm = _two_mode_mixture()
    z = torch.randn(8, 2, dtype=torch.float64)
    out = edm.heun_sampler(lambda x, s: gm.denoise(x, s), z, num_steps=1)
    torch.testing.assert_close(out, gm.denoise(80 * z, 80.0))
