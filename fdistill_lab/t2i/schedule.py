"""Stable Diffusion's discrete VP noise schedule seen in EDM's variables (paper section 9, FastGen's SD1.5 setup).

SD1.5 noises latents as x_vp = sqrt(a_bar) x0 + sqrt(1 - a_bar) eps over 1000 training timesteps ("scaled_linear"
betas 0.00085..0.012). Dividing by sqrt(a_bar) gives EDM's form x = x0 + sigma eps with sigma = sqrt((1 - a_bar) /
a_bar), so the library's f-distill code (``fdistill_lab.method``), written for x + sigma eps, runs unchanged on
latents. Between table entries log sigma is interpolated linearly in the timestep (fractional timesteps are fine
for the U-Net's sinusoidal embedding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETA_SCHEDULES = ("scaled_linear", "linear")


@dataclass(frozen=True)
class VPSchedule:
    """The teacher's noise schedule: ``beta_schedule`` ("scaled_linear" for SD1.5, or "linear") from ``beta_start``
    to ``beta_end`` over ``num_train_timesteps`` steps."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}; got {self.beta_schedule!r}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1; got {self.beta_start}, {self.beta_end}")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2; got {self.num_train_timesteps!r}")

    def alphas_cumprod(self) -> torch.Tensor:
        """a_bar[i], i = 0 .. N-1, float64 (the same table as diffusers' DDPM/PNDM schedulers build)."""
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), n, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, 0)

    def log_sigmas(self) -> torch.Tensor:
        """log sigma[i] = log sqrt((1 - a_bar) / a_bar), increasing in i, float64."""
        a = self.alphas_cumprod()
        return 0.5 * torch.log((1.0 - a) / a)

    def sigma_at(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma at fractional time t in [0, 1] (timestep t (N - 1)), float64."""
        tau = torch.as_tensor(t, dtype=torch.float64) * (self.num_train_timesteps - 1)
        return _interp(tau, self.log_sigmas()).exp()

    @property
    def sigma_min(self) -> float:
        return float(self.sigma_at(0.0))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma_at(1.0))


def _interp(tau: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``table`` at fractional indices ``tau`` (clamped to the table)."""
    tau = tau.clamp(0, table.numel() - 1)
    lo = tau.floor().long().clamp(max=table.numel() - 2)
    w = tau - lo
    return table[lo] * (1 - w) + table[lo + 1] * w


def timestep_from_sigma(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep whose interpolated sigma is ``sigma`` (the inverse of :meth:`VPSchedule.sigma_at`
    up to the factor N - 1); sigmas outside the table's range clamp to its ends."""
    ls = sigma.to(log_sigmas.dtype).clamp_min(1e-12).log().clamp(log_sigmas[0], log_sigmas[-1])
    hi = torch.searchsorted(log_sigmas, ls).clamp(1, log_sigmas.numel() - 1)
    lo = hi - 1
    w = (ls - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
    return lo.to(ls.dtype) + w
