"""Density ratio r = p_t / q_t from discriminator logits and the two-stage normalisation.

The paper takes the ratio from the GAN discriminator (Fig. 1; r = exp(logit) for a real-positive discriminator)
and normalises it in two stages (Fig. 4b): stage 1 normalises r per noise-level bin with a running EMA (kept as a
module buffer so checkpoints carry it, and averaged over all ranks), stage 2 divides h by its (global) batch mean.
All maths in float32 or higher and detached.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .edm import SIGMA_MAX, SIGMA_MIN

EPS = 1e-6


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _fp32_or_fp64(x: torch.Tensor) -> torch.Tensor:
    """x in float64 if it is float64, else in float32."""
    return x if x.dtype == torch.float64 else x.float()


def ratio_from_logits(
    logits: torch.Tensor,
    logit_clip: float | None = 10.0,
    ratio_min: float | None = 0.1,
    ratio_max: float | None = 20.0,
) -> torch.Tensor:
    """r = exp(clip(l)) then clipped to [ratio_min, ratio_max]; fp32 (or fp64 input), detached.

    ``logits`` is [B] or [B, ...]; extra dims (several heads, spatial logits) are averaged first,
    as in the authors' public implementation. Defaults: logit clip 10, ratio range [0.1, 20].
    """
    if logits.ndim == 0:
        raise ValueError("logits must have a batch dimension; got a scalar")
    if ratio_min is not None and ratio_max is not None and not 0 < ratio_min < ratio_max:
        raise ValueError(f"need 0 < ratio_min < ratio_max; got {ratio_min}, {ratio_max}")
    l = _fp32_or_fp64(logits.detach())
    if l.ndim > 1:
        l = l.flatten(1).mean(1)
    # the first op makes a fresh tensor, so the rest may work in place (fewer small ops per step)
    r = l.clamp(-logit_clip, logit_clip).exp_() if logit_clip is not None else l.exp()
    if ratio_min is not None or ratio_max is not None:
        r.clamp_(ratio_min, ratio_max)
    return r


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch on all ranks (sum and count all-reduced); plain mean when not distributed."""
    if not _distributed():
        return x.mean()
    buf = torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)])
    dist.all_reduce(buf)
    return buf[0] / buf[1]


def normalize_weights(h: torch.Tensor, enabled: bool = True, eps: float = EPS) -> torch.Tensor:
    """Stage 2: h / mean of h over the global batch, so the mean weight is 1.

    The mean is floored at ``eps`` (FastGen adds eps instead; flooring keeps h = 1, i.e. reverse KL,
    exactly 1 so the update equals DMD2's bit for bit in the weights).
    """
    h = _fp32_or_fp64(h.detach())
    if not enabled:
        return h
    return h / global_mean(h).clamp_min(eps)


class RatioNormalizer(nn.Module):
    """Stage 1: per-noise-level-bin normalisation of the ratio with a running EMA state.

    Bins split [sigma_min, sigma_max] into ``num_bins`` equal-width intervals, in sigma ("linear",
    as FastGen) or in log sigma ("log"). For every bin present in the batch the batch mean of r
    (summed over ranks) updates ``bins[k] <- ema * bins[k] + (1 - ema) * mean_k``; then
    r_tilde = r / max(bins[k(sigma)], eps). The state starts at 1 and is a persistent buffer.
    """

    SPACINGS = ("linear", "log")

    def __init__(
        self,
        num_bins: int = 10,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        ema_rate: float = 0.0,
        spacing: str = "linear",
        enabled: bool = True,
        eps: float = EPS,
    ) -> None:
        super().__init__()
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1; got {num_bins}")
        if not 0.0 <= ema_rate < 1.0:
            raise ValueError(f"ema_rate must be in [0, 1); got {ema_rate}")
        if spacing not in self.SPACINGS:
            raise ValueError(f"spacing must be one of {self.SPACINGS}; got {spacing!r}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        self.num_bins, self.sigma_min, self.sigma_max = num_bins, sigma_min, sigma_max
        self.ema_rate, self.spacing, self.enabled, self.eps = ema_rate, spacing, enabled, eps
        self.register_buffer("bins", torch.ones(num_bins, dtype=torch.float32))
        # inner bin edges in sigma space (for both spacings), so binning is one bucketize call
        u = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)[1:-1]
        if spacing == "linear":
            edges = sigma_min + u * (sigma_max - sigma_min)
        else:
            edges = torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))
        self.register_buffer("edges", edges.float(), persistent=False)

    def extra_repr(self) -> str:
        return (f"num_bins={self.num_bins}, sigma=[{self.sigma_min}, {self.sigma_max}], "
                f"spacing={self.spacing}, ema_rate={self.ema_rate}, enabled={self.enabled}")

    def bin_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Bin of each noise level (values outside the range go to the first or last bin)."""
        s = sigma.detach().flatten().float()
        return torch.bucketize(s, self.edges.to(s.device), right=True)

    @torch.no_grad()
    def update(self, r: torch.Tensor, sigma: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """Fold the (global) per-bin batch means of r into the running state."""
        idx = self.bin_index(sigma) if idx is None else idx
        r = r.detach().flatten().float()
        if r.shape[0] != idx.shape[0]:
            raise ValueError(f"r has {r.shape[0]} entries but sigma has {idx.shape[0]}")
        # Float32 throughout, rounded op for op as bins * rho + ((1 - rho) * sum) / count with each bin's sum
        # taken sequentially in batch order (on the CPU; CUDA adds atomically): the seeded toy results that
        # notebooks 02-03 quote move with the last bit of the bin state (tests/test_losses.py pins it).
        # One index_add_ gives per-bin (sum, count); unlike bincount it does not sync a GPU with the host
        # and runs under use_deterministic_algorithms.
        src = torch.stack((r, torch.ones_like(r)), 1)
        stats = torch.zeros(self.num_bins, 2, device=r.device).index_add_(0, idx, src)
        if _distributed():
            dist.all_reduce(stats)
        sums, counts = stats.unbind(1)
        one_minus_rho = float(np.float32(1) - np.float32(self.ema_rate))  # as float32 arithmetic rounds it
        new = (self.bins * self.ema_rate).add_(sums.mul_(one_minus_rho).div_(counts))
        # bins without samples in the batch keep their state (their 0 / 0 above is not selected)
        torch.where(counts > 0, new, self.bins, out=self.bins)

    def forward(self, r: torch.Tensor, sigma: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Return r normalised by its bin's running mean (updating the state first if ``update``)."""
        if not self.enabled:
            return r.detach()
        idx = self.bin_index(sigma)
        if update:
            self.update(r, sigma, idx)
        return r.detach() / self.bins.clamp_min(self.eps).index_select(0, idx).to(r.dtype)
