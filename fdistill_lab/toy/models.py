"""Networks of the 2-D toy lab: one-step generator, EDM-preconditioned fake score, noisy discriminator,
and the exact "oracle" model of the student (a Gaussian kernel density of its samples).

All three networks are small SiLU MLPs. Noise levels enter as Fourier features of
c_noise = ln(sigma) / 4 (EDM's noise conditioning). Paper sections 6-8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..edm import precond
from ..mixtures import SharedStdMixture


def mlp(in_dim: int, hidden: int, out_dim: int, depth: int = 3) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden`` with SiLU, then a linear output layer."""
    if min(in_dim, hidden, out_dim, depth) < 1:
        raise ValueError(f"in_dim, hidden, out_dim, depth must be >= 1; got {in_dim}, {hidden}, {out_dim}, {depth}")
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class SigmaEmbedding(nn.Module):
    """Fixed Fourier features [cos, sin](2 pi f_j c_noise) of c_noise = ln(sigma)/4, plus c_noise itself."""

    def __init__(self, num_freqs: int = 8, max_freq: float = 4.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.linspace(0.25, max_freq, num_freqs), persistent=False)
        self.dim = 2 * num_freqs + 1

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        c = sigma.float().clamp_min(1e-12).log().reshape(-1, 1) / 4
        arg = 2 * math.pi * c * self.freqs
        return torch.cat([c, arg.cos(), arg.sin()], dim=1)


class ToyGenerator(nn.Module):
    """One-step student x = G(z), z ~ N(0, I_{z_dim}).

    ``init_center`` / ``init_scale`` place the initial samples: the output layer is scaled by
    ``init_scale`` and its bias set to ``init_center``, so G starts as a small blob at that point
    (a student "collapsed to one region", the setting where mode-seeking shows).
    """

    def __init__(self, z_dim: int = 2, hidden: int = 64, depth: int = 3, out_dim: int = 2,
                 init_center: Sequence[float] | None = None, init_scale: float = 1.0) -> None:
        super().__init__()
        self.z_dim, self.out_dim = z_dim, out_dim
        self.net = mlp(z_dim, hidden, out_dim, depth)
        last = self.net[-1]
        with torch.no_grad():
            last.weight.mul_(init_scale)
            last.bias.mul_(init_scale)
            if init_center is not None:
                c = torch.as_tensor(init_center, dtype=last.bias.dtype)
                if c.shape != (out_dim,):
                    raise ValueError(f"init_center must have {out_dim} entries; got {tuple(c.shape)}")
                last.bias.add_(c)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples (with gradient; wrap in ``torch.no_grad()`` for evaluation)."""
        z = torch.randn(n, self.z_dim, generator=generator, device=self.net[0].weight.device)
        return self(z)


class ToyDenoiser(nn.Module):
    """Fake score as an EDM denoiser D(x; sigma) = c_skip x + c_out F(c_in x, emb(sigma)) (x0-prediction).

    ``sigma_data`` is the data scale used by the preconditioning (about 1.4 per coordinate for a radius-2 ring).
    """

    def __init__(self, dim: int = 2, hidden: int = 64, depth: int = 3, sigma_data: float = 1.4) -> None:
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0; got {sigma_data}")
        self.sigma_data = sigma_data
        self.embed = SigmaEmbedding()
        self.net = mlp(dim + self.embed.dim, hidden, dim, depth)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1)
        c_skip, c_out, c_in, _ = precond(s, self.sigma_data)
        f = self.net(torch.cat([c_in * x, self.embed(s)], dim=1))
        return c_skip * x + c_out * f


class ToyDiscriminator(nn.Module):
    """Logit l(x_t, sigma) on noisy samples; real (teacher) is positive, so exp(l) estimates p_t / q_t."""

    def __init__(self, dim: int = 2, hidden: int = 64, depth: int = 3, sigma_data: float = 1.4) -> None:
        super().__init__()
        self.sigma_data = sigma_data
        self.embed = SigmaEmbedding()
        self.net = mlp(dim + self.embed.dim, hidden, 1, depth)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1)
        c_in = 1.0 / (s**2 + self.sigma_data**2).sqrt()
        return self.net(torch.cat([c_in * x, self.embed(s)], dim=1)).squeeze(1)


def student_kde(samples: torch.Tensor, bandwidth: float) -> SharedStdMixture:
    """The oracle's model of the student: a Gaussian KDE, q_hat = mean_i N(x_i, bandwidth^2 I).

    It is a Gaussian mixture, so q_hat noised at sigma (bandwidth^2 + sigma^2), its score, its exact
    denoiser and the ratio p_sigma / q_hat_sigma to an analytic teacher are closed form.
    """
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0; got {bandwidth}")
    if samples.ndim != 2 or samples.shape[0] < 1:
        raise ValueError(f"samples must be [N, D] with N >= 1; got {tuple(samples.shape)}")
    return SharedStdMixture(samples.detach().double(), float(bandwidth))
