"""EDM diffusion maths (Karras et al. 2022): preconditioning, noise levels, Heun sampler.

Used by every teacher, student and fake score in the package. Notation of EDM (its section 2 and Table 1) and of
the f-distill paper (section 9): x_t = x_0 + sigma * eps, denoiser D(x; sigma) is the x0-prediction,
score = (D - x) / sigma^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_sigma(sigma: torch.Tensor, name: str = "sigma") -> None:
    """ValueError unless every sigma is finite and > 0 (NaN and inf included)."""
    if torch.is_tensor(sigma) and sigma.numel() and not bool(((sigma > 0) & sigma.isfinite()).all()):
        raise ValueError(f"{name} must be finite and > 0 everywhere; got values in [{float(sigma.min()):.3g}, "
                         f"{float(sigma.max()):.3g}]" + (" and NaN" if bool(sigma.isnan().any()) else ""))
    if not torch.is_tensor(sigma) and not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{name} must be finite and > 0; got {sigma}")


def as_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample sigma ([B], or [B, 1, ..., 1]) as [B, 1, ..., 1] for x [B, ...] (x's dtype/device).

    Any other shape is a ValueError: a [B, 1] sigma with 4-D images would otherwise broadcast along the
    image width instead of the batch.
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    per_sample = sigma.ndim <= x.ndim and sigma.shape[0] == x.shape[0] and all(n == 1 for n in sigma.shape[1:])
    if not per_sample:
        raise ValueError(f"sigma must be a scalar or one value per sample ([{x.shape[0]}] or [{x.shape[0]}, 1, ...]) "
                         f"for x of shape {tuple(x.shape)}; got shape {tuple(sigma.shape)}")
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def precond(
    sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1): c_skip, c_out, c_in, c_noise. Sigma is checked eagerly
    only: the check reads the values back to the host, which a compiled graph (``torch.compile``) must not do."""
    sigma = torch.as_tensor(sigma)
    if not torch.compiler.is_compiling():
        _check_sigma(sigma)
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1.0 / s2.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    _check_sigma(sigma)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


# ---------------------------------------------------------------------------- conversions


def x0_to_score(x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Score of the noised marginal from an x0-prediction (Tweedie): (x0 - x) / sigma^2."""
    s = as_sigma(sigma, x)
    _check_sigma(s)
    return (x0 - x) / s**2


def score_to_x0(score: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0-prediction from a score: x + sigma^2 * score."""
    s = as_sigma(sigma, x)
    _check_sigma(s)
    return x + s**2 * score


def x0_to_eps(x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Noise prediction from an x0-prediction: (x - x0) / sigma."""
    s = as_sigma(sigma, x)
    _check_sigma(s)
    return (x - x0) / s


def eps_to_x0(eps: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0-prediction from a noise prediction: x - sigma * eps."""
    s = as_sigma(sigma, x)
    _check_sigma(s)
    return x - s * eps


# ---------------------------------------------------------------------------- noise levels


def karras_sigmas(
    n: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    append_zero: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Karras grid, decreasing from sigma_max to sigma_min in n points (EDM eq. 5), float64."""
    if n < 2:
        raise ValueError(f"n must be >= 2; got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
    i = torch.arange(n, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    t = (a + i / (n - 1) * (b - a)) ** rho
    if append_zero:
        t = torch.cat([t, t.new_zeros(1)])
    return t.to(dtype)


def karras_grid(num_points: int = 1000, **kwargs) -> torch.Tensor:
    """Increasing Karras grid as DMD2 and FastGen index it: index 0 is sigma_min (float64)."""
    return karras_sigmas(num_points, **kwargs).flip(0)


def sample_sigma_lognormal(
    n: int, p_mean: float = -1.2, p_std: float = 1.2, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """EDM training noise levels: ln sigma ~ N(p_mean, p_std^2)."""
    z = torch.randn(n, generator=generator, dtype=torch.float64, device=device)
    return (p_mean + p_std * z).exp()


def sample_sigma_grid(
    n: int,
    min_index: int = 2,
    max_index: int = 998,
    num_points: int = 1000,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Noise levels drawn uniformly from indices [min_index, max_index] (inclusive) of the increasing
    Karras grid: FastGen uses 2..998 (paper section 9), DMD2 20..980 (its fake score 0..999)."""
    if not 0 <= min_index <= max_index < num_points:
        raise ValueError(
            f"need 0 <= min_index <= max_index < num_points; got {min_index}, {max_index}, {num_points}"
        )
    grid = karras_grid(num_points, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    idx = torch.randint(min_index, max_index + 1, (n,), generator=generator)
    return grid[idx].to(device) if device is not None else grid[idx]


# ---------------------------------------------------------------------------- sampler


@torch.no_grad()
def heun_sampler(
    denoise: Denoiser,
    latents: torch.Tensor,
    num_steps: int = 18,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """EDM's 2nd-order Heun sampler (Karras et al. 2022, Algorithm 2), deterministic when s_churn = 0.

    ``denoise(x, sigma)`` returns the x0-prediction for a batch x with per-sample sigma [B].
    ``latents`` are unit-variance noise; they are scaled by sigma_max here. Uses 2 * num_steps - 1
    network evaluations. Steps are taken in float64; the denoiser gets the latents' dtype (float32 for float16 or
    bfloat16 latents), and the result comes back in the latents' dtype.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    t = karras_sigmas(num_steps, sigma_min, sigma_max, rho, append_zero=True) if num_steps > 1 else (
        torch.tensor([sigma_max, 0.0], dtype=torch.float64))
    x = latents.to(torch.float64) * t[0]
    b = latents.shape[0]
    gamma_max = min(s_churn / num_steps, math.sqrt(2) - 1)
    # the denoiser sees at least float32 (as in EDM): sigma_min = 0.002 is 0.0019989 in bfloat16
    work = torch.float32 if latents.dtype in (torch.float16, torch.bfloat16) else latents.dtype

    def d(x_: torch.Tensor, s: float) -> torch.Tensor:
        sig = torch.full((b,), s, dtype=work, device=latents.device)
        return denoise(x_.to(work), sig).to(torch.float64)

    for i in range(num_steps):
        t_cur, t_next = float(t[i]), float(t[i + 1])
        gamma = gamma_max if s_min <= t_cur <= s_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            # drawn where the generator lives (a CPU generator gives the same noise for CUDA latents)
            on = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float64, device=on).to(x.device)
            x = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * noise
        slope = (x - d(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * slope
        if i < num_steps - 1:
            slope2 = (x_next - d(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * slope + 0.5 * slope2)
        x = x_next
    return x.to(latents.dtype)
