"""Exact 1-D f-distill: Gaussian student, Gaussian-mixture teacher, expectations by quadrature.

Notebook 01 uses these to make the paper's claims concrete without any learned network:

* ``fdistill_gradient``: the f-distill estimator -E_q[h(r) (s_p - s_q) dx/dtheta] (paper Fig. 1 and its
  gradient theorem) with exact scores and the exact ratio r = p/q, for theta = (mean, std)
  of q = N(mean, std^2), optionally at a noise level sigma (x_t = x + sigma * eps).
* ``divergence_value`` and ``finite_difference_gradient``: D_f(p||q) by quadrature and its central
  differences, to check the identity (section 12 reference numbers).
* ``normalized_variance``: Var_q[h] / E_q[h]^2 for p = N(mu, 1), q = N(0, 1) (paper Fig. 4a).
* ``fit_gaussian``: follow the exact f-distill gradient from a starting Gaussian (mode-seeking picture).

Expectations are sums over a fixed x grid in float64; a non-finite integrand raises (no clipping).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from .. import divergences
from ..divergences import Divergence
from ..mixtures import GaussianMixture

GRID_POINTS = 4001
GRID_STDS = 8.0
F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: the 1-D tensors here are tiny, so thread start-up dominates."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread(fn: F) -> F:
    """Decorator form of ``single_thread``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with single_thread():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def gaussian(mean: float, std: float) -> GaussianMixture:
    """N(mean, std^2) as a one-component 1-D mixture (float64)."""
    if not std > 0:
        raise ValueError(f"std must be > 0; got {std}")
    return GaussianMixture(torch.tensor([[float(mean)]], dtype=torch.float64), float(std))


def bimodal(separation: float = 4.0, weight: float = 0.5, std: float = 0.5) -> GaussianMixture:
    """Teacher w N(-separation/2, std^2) + (1 - w) N(+separation/2, std^2)."""
    if not 0 < weight < 1:
        raise ValueError(f"weight of the left mode must be in (0, 1); got {weight}")
    if not separation >= 0:
        raise ValueError(f"separation must be >= 0; got {separation}")
    half = separation / 2
    return GaussianMixture(torch.tensor([[-half], [half]], dtype=torch.float64), float(std),
                           torch.tensor([weight, 1 - weight], dtype=torch.float64))


def grid_bounds(p: GaussianMixture, q: GaussianMixture, sigma: float = 0.0) -> tuple[float, float]:
    """Interval covering every component of p_sigma and q_sigma to GRID_STDS standard deviations."""
    means = torch.cat([p.means[:, 0], q.means[:, 0]])
    stds = torch.sqrt(torch.cat([p.stds[:, 0], q.stds[:, 0]]) ** 2 + sigma**2)
    return float((means - GRID_STDS * stds).min()), float((means + GRID_STDS * stds).max())


def _grid(p: GaussianMixture, q: GaussianMixture, sigma: float, n: int,
          bounds: tuple[float, float] | None) -> tuple[torch.Tensor, float]:
    lo, hi = bounds if bounds is not None else grid_bounds(p, q, sigma)
    if not hi > lo or n < 3:
        raise ValueError(f"need bounds lo < hi and n >= 3; got {(lo, hi)}, n={n}")
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    return x, (hi - lo) / (n - 1)


def _finite(name: str, t: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(
            f"{name} is not finite on the quadrature grid (ratio p/q beyond float64); use a wider student, "
            "a closer start or a noise level sigma > 0")
    return t


@dataclass
class Quadrature:
    """Grid values of q_sigma, the log-ratio and both scores for one (p, q, sigma)."""

    x: torch.Tensor
    w: torch.Tensor  # q(x) dx, sums to ~1
    log_r: torch.Tensor
    score_p: torch.Tensor
    score_q: torch.Tensor

    def expect(self, values: torch.Tensor) -> torch.Tensor:
        return (self.w * values).sum()


def quadrature(p: GaussianMixture, q: GaussianMixture, sigma: float = 0.0, n: int = GRID_POINTS,
               bounds: tuple[float, float] | None = None) -> Quadrature:
    """Tabulate q_sigma, log r = log p_sigma - log q_sigma and the scores on an x grid (default bounds:
    ``grid_bounds``; pass fixed bounds when comparing nearby q, e.g. for finite differences)."""
    if p.dim != 1 or q.dim != 1:
        raise ValueError(f"1-D distributions only; got dims {p.dim} and {q.dim}")
    x, dx = _grid(p, q, sigma, n, bounds)
    xs = x[:, None]
    log_q = q.log_prob(xs, sigma)
    return Quadrature(x=x, w=log_q.exp() * dx, log_r=p.log_prob(xs, sigma) - log_q,
                      score_p=p.score(xs, sigma)[:, 0], score_q=q.score(xs, sigma)[:, 0])


def _divergence(div: str | Divergence) -> Divergence:
    return divergences.get(div)


@one_thread
def divergence_value(div: str | Divergence, p: GaussianMixture, q: GaussianMixture, sigma: float = 0.0,
                     n: int = GRID_POINTS, bounds: tuple[float, float] | None = None) -> float:
    """D_f(p_sigma || q_sigma) = E_q[f(p/q)] by quadrature."""
    d = _divergence(div)
    quad = quadrature(p, q, sigma, n, bounds)
    integrand = quad.w * d.f(quad.log_r.exp())
    return float(_finite(f"q f(r) for {d.name}", integrand).sum())


@one_thread
def fdistill_gradient(div: str | Divergence, p: GaussianMixture, mean: float, std: float, sigma: float = 0.0,
                      normalize: bool = False, n: int = GRID_POINTS) -> tuple[float, float]:
    """(dD/dmean, dD/dstd) of D_f(p_sigma || q_sigma), q = N(mean, std^2), by the f-distill estimator.

    x_t = mean + std z + sigma eps, so dx_t/dmean = 1 and E[dx_t/dstd | x_t] = std (x_t - mean) / tau^2
    with tau^2 = std^2 + sigma^2. The gradient is -E[h(r) (s_p - s_q) dx_t/dtheta] (paper section 2);
    ``normalize`` divides h by E_q[h] (the exact analogue of stage-2 batch normalisation).
    """
    d = _divergence(div)
    quad = quadrature(p, gaussian(mean, std), sigma, n)
    h = _finite(f"h(r) for {d.name}", d.weight_from_logit(quad.log_r))
    if normalize:
        h = h / quad.expect(h)
    g = h * (quad.score_p - quad.score_q)
    tau2 = std**2 + sigma**2
    d_mean = -quad.expect(g)
    d_std = -quad.expect(g * std * (quad.x - mean) / tau2)
    return float(_finite("gradient", d_mean)), float(_finite("gradient", d_std))


@one_thread
def finite_difference_gradient(div: str | Divergence, p: GaussianMixture, mean: float, std: float,
                               sigma: float = 0.0, step: float = 1e-4, n: int = GRID_POINTS) -> tuple[float, float]:
    """Central differences of ``divergence_value`` in mean and std."""
    bounds = grid_bounds(p, gaussian(mean, std), sigma)

    def value(m: float, s: float) -> float:
        return divergence_value(div, p, gaussian(m, s), sigma, n, bounds)

    d_mean = (value(mean + step, std) - value(mean - step, std)) / (2 * step)
    d_std = (value(mean, std + step) - value(mean, std - step)) / (2 * step)
    return d_mean, d_std


@one_thread
def normalized_variance(div: str | Divergence, mu: float, n: int = GRID_POINTS) -> float:
    """Var_q[h(r)] / E_q[h(r)]^2 for p = N(mu, 1), q = N(0, 1) (paper Fig. 4a; reference table section 12)."""
    d = _divergence(div)
    quad = quadrature(gaussian(mu, 1.0), gaussian(0.0, 1.0), 0.0, n)
    h = _finite(f"h(r) for {d.name}", d.weight_from_logit(quad.log_r))
    mean = quad.expect(h)
    var = quad.expect((h - mean) ** 2)
    return float(var / mean**2)


@dataclass
class FitResult:
    """Trajectory of a Gaussian student fitted by the exact f-distill gradient, and D_f at the end."""

    divergence: str
    mean: np.ndarray  # [steps + 1]
    std: np.ndarray
    final_value: float  # D_f(p || q) at sigma = 0 after the last step

    @property
    def final(self) -> tuple[float, float]:
        return float(self.mean[-1]), float(self.std[-1])


def fit_gaussian(div: str | Divergence, p: GaussianMixture, mean: float = 1.0, std: float = 1.0, steps: int = 300,
                 lr: float = 0.05, sigmas: tuple[float, ...] = (0.0,), normalize: bool = True,
                 std_min: float = 0.3, n: int = 1001, progress: bool = False) -> FitResult:
    """Gradient descent on (mean, log std) with the exact f-distill gradient averaged over ``sigmas``.

    ``std`` is kept >= ``std_min`` (a projected step), which keeps the quadrature in float64 range.
    Reverse KL (h = 1) collapses onto one mode; forward KL (h = r) spreads over both.
    """
    if steps < 0 or lr <= 0 or std_min <= 0:
        raise ValueError(f"need steps >= 0, lr > 0, std_min > 0; got {steps}, {lr}, {std_min}")
    if not sigmas or any(s < 0 for s in sigmas):
        raise ValueError(f"sigmas must be a non-empty tuple of noise levels >= 0; got {sigmas}")
    d = _divergence(div)
    m, log_s = float(mean), math.log(max(float(std), std_min))
    traj_m, traj_s = [m], [math.exp(log_s)]
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"fit {d.name}", leave=False)
    with single_thread():
        for _ in iterator:
            s = math.exp(log_s)
            grads = [fdistill_gradient(d, p, m, s, sig, normalize, n) for sig in sigmas]
            g_m = sum(g[0] for g in grads) / len(grads)
            g_s = sum(g[1] for g in grads) / len(grads)
            m -= lr * g_m
            log_s = max(log_s - lr * g_s * s, math.log(std_min))
            traj_m.append(m)
            traj_s.append(math.exp(log_s))
        value = divergence_value(d, p, gaussian(m, math.exp(log_s)), n=n)
    return FitResult(d.name, np.array(traj_m), np.array(traj_s), value)


def modes_kept(result: FitResult, p: GaussianMixture, threshold: float = 0.1) -> int:
    """Teacher modes holding at least ``threshold`` of the fitted student's mass (nearest-mode assignment)."""
    means = p.means[:, 0]
    m, s = result.final
    x = torch.linspace(m - 8 * s, m + 8 * s, 4001, dtype=torch.float64)
    q = torch.exp(-0.5 * ((x - m) / s) ** 2)
    q = q / q.sum()
    nearest = (x[:, None] - means[None]).abs().argmin(1)
    mass = torch.zeros(len(means), dtype=torch.float64).index_add_(0, nearest, q)
    return int((mass >= threshold).sum())
