"""Optional ipywidgets controls on top of the static figures: the lesson stands on the figure alone.

The import of ipywidgets is guarded: without it the functions print how to get the control and
return None (the static figure above the call already carries the lesson).
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from ..divergences import PAPER_NAMES
from . import exact as gaussian1d
from .plots import plot_fit_panel


def _ipywidgets() -> Any:
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


def show_mode_seeking_fit(div: str = "rkl", separation: float = 4.0, weight: float = 0.5, steps: int = 150,
                          lr: float = 0.1) -> gaussian1d.FitResult:
    """Fit and draw one Gaussian student for the widget (also callable directly)."""
    teacher = gaussian1d.bimodal(separation, weight)
    fit = gaussian1d.fit_gaussian(div, teacher, 1.0, 1.0, steps=steps, lr=lr)
    fig, ax = plt.subplots(figsize=(6, 3))
    plot_fit_panel(ax, teacher, fit, gaussian1d.modes_kept(fit, teacher), x_range=(-7.0, 7.0))
    ax.legend(fontsize="x-small", loc="upper left")
    plt.show()
    return fit


def mode_seeking_widget(div: str = "js", separation: float = 4.0, weight: float = 0.8, steps: int = 150,
                        lr: float = 0.1) -> Any:
    """Divergence / mode separation / weight-imbalance control over ``show_mode_seeking_fit``."""
    from ..divergences import canonical_name

    div = canonical_name(div)
    if div not in PAPER_NAMES:
        raise ValueError(f"the control offers the paper divergences {list(PAPER_NAMES)}; got {div!r}")
    w = _ipywidgets()
    if w is None:
        print("ipywidgets is not installed (pip install -e .[notebooks]); the static figure above shows the defaults")
        return None
    style = {"description_width": "initial"}
    return w.interactive(
        lambda div, separation, weight: show_mode_seeking_fit(div, separation, weight, steps, lr),
        div=w.Dropdown(options=list(PAPER_NAMES), value=div, description="divergence"),
        separation=w.FloatSlider(value=separation, min=1.0, max=6.0, step=0.5, description="mode separation",
                                 continuous_update=False, style=style),
        weight=w.FloatSlider(value=weight, min=0.5, max=max(0.95, weight), step=0.05, description="weight of left mode",
                             continuous_update=False, style=style),
    )
