"""Mode-coverage metrics of the 2-D toy lab (all computed from samples; teacher quantities exact).

Definitions (documented in notebook 02):
- A sample *belongs to* mode k if k is its nearest mode (in units of that mode's std) and it lies
  within ``radius_std`` (default 3) stds of it; otherwise it is *off-mode*.
- precision: fraction of student samples that belong to some mode (teacher samples: about 0.989 in 2-D).
- mode_mass[k]: share of the on-mode samples that belong to mode k (sums to 1); mass_error[k] =
  mode_mass[k] - w_k; mass_tv = 0.5 sum_k |mass_error[k]| (total variation between mode masses; 1, its
  maximum, when no sample is on a mode).
- mode k is *covered* if it gets at least ``cover_fraction`` (default 0.25) of its expected share w_k.
- recall: fraction of fresh teacher samples with a student sample within ``recall_radius_std`` (default 1)
  mode stds.
- KL estimates: the student density is a Gaussian KDE fitted on half the student samples (bandwidth
  picked from a small grid by held-out likelihood on the other half). Forward KL(p||q) = E_p[log p -
  log q_hat] on teacher samples; reverse KL(q||p) = E_q[log q_hat - log p] on the held-out half. The
  teacher log-density is exact. Both are biased by the KDE; forward KL grows very large when a mode
  is missed (log q_hat there is about -d^2 / (2 bandwidth^2)).
"""

from __future__ import annotations

import math

import torch

from ..mixtures import GaussianMixture

BANDWIDTHS = (0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4)


def _check_samples(x: torch.Tensor, teacher: GaussianMixture) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] != teacher.dim or x.shape[0] < 1:
        raise ValueError(f"samples must be [N, {teacher.dim}] with N >= 1; got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("samples contain NaN or inf")
    return x.detach().double()


def assign_modes(samples: torch.Tensor, teacher: GaussianMixture, radius_std: float = 3.0) -> torch.Tensor:
    """Index of the mode each sample belongs to, or -1 if off-mode (see module docstring)."""
    x = _check_samples(samples, teacher)
    if radius_std <= 0:
        raise ValueError(f"radius_std must be > 0; got {radius_std}")
    d = ((x[:, None, :] - teacher.means[None]) / teacher.stds[None]).pow(2).sum(-1).sqrt()  # [N, K]
    dist, idx = d.min(1)
    return torch.where(dist <= radius_std, idx, torch.full_like(idx, -1))


def mode_metrics(samples: torch.Tensor, teacher: GaussianMixture, radius_std: float = 3.0,
                 cover_fraction: float = 0.25) -> dict:
    """precision, mode_mass, mass_error, mass_tv, covered (per mode) and modes_covered."""
    if not 0 < cover_fraction <= 1:
        raise ValueError(f"cover_fraction must be in (0, 1]; got {cover_fraction}")
    idx = assign_modes(samples, teacher, radius_std)
    k = teacher.num_components
    counts = torch.bincount(idx[idx >= 0], minlength=k).double()
    on = float(counts.sum())
    mass = counts / on if on > 0 else counts
    w = teacher.weights
    err = mass - w
    covered = mass >= cover_fraction * w
    return {
        "precision": on / idx.shape[0],
        "mode_mass": mass.tolist(),
        "mass_error": err.tolist(),
        "mass_tv": 0.5 * float(err.abs().sum()) if on > 0 else 1.0,  # no mode mass at all: the worst case
        "covered": covered.tolist(),
        "modes_covered": int(covered.sum()),
    }


def recall(samples: torch.Tensor, teacher_samples: torch.Tensor, radius: float) -> float:
    """Fraction of teacher samples with at least one student sample within ``radius``."""
    if radius <= 0:
        raise ValueError(f"radius must be > 0; got {radius}")
    s, t = torch.as_tensor(samples).double(), torch.as_tensor(teacher_samples).double()
    if s.ndim != 2 or t.ndim != 2 or s.shape[1] != t.shape[1] or not len(s) or not len(t):
        raise ValueError(f"need non-empty samples [N, D] and teacher samples [M, D]; got {tuple(s.shape)}, "
                         f"{tuple(t.shape)}")
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(t).all())):
        raise ValueError("samples contain NaN or inf")
    hit = torch.cat([torch.cdist(chunk, s).min(1).values <= radius for chunk in t.split(1024)])
    return float(hit.double().mean())


def kde_log_prob(centers: torch.Tensor, x: torch.Tensor, bandwidths) -> torch.Tensor:
    """log q_hat(x) of the isotropic Gaussian KDE on ``centers``, for each bandwidth: [len(bandwidths), N].

    Same density as ``student_kde(centers, bw).log_prob(x)``, computed from one distance matrix.
    """
    c, x = centers.double(), x.double()
    d2 = torch.cdist(x, c).pow(2)  # [N, M]
    out = []
    for bw in bandwidths:
        if bw <= 0:
            raise ValueError(f"bandwidths must be > 0; got {bw}")
        norm = math.log(c.shape[0]) + 0.5 * c.shape[1] * math.log(2 * math.pi * bw**2)
        out.append(torch.logsumexp(-d2 / (2 * bw**2), dim=1) - norm)
    return torch.stack(out)


def select_bandwidth(fit: torch.Tensor, held_out: torch.Tensor, bandwidths=BANDWIDTHS) -> float:
    """KDE bandwidth from ``bandwidths`` with the largest mean held-out log-likelihood."""
    if len(bandwidths) == 0:
        raise ValueError("bandwidths must not be empty")
    scores = kde_log_prob(fit, held_out, bandwidths).mean(1)
    return float(bandwidths[int(scores.argmax())])


def kl_estimates(samples: torch.Tensor, teacher: GaussianMixture, n_teacher: int = 2000,
                 generator: torch.Generator | None = None, bandwidths=BANDWIDTHS) -> dict:
    """Forward KL(p||q) and reverse KL(q||p) with a KDE student density (see module docstring)."""
    x = _check_samples(samples, teacher)
    if x.shape[0] < 4:
        raise ValueError(f"need at least 4 student samples for the KDE estimates; got {x.shape[0]}")
    perm = torch.randperm(x.shape[0], generator=generator)
    fit, held = x[perm[: x.shape[0] // 2]], x[perm[x.shape[0] // 2:]]
    bw = select_bandwidth(fit, held, bandwidths)
    y = teacher.sample(n_teacher, generator=generator)
    fkl = float((teacher.log_prob(y) - kde_log_prob(fit, y, [bw])[0]).mean())
    rkl = float((kde_log_prob(fit, held, [bw])[0] - teacher.log_prob(held)).mean())
    return {"fkl": fkl, "rkl": rkl, "kde_bandwidth": bw}


def evaluate_samples(samples: torch.Tensor, teacher: GaussianMixture, n_teacher: int = 2000, seed: int = 0,
                     radius_std: float = 3.0, cover_fraction: float = 0.25, recall_radius_std: float = 1.0) -> dict:
    """All toy metrics of a set of student samples as a JSON-friendly dict."""
    g = torch.Generator().manual_seed(seed)
    out = mode_metrics(samples, teacher, radius_std, cover_fraction)
    y = teacher.sample(n_teacher, generator=g)
    out["recall"] = recall(samples, y, recall_radius_std * float(teacher.stds.mean()))
    out.update(kl_estimates(samples, teacher, n_teacher, g))
    return out


def summarize(runs: list[dict], keys=("modes_covered", "precision", "recall", "mass_tv", "fkl", "rkl")) -> dict:
    """Mean and sample std over runs (seeds) of the scalar metrics ``keys``; std is 0 for one run and NaN when a
    run's value is not finite (an infinite KL estimate, say), rather than a reassuring 0."""
    if not runs:
        raise ValueError("runs must not be empty")
    out = {}
    for k in keys:
        v = torch.tensor([float(r[k]) for r in runs], dtype=torch.float64)
        std = float("nan") if not bool(torch.isfinite(v).all()) else float(v.std()) if len(v) > 1 else 0.0
        out[k] = {"mean": float(v.mean()), "std": std}
    return out
