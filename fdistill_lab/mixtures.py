"""Analytic Gaussian-mixture teachers: exact sampling, log-density and score at any noise level.

p = sum_k w_k N(mu_k, diag(s_k^2)); the EDM-noised marginal p_sigma = p * N(0, sigma^2 I) is again a
mixture with variances s_k^2 + sigma^2, so log p_sigma, its score and the exact denoiser
E[x0 | x_sigma] = x + sigma^2 grad log p_sigma are closed form. Batched over sigma (one per sample).
These are the toy notebooks' exact teachers and the exact ratio oracle when the student is a mixture.
"""

from __future__ import annotations

import math

import torch


class GaussianMixture:
    """Mixture of K Gaussians with diagonal covariances in D dimensions (float64 by default).

    Args:
        means: [K, D].
        stds: scalar, [K] (isotropic per component) or [K, D] (diagonal).
        weights: [K] non-negative, normalised internally; default uniform.
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor | float = 1.0,
        weights: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        means = torch.as_tensor(means, dtype=dtype)
        if means.ndim == 1:
            means = means[:, None]
        if means.ndim != 2 or means.shape[0] < 1:
            raise ValueError(f"means must be [K, D] with K >= 1; got shape {tuple(means.shape)}")
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=dtype)
        if stds.ndim == 0:
            stds = stds.expand(k, d)
        elif stds.ndim == 1:
            if stds.shape[0] != k:
                raise ValueError(f"stds has {stds.shape[0]} entries but there are {k} components")
            stds = stds[:, None].expand(k, d)
        elif tuple(stds.shape) != (k, d):
            raise ValueError(f"stds must be scalar, [K] or [K, D] = [{k}, {d}]; got {tuple(stds.shape)}")
        if not bool((stds > 0).all()):
            raise ValueError("stds must be > 0")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=dtype)
        weights = torch.as_tensor(weights, dtype=dtype)
        if weights.shape != (k,):
            raise ValueError(f"weights must be [K] = [{k}]; got {tuple(weights.shape)}")
        if bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        self.means = means
        self.stds = stds.contiguous()
        self.weights = weights / weights.sum()

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, dtype: torch.dtype) -> GaussianMixture:
        return GaussianMixture(self.means.to(dtype), self.stds.to(dtype), self.weights.to(dtype), dtype)

    # ------------------------------------------------------------------ helpers
    def _prep(self, x: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be [N, {self.dim}]; got {tuple(x.shape)}")
        s = torch.as_tensor(sigma, dtype=self.means.dtype, device=x.device)
        if s.ndim == 0:
            s = s.expand(x.shape[0])
        s = s.flatten()
        if s.shape[0] != x.shape[0]:
            raise ValueError(f"sigma must be a scalar or [N] = [{x.shape[0]}]; got {s.shape[0]} values")
        if bool((s < 0).any()):
            raise ValueError("sigma must be >= 0 (0 gives the clean mixture)")
        return x.to(self.means.dtype), s

    def _component_terms(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log of w_k N(x; mu_k, s_k^2 + sigma^2) [N, K] and the variances [N, K, D]."""
        var = self.stds[None] ** 2 + s[:, None, None] ** 2  # [N, K, D]
        diff = x[:, None, :] - self.means[None]  # [N, K, D]
        logn = -0.5 * ((diff**2 / var) + var.log() + math.log(2 * math.pi)).sum(-1)
        return logn + self.weights.log()[None], var

    # ------------------------------------------------------------------ densities
    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """log p_sigma(x) for x [N, D] and sigma scalar or [N]."""
        x, s = self._prep(x, sigma)
        return torch.logsumexp(self._component_terms(x, s)[0], dim=1)

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Posterior component probabilities [N, K] under p_sigma."""
        x, s = self._prep(x, sigma)
        return torch.softmax(self._component_terms(x, s)[0], dim=1)

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """grad_x log p_sigma(x), exact: sum_k gamma_k (mu_k - x) / (s_k^2 + sigma^2)."""
        x, s = self._prep(x, sigma)
        logc, var = self._component_terms(x, s)
        gamma = torch.softmax(logc, dim=1)
        return (gamma[..., None] * (self.means[None] - x[:, None, :]) / var).sum(1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Exact x0-prediction E[x0 | x_sigma = x] = x + sigma^2 score (the ideal EDM denoiser)."""
        x, s = self._prep(x, sigma)
        return x + s[:, None] ** 2 * self.score(x, s)

    # ------------------------------------------------------------------ sampling
    def sample(
        self, n: int, sigma: torch.Tensor | float = 0.0, generator: torch.Generator | None = None,
        return_components: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Exact samples of p_sigma ([N, D]); optionally also the component index of each."""
        if n < 0:
            raise ValueError(f"n must be >= 0; got {n}")
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator)
        x0 = self.means[comp] + self.stds[comp] * z
        s = torch.as_tensor(sigma, dtype=self.means.dtype)
        if s.ndim == 0:
            s = s.expand(n)
        if bool((s < 0).any()):
            raise ValueError("sigma must be >= 0")
        if bool((s > 0).any()):
            x0 = x0 + s.reshape(-1, 1) * torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator)
        return (x0, comp) if return_components else x0

    def log_ratio(self, other: GaussianMixture, x: torch.Tensor, sigma: torch.Tensor | float = 0.0
                  ) -> torch.Tensor:
        """log p_sigma(x) - log q_sigma(x) with q = ``other``: the exact density-ratio oracle."""
        return self.log_prob(x, sigma) - other.log_prob(x, sigma)


class SharedStdMixture(GaussianMixture):
    """A mixture whose components share one isotropic std (a Gaussian KDE, the toy oracle's model of the student):
    the same densities, score and denoiser as :class:`GaussianMixture`, computed on [N, K] distances from one
    matrix product instead of [N, K, D] differences (several times faster for a KDE of hundreds of points)."""

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        if not isinstance(std, (int, float)) or isinstance(std, bool):
            raise ValueError(f"std must be one number shared by every component; got {std!r}")
        super().__init__(means, float(std), weights, dtype)
        self.std = float(std)

    def to(self, dtype: torch.dtype) -> SharedStdMixture:
        return SharedStdMixture(self.means.to(dtype), self.std, self.weights.to(dtype), dtype)

    def _component_terms(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log of w_k N(x; mu_k, (std^2 + sigma^2) I) [N, K] and the variance per sample [N]."""
        var = self.std**2 + s**2  # [N]
        sq = (x * x).sum(1, keepdim=True) - 2.0 * x @ self.means.T + (self.means * self.means).sum(1)[None]
        sq = sq.clamp_min(0.0)  # ||x - mu||^2 from the expansion: never below 0 by rounding
        logn = -0.5 * (sq / var[:, None] + self.dim * (var.log()[:, None] + math.log(2 * math.pi)))
        return logn + self.weights.log()[None], var

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """grad_x log p_sigma(x) = (sum_k gamma_k mu_k - x) / (std^2 + sigma^2)."""
        x, s = self._prep(x, sigma)
        logc, var = self._component_terms(x, s)
        return (torch.softmax(logc, dim=1) @ self.means - x) / var[:, None]


def ring(
    num_modes: int = 8,
    radius: float = 2.0,
    std: float = 0.1,
    weights: torch.Tensor | list[float] | None = None,
    dtype: torch.dtype = torch.float64,
) -> GaussianMixture:
    """``num_modes`` Gaussians evenly spaced on a circle (the classic 2-D mode-coverage teacher)."""
    if num_modes < 1:
        raise ValueError(f"num_modes must be >= 1; got {num_modes}")
    ang = torch.arange(num_modes, dtype=dtype) * (2 * math.pi / num_modes)
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    return GaussianMixture(means, std, None if weights is None else torch.as_tensor(weights, dtype=dtype),
                           dtype)


def unequal_weights(num_modes: int = 8, largest: float = 0.30, smallest: float = 0.03) -> torch.Tensor:
    """Weights decreasing geometrically from ``largest`` to ``smallest``, renormalised to sum 1."""
    if num_modes < 2:
        return torch.ones(max(num_modes, 1), dtype=torch.float64)
    if not 0 < smallest <= largest:
        raise ValueError(f"need 0 < smallest <= largest; got {smallest}, {largest}")
    w = torch.logspace(math.log10(largest), math.log10(smallest), num_modes, dtype=torch.float64)
    return w / w.sum()
