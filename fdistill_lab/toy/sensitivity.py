"""One-factor-at-a-time sensitivity study on top of the toy grid (:mod:`fdistill_lab.toy.grid`; notebook 03).

An *axis* is a hyperparameter with a list of settings; each setting is a dict of toy settings (one, or several
that move together, e.g. ``ratio_min`` and ``ratio_max``), with an optional ``"label"`` for tables. The design
varies one axis at a time with the others at their defaults, for every divergence and seed; points shared by
several axes (all defaults) run once. ``axis_summary`` turns the grid's table into divergence x setting tables
of the mean and seed std of a metric; ``plot_heatmaps`` draws them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..divergences import names

Setting = dict[str, Any]
LABEL = "label"  # a setting's optional name in tables (not a toy setting)


def _settings(axis: str, values: Sequence[Any]) -> list[Setting]:
    if not values:
        raise ValueError(f"axis {axis!r} has no settings")
    return [dict(v) if isinstance(v, Mapping) else {axis: v} for v in values]


def _params(setting: Mapping[str, Any]) -> Setting:
    return {k: v for k, v in setting.items() if k != LABEL}


def setting_label(setting: Mapping[str, Any]) -> str:
    """Short label: its ``"label"`` if it has one, else the value for one parameter, ``a-b`` for two (e.g. a clip
    range 0.1-20)."""
    if LABEL in setting:
        return str(setting[LABEL])
    return "-".join(f"{v:g}" if isinstance(v, float) else str(v) for v in setting.values())


def ofat_points(divs: Sequence[str], seeds: Sequence[int], axes: Mapping[str, Sequence[Any]],
                defaults: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every (divergence, seed, axis setting) with all other axes at ``defaults``; duplicates dropped."""
    if not divs or not seeds:
        raise ValueError(f"need at least one divergence and one seed; got {divs}, {seeds}")
    base = dict(defaults)
    for axis, values in axes.items():
        for s in _settings(axis, values):
            missing = [k for k in _params(s) if k not in base]
            if missing:
                raise ValueError(f"axis {axis!r}: no default for {missing}; defaults: {sorted(base)}")
    points, seen = [], set()
    for axis, values in axes.items():
        for s in _settings(axis, values):
            for d in divs:
                for seed in seeds:
                    p = {"divergence": d, "seed": seed, **base, **_params(s)}
                    key = tuple(sorted((k, repr(v)) for k, v in p.items()))
                    if key not in seen:
                        seen.add(key)
                        points.append(p)
    return points


def _matches(table, setting: Mapping[str, Any]) -> np.ndarray:
    mask = np.ones(len(table), dtype=bool)
    for k, v in setting.items():
        col = table[k].to_numpy()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            mask &= np.isclose(col.astype(float), float(v), rtol=1e-9, atol=0)
        else:
            mask &= col == v
    return mask


def _at_other_defaults(axis: str, axes: Mapping[str, Sequence[Any]], defaults: Mapping[str, Any]) -> Setting:
    return {k: v for a in axes if a != axis for k, v in _settings(a, [defaults_for(a, axes, defaults)])[0].items()}


def seed_values(table, axis: str, values: Sequence[Any], defaults: Mapping[str, Any], metric: str,
                axes: Mapping[str, Sequence[Any]], divergence: str) -> dict[str, list[float]]:
    """``{setting label: [metric per seed, in seed order]}`` of one divergence along ``axis`` (finished runs, the
    other axes at their defaults): what :func:`fdistill_lab.stats.compare` pairs over seeds. ValueError when a
    setting has no runs or other seeds than the first (the pairing would be wrong)."""
    if metric not in table.columns:
        raise ValueError(f"metric {metric!r} is not a column of the sweep table; columns: {list(table.columns)}")
    done = table[(table["status"] == "done") & (table["divergence"] == divergence)]
    others = _at_other_defaults(axis, axes, defaults)
    out, seeds = {}, None
    for s in _settings(axis, values):
        rows = done[_matches(done, {**others, **_params(s)})].sort_values("seed")
        label = setting_label(s)
        if rows.empty:
            raise ValueError(f"no finished {divergence} run for {axis} = {label}")
        if seeds is None:
            seeds = list(rows["seed"])
        elif list(rows["seed"]) != seeds:
            raise ValueError(f"{divergence}, {axis} = {label}: seeds {list(rows['seed'])}, expected {seeds}")
        out[label] = [float(v) for v in rows[metric]]
    return out


def default_label(axis: str, axes: Mapping[str, Sequence[Any]], defaults: Mapping[str, Any]) -> str:
    """The label of ``axis``'s setting that equals its defaults (the baseline of its comparisons)."""
    default = defaults_for(axis, axes, defaults)
    return next((setting_label(s) for s in _settings(axis, axes[axis]) if _params(s) == default),
                setting_label(default))


def axis_summary(table, axis: str, values: Sequence[Any], defaults: Mapping[str, Any], metric: str,
                 axes: Mapping[str, Sequence[Any]]):
    """(mean, std, count) DataFrames, divergence x setting label, of ``metric`` over seeds.

    Only finished runs whose other axes sit at their defaults count. The std is the sample std over
    seeds (NaN with one seed).
    """
    import pandas as pd

    if metric not in table.columns:
        raise ValueError(f"metric {metric!r} is not a column of the sweep table; columns: {list(table.columns)}")
    done = table[table["status"] == "done"]
    others = _at_other_defaults(axis, axes, defaults)
    frames = []
    for s in _settings(axis, values):
        rows = done[_matches(done, {**others, **_params(s)})]
        frames.append(pd.DataFrame({"divergence": rows["divergence"], "setting": setting_label(s),
                                    "value": rows[metric]}))
    long = pd.concat(frames, ignore_index=True)
    order = [setting_label(s) for s in _settings(axis, values)]
    stats = long.groupby(["divergence", "setting"])["value"].agg(["mean", "std", "count"]).reset_index()
    seen = list(dict.fromkeys(table["divergence"]))  # rows in the paper's order, then any others as they come
    divs = [d for d in names() if d in seen] + [d for d in seen if d not in names()]
    pivot = {k: stats.pivot(index="divergence", columns="setting", values=k).reindex(index=divs, columns=order)
             for k in ("mean", "std", "count")}
    return pivot["mean"], pivot["std"], pivot["count"]


def defaults_for(axis: str, axes: Mapping[str, Sequence[Any]], defaults: Mapping[str, Any]) -> Setting:
    """The default setting of ``axis``: its parameters' values in ``defaults``."""
    keys = list(_params(_settings(axis, axes[axis])[0]))
    return {k: defaults[k] for k in keys}


def plot_heatmaps(table, axes: Mapping[str, Sequence[Any]], defaults: Mapping[str, Any], metric: str,
                  titles: Mapping[str, str] | None = None, cmap: str = "viridis_r", ncols: int = 2,
                  suptitle: str | None = None):
    """One seaborn heatmap per axis: mean of ``metric`` over seeds, annotated ``mean ± std`` (n seeds)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    n = len(axes)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.2 * nrows), squeeze=False)
    all_means = [axis_summary(table, a, v, defaults, metric, axes)[0] for a, v in axes.items()]
    finite = np.concatenate([m.to_numpy(dtype=float).ravel() for m in all_means])
    finite = finite[np.isfinite(finite)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for ax, (axis, values) in zip(axs.ravel(), axes.items()):
        mean, std, count = axis_summary(table, axis, values, defaults, metric, axes)
        annot = mean.copy().astype(object)
        for i in range(mean.shape[0]):
            for j in range(mean.shape[1]):
                m, s = mean.iat[i, j], std.iat[i, j]
                text = f"{m:.2f}" if np.isfinite(m) else ""
                annot.iat[i, j] = text + (f"\n±{s:.2f}" if np.isfinite(m) and np.isfinite(s) else "")
        sns.heatmap(mean.astype(float), annot=annot.to_numpy(), fmt="", cmap=cmap, vmin=vmin, vmax=vmax, ax=ax,
                    cbar=True, annot_kws={"fontsize": 8})
        default = default_label(axis, axes, defaults)
        seeds = int(np.nanmax(count.to_numpy(dtype=float))) if count.size else 0
        ax.set_title(f"{(titles or {}).get(axis, axis)} (default {default}; {seeds} seeds)")
        ax.set_xlabel("")
        ax.set_ylabel("")
    for ax in axs.ravel()[n:]:
        ax.set_visible(False)
    fig.suptitle(suptitle or f"{metric}: mean over seeds, ± seed std")
    fig.tight_layout()
    return fig
