"""Figures of the 2-D toy lab (notebook 02): samples over the teacher density, mode-mass bars,
training curves, and the paper's Fig. 2 analogue (score disagreement and the weight h).

Every function returns the matplotlib Figure; nothing is shown or saved here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from .. import stats
from ..divergences import get as get_divergence
from ..mixtures import GaussianMixture
from .trainer import EVALUATION_KEYS


def _label(name: str) -> str:
    try:
        return get_divergence(name).label
    except ValueError:
        return name


def teacher_density_image(teacher: GaussianMixture, lim: float = 3.0, res: int = 150,
                          sigma: float = 0.0) -> tuple[np.ndarray, list[float]]:
    """Teacher log-density p_sigma on a res x res grid over [-lim, lim]^2, and the imshow extent."""
    xs = torch.linspace(-lim, lim, res, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    logp = teacher.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1), sigma).reshape(res, res)
    return logp.numpy(), [-lim, lim, -lim, lim]


def _density_background(ax, teacher: GaussianMixture, lim: float) -> None:
    logp, extent = teacher_density_image(teacher, lim)
    # square root of the density, so that the 0.03-weight modes stay visible next to the 0.30 one
    ax.imshow(np.exp(0.5 * logp), origin="lower", extent=extent, cmap="Greys", alpha=0.8)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_samples(samples: Mapping[str, torch.Tensor], teacher: GaussianMixture, titles: Mapping[str, str] | None = None,
                 lim: float = 3.0, max_points: int = 2000, ncols: int = 4) -> Figure:
    """One panel per entry: student samples (orange) over the teacher density (grey, square-root scale)."""
    if not samples:
        raise ValueError("samples must not be empty")
    n = len(samples)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (name, x) in zip(axes.flat, samples.items()):
        _density_background(ax, teacher, lim)
        x = torch.as_tensor(x).detach()[:max_points].numpy()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.35, color="tab:orange", rasterized=True)
        ax.set_title((titles or {}).get(name, _label(name)))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_mode_mass(mass: Mapping[str, np.ndarray], weights: torch.Tensor | np.ndarray) -> Figure:
    """Grouped bars: per mode, the true weight and each divergence's mode mass (mean over seeds, error bar: its 95%
    t interval, :func:`fdistill_lab.stats.mean_interval`).

    ``mass[name]`` is [seeds, K] (or [K] for one run).
    """
    if not mass:
        raise ValueError("mass must not be empty")
    w = np.asarray(weights, dtype=float)
    k = len(w)
    names = list(mass)
    width = 0.8 / (len(names) + 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * k), 3.8))
    pos = np.arange(k)
    ax.bar(pos - 0.4 + width / 2, w, width, color="black", alpha=0.7, label="teacher weight")
    palette = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        m = np.atleast_2d(np.asarray(mass[name], dtype=float))
        if m.shape[1] != k:
            raise ValueError(f"mass[{name!r}] has {m.shape[1]} modes; teacher has {k}")
        err = None
        if m.shape[0] > 1:
            bounds = [stats.mean_interval(m[:, j]) for j in range(k)]
            err = np.array([[iv.mean - iv.low for iv in bounds], [iv.high - iv.mean for iv in bounds]])
        ax.bar(pos - 0.4 + width * (i + 1.5), m.mean(0), width, yerr=err, capsize=2, color=palette(i % 10),
               label=_label(name))
    ax.set_xticks(pos, [f"mode {j}\nw={w[j]:.2f}" for j in range(k)], fontsize=8)
    ax.set_ylabel("share of on-mode samples")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def plot_training_curves(runs: Mapping[str, Sequence], keys: Sequence[str] = ("modes_covered", "mass_tv", "precision",
                                                                            "weight_std"),
                         smooth: int = 25) -> Figure:
    """Curves per divergence (mean over seeds, band = min..max); ``runs[name]`` is a list of trained
    :class:`~fdistill_lab.toy.trainer.ToyTrainer` (``Comparison.runs``), each read with its ``curve(key)``.

    Evaluation metrics are plotted at their evaluations; logged quantities at the iterations that log them,
    smoothed with a moving average of ``smooth`` points. ``weight_std`` is the in-batch std of the normalised h
    (0 for reverse KL; large for forward KL and Jeffreys, the paper's "high variance").
    """
    if not runs:
        raise ValueError("runs must not be empty")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    palette = plt.get_cmap("tab10")
    for ax, key in zip(axes[0], keys):
        for i, (name, trained) in enumerate(runs.items()):
            curves = [run.curve(key) for run in trained]
            curves = [(np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in curves if len(y)]
            if not curves:
                continue
            n = min(len(y) for _, y in curves)
            y = np.stack([c[:n] for _, c in curves])
            x = curves[0][0][:n]
            if key not in EVALUATION_KEYS and smooth > 1 and n >= smooth:
                kern = np.ones(smooth) / smooth
                y = np.stack([np.convolve(c, kern, mode="valid") for c in y])
                x = x[-y.shape[1]:]
            ax.plot(x, y.mean(0), color=palette(i % 10), label=_label(name))
            if y.shape[0] > 1:
                ax.fill_between(x, y.min(0), y.max(0), color=palette(i % 10), alpha=0.15)
        ax.set_title({"weight_std": "std of normalised h in the batch"}.get(key, key))
        ax.set_xlabel("iteration")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_score_disagreement(data: Mapping[str, torch.Tensor], teacher: GaussianMixture, sigma: float,
                            lim: float = 3.0) -> Figure:
    """Paper Fig. 2 analogue from ``toy.score_disagreement``: where teacher and fake scores disagree, and
    the weight h each divergence puts there (colour = log10 of h normalised to mean 1; red = above the mean
    weight, blue = below), plus h against the disagreement."""
    hkeys = [k for k in data if k.startswith("h_")]
    if not hkeys:
        raise ValueError("data has no h_<divergence> entries")
    x = data["x_t"].detach().numpy()
    dis = data["disagreement"].detach().numpy()
    ncols = 2 + len(hkeys)
    fig, axes = plt.subplots(1, ncols, figsize=(3.3 * ncols, 3.4))
    logp, extent = teacher_density_image(teacher, lim, sigma=sigma)
    ax = axes[0]
    im = ax.scatter(x[:, 0], x[:, 1], c=dis, s=3, cmap="magma", rasterized=True)
    ax.contour(np.exp(logp), extent=extent, levels=5, colors="tab:blue", linewidths=0.6)
    ax.set_title(f"disagreement, sigma = {sigma:g}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    logh = {k: np.log10(np.clip(data[k].detach().numpy(), 1e-6, None)) for k in hkeys}
    span = max(0.1, max(float(np.quantile(np.abs(v), 0.98)) for v in logh.values()))
    for ax, key in zip(axes[1:1 + len(hkeys)], hkeys):
        im = ax.scatter(x[:, 0], x[:, 1], c=logh[key], s=3, cmap="coolwarm", vmin=-span, vmax=span,
                        rasterized=True)
        ax.contour(np.exp(logp), extent=extent, levels=5, colors="tab:blue", linewidths=0.6)
        ax.set_title(f"log10 h, {_label(key[2:])}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes[:-1]:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    ax = axes[-1]
    order = np.argsort(dis)
    bins = np.array_split(order, 10)
    for i, key in enumerate(hkeys):
        h = data[key].detach().numpy()
        ax.plot([dis[b].mean() for b in bins], [h[b].mean() for b in bins], "o-", ms=3,
                color=plt.get_cmap("tab10")(i), label=_label(key[2:]))
    ax.set_yscale("log")
    ax.set_xlabel("disagreement (decile means)")
    ax.set_ylabel("mean normalised h")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
