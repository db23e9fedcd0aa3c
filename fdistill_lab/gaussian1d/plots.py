"""Static figures for the notebooks (seaborn/matplotlib); each returns the Figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .. import divergences
from ..mixtures import GaussianMixture
from .exact import FitResult


def plot_f_and_h(names: Sequence[str] | None = None, r_min: float = 0.05, r_max: float = 20.0) -> Figure:
    """f(r) and h(r)/h(1) for each divergence (paper Fig. 3), log-spaced r (the ratio p/q)."""
    names = list(names or divergences.names())
    r = torch.logspace(np.log10(r_min), np.log10(r_max), 200, dtype=torch.float64)
    frames = []
    for n in names:
        d = divergences.get(n)
        h1 = float(d.h(torch.tensor(1.0, dtype=torch.float64)))
        frames.append(pd.DataFrame({"r": r.numpy(), "f(r)": d.f(r).numpy(), "h(r) / h(1)": d.h(r).numpy() / h1,
                                    "divergence": d.label}))
    df = pd.concat(frames, ignore_index=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    sns.lineplot(df, x="r", y="f(r)", hue="divergence", ax=axes[0], legend=False)
    sns.lineplot(df, x="r", y="h(r) / h(1)", hue="divergence", ax=axes[1])
    axes[0].set(xscale="log", ylim=(-1.5, 4), title="generator f(r), f(1) = 0")
    axes[1].set(xscale="log", yscale="log", title="weight h(r) = r^2 f''(r), scaled so h(1) = 1")
    for ax in axes:
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("r = p / q  (teacher / student density)")
    axes[1].legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    return fig


def plot_gradient_check(estimator: Mapping[str, float], finite_diff: Mapping[str, float]) -> Figure:
    """Estimator -E_q[h (s_p - s_q)] against finite differences of D_f, one point per divergence."""
    names = list(estimator)
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    x = np.array([finite_diff[n] for n in names])
    y = np.array([estimator[n] for n in names])
    lims = [min(x.min(), y.min()) * 1.1, max(x.max(), y.max(), 0.0) * 1.1 + 0.05]
    ax.plot(lims, lims, color="grey", lw=0.8, ls="--", label="y = x")
    for n, xi, yi in zip(names, x, y):
        ax.scatter(xi, yi, s=40, label=divergences.get(n).label)
    ax.set(xlabel="finite differences of D_f (quadrature)", ylabel="f-distill estimator",
           title="d D_f / d mean: estimator vs finite differences")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_normalized_variance(mus: Sequence[float], values: Mapping[str, Sequence[float]]) -> Figure:
    """Var_q[h] / E_q[h]^2 against the mean shift mu (paper Fig. 4a), symlog y axis (reverse KL is 0)."""
    rows = [{"mean shift mu": m, "normalised variance of h": v, "divergence": divergences.get(n).label}
            for n, vals in values.items() for m, v in zip(mus, vals)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sns.lineplot(pd.DataFrame(rows), x="mean shift mu", y="normalised variance of h", hue="divergence",
                 marker="o", ax=ax)
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_title("Var_q[h(r)] / E_q[h(r)]^2,  p = N(mu, 1), q = N(0, 1)")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


def _density(mix: GaussianMixture, x: torch.Tensor) -> np.ndarray:
    return mix.log_prob(x[:, None]).exp().numpy()


def plot_fit_panel(ax: Axes, teacher: GaussianMixture, fit: FitResult, modes: int | None = None,
                   x_range: tuple[float, float] | None = None) -> None:
    """Teacher density (filled), the student's start (dashed) and end (solid) on one axis."""
    means = teacher.means[:, 0]
    lo, hi = x_range or (float(means.min()) - 4.0, float(means.max()) + 4.0)
    x = torch.linspace(lo, hi, 600, dtype=torch.float64)
    xs = x.numpy()
    ax.fill_between(xs, _density(teacher, x), color="0.8", label="teacher p")
    for i, ls, label in ((0, "--", "student start"), (-1, "-", "student end")):
        m, s = float(fit.mean[i]), float(fit.std[i])
        ax.plot(xs, np.exp(-0.5 * ((xs - m) / s) ** 2) / (s * np.sqrt(2 * np.pi)), ls=ls, label=label)
    d = divergences.get(fit.divergence)
    kept = "" if modes is None else f", {modes} mode{'s' if modes != 1 else ''} kept"
    ax.set_title(f"{d.label}: N({fit.mean[-1]:.2f}, {fit.std[-1]:.2f}^2){kept}", fontsize="small")
    ax.set_yticks([])


def plot_gaussian_fits(teacher: GaussianMixture, fits: Sequence[FitResult],
                       modes: Mapping[str, int] | None = None, ncols: int = 3) -> Figure:
    """One panel per divergence: Gaussian student fitted to the teacher by the exact f-distill gradient."""
    nrows = -(-len(fits) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), sharex=True, squeeze=False)
    for ax, fit in zip(axes.flat, fits):
        plot_fit_panel(ax, teacher, fit, None if modes is None else modes[fit.divergence])
    for ax in list(axes.flat)[len(fits):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="x-small", loc="upper left")
    fig.tight_layout()
    return fig
