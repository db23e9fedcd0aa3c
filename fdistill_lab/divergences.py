"""The f-divergence family of f-distill (paper Table 1) and a few beyond it.

D_f(p || q) = E_q[f(p/q)] with f convex and f(1) = 0. The student gradient weights the score
difference by h(r) = r^2 f''(r) (paper section 2 / Fig. 1), so each divergence is fully described
for training by h. Constant factors of h do not matter (h is normalised by its batch mean).

Public API: ``get(name, **params)``, ``names()``, ``aliases()``, and the ``Divergence`` objects with
``f(r)``, ``h(r)``, ``weight_from_logit(l)`` (h(exp l), stable for |l| <= 50 in float64) and the
descriptive attributes ``mode_seeking``, ``bounded``, ``variance``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """One f-divergence: generator f, weight h = r^2 f'' and descriptive labels.

    Attributes:
        name: canonical name (see ``names()``).
        label: human-readable name for tables and figures.
        mode_seeking: "yes" / "medium" / "no" (paper Table 1 column "Mode-seeking").
        bounded: True if the divergence saturates (Table 1 "Saturating"): D_f(p||q) = E_q[f(p/q)] stays bounded
            however far apart p and q are, because f(0) and lim f(r)/r are finite (f itself may grow, as JS's does).
        variance: paper's variance label of h under q ("-", "low", "high"; "n/a" outside the paper).
        params: extra parameters (e.g. {"alpha": 0.5}).
    """

    name: str
    label: str
    f_fn: Fn = field(repr=False)
    h_fn: Fn = field(repr=False)
    logit_fn: Fn = field(repr=False)
    mode_seeking: str
    bounded: bool
    variance: str
    in_paper: bool
    params: dict = field(default_factory=dict)

    def f(self, r: torch.Tensor) -> torch.Tensor:
        """Generator f(r) of D_f(p||q) = E_q[f(p/q)]."""
        return self.f_fn(_as_tensor(r))

    def h(self, r: torch.Tensor) -> torch.Tensor:
        """Weight h(r) = r^2 f''(r), closed form."""
        return self.h_fn(_as_tensor(r))

    def weight_from_logit(self, logit: torch.Tensor) -> torch.Tensor:
        """h(exp(logit)) computed directly from the log-ratio (e.g. JS: sigmoid(logit))."""
        return self.logit_fn(_as_tensor(logit))

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        return self.h(r)

    def __reduce__(self) -> tuple:
        """Pickle by name and parameters (its functions are lambdas), so trainers that hold a divergence can be
        sent between processes (``toy.run_comparison(workers=...)``)."""
        return _rebuild, (self.name, dict(self.params))


def _as_tensor(x: torch.Tensor | float) -> torch.Tensor:
    if torch.is_tensor(x):
        return x
    return torch.as_tensor(x, dtype=torch.get_default_dtype())


def _xlogx(r: torch.Tensor) -> torch.Tensor:
    return torch.xlogy(r, r)


# ------------------------------------------------------------------------------ paper Table 1

def _rkl() -> Divergence:
    return Divergence(
        "rkl", "reverse KL", lambda r: -torch.log(r), torch.ones_like, torch.ones_like,
        mode_seeking="yes", bounded=False, variance="-", in_paper=True)


def _srkl() -> Divergence:
    # f = (r+1) log((r+1)/(2r)); f'' = 1 / (r^2 (r+1)); h = 1/(r+1) = sigmoid(-l)
    return Divergence(
        "srkl", "softened reverse KL",
        lambda r: (r + 1) * (torch.log1p(r) - torch.log(2 * r)),
        lambda r: 1 / (r + 1), lambda l: torch.sigmoid(-l),
        mode_seeking="yes", bounded=False, variance="low", in_paper=True)


def _js() -> Divergence:
    # f = r log r - (r+1) log((r+1)/2); f'' = 1/(r (r+1)); h = r/(r+1) = sigmoid(l)
    return Divergence(
        "js", "Jensen-Shannon",
        lambda r: _xlogx(r) - (r + 1) * (torch.log1p(r) - math.log(2)),
        lambda r: r / (r + 1), torch.sigmoid,
        mode_seeking="medium", bounded=True, variance="low", in_paper=True)


def _sh() -> Divergence:
    # f = 1 - sqrt(r); f'' = r^{-3/2}/4; h = sqrt(r)/4
    return Divergence(
        "sh", "squared Hellinger", lambda r: 1 - torch.sqrt(r), lambda r: torch.sqrt(r) / 4,
        lambda l: torch.exp(l / 2) / 4,
        mode_seeking="medium", bounded=True, variance="low", in_paper=True)


def _fkl() -> Divergence:
    return Divergence(
        "fkl", "forward KL", _xlogx, lambda r: r, torch.exp,
        mode_seeking="no", bounded=False, variance="high", in_paper=True)


def _jeffreys() -> Divergence:
    # f = (r-1) log r; f'' = 1/r + 1/r^2; h = r + 1
    return Divergence(
        "jeffreys", "Jeffreys", lambda r: (r - 1) * torch.log(r), lambda r: r + 1,
        lambda l: torch.exp(l) + 1,
        mode_seeking="no", bounded=False, variance="high", in_paper=True)


# ------------------------------------------------------------------------------ beyond the paper

def _neyman() -> Divergence:
    # Neyman chi^2 / 2: f = (1-r)^2 / (2r); f'' = 1/r^3; h = 1/r
    return Divergence(
        "neyman", "Neyman chi^2", lambda r: (1 - r) ** 2 / (2 * r), lambda r: 1 / r,
        lambda l: torch.exp(-l),
        mode_seeking="yes", bounded=False, variance="n/a", in_paper=False)


def _pearson() -> Divergence:
    # Pearson chi^2 / 2: f = (r-1)^2 / 2; f'' = 1; h = r^2
    return Divergence(
        "pearson", "Pearson chi^2", lambda r: (r - 1) ** 2 / 2, lambda r: r**2,
        lambda l: torch.exp(2 * l),
        mode_seeking="no", bounded=False, variance="n/a", in_paper=False)


ALPHA_RANGE = (-5.0, 5.0)


def _alpha(alpha: float = 0.5) -> Divergence:
    """Alpha family (Amari): f = (r^a - a r - (1 - a)) / (a (a - 1)), f'' = r^(a-2), h = r^a.

    a -> 1 gives forward KL (h = r), a -> 0 reverse KL (h = 1), a = 0.5 is 4x squared Hellinger.
    """
    valid = f"alpha must be a number in [{ALPHA_RANGE[0]}, {ALPHA_RANGE[1]}]; got {alpha!r}"
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(valid) from None
    if not (ALPHA_RANGE[0] <= a <= ALPHA_RANGE[1]):
        raise ValueError(valid)
    if a == 1.0:
        f = lambda r: _xlogx(r) - r + 1  # noqa: E731
    elif a == 0.0:
        f = lambda r: -torch.log(r) + r - 1  # noqa: E731
    else:
        f = lambda r: (r**a - a * r - (1 - a)) / (a * (a - 1))  # noqa: E731
    mode = "yes" if a <= 0 else ("medium" if a < 1 else "no")
    return Divergence(
        "alpha", f"alpha ({a:g})", f, lambda r: r**a, lambda l: torch.exp(a * l),
        mode_seeking=mode, bounded=False, variance="n/a", in_paper=False, params={"alpha": a})


_FACTORIES: dict[str, Callable[..., Divergence]] = {
    "rkl": _rkl, "srkl": _srkl, "js": _js, "sh": _sh, "fkl": _fkl, "jeffreys": _jeffreys,
    "neyman": _neyman, "pearson": _pearson, "alpha": _alpha,
}

_ALIASES: dict[str, str] = {
    "reverse-kl": "rkl", "reverse_kl": "rkl", "dmd2": "rkl", "vsd": "rkl",
    "softened-rkl": "srkl", "sf": "srkl",
    "jensen-shannon": "js", "jensen_shannon": "js",
    "hellinger": "sh", "squared-hellinger": "sh",
    "forward-kl": "fkl", "forward_kl": "fkl", "kl": "fkl",
    "jf": "jeffreys",
    "neyman-chi2": "neyman", "pearson-chi2": "pearson", "chi2": "pearson",
}

PAPER_NAMES: tuple[str, ...] = ("rkl", "srkl", "js", "sh", "fkl", "jeffreys")


def names() -> list[str]:
    """Canonical divergence names: the paper's six, then neyman, pearson, alpha."""
    return list(_FACTORIES)


def aliases() -> dict[str, str]:
    """Accepted alternative names and the canonical name each maps to."""
    return dict(_ALIASES)


def canonical_name(name: str) -> str:
    """Resolve a name or alias (case-insensitive) to its canonical name, or raise ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"divergence name must be a string; got {type(name).__name__} {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _FACTORIES:
        raise ValueError(
            f"unknown divergence {name!r}; valid names: {', '.join(names())} "
            f"(aliases: {', '.join(sorted(_ALIASES))})")
    return key


def get(name: str | Divergence, **params) -> Divergence:
    """Return the divergence called ``name`` (canonical or alias). ``alpha`` takes ``alpha=``."""
    if isinstance(name, Divergence):
        if params:
            raise ValueError("parameters cannot be given with a Divergence object")
        return name
    key = canonical_name(name)
    if params and key != "alpha":
        raise ValueError(f"divergence {key!r} takes no parameters; got {sorted(params)}")
    unknown = set(params) - {"alpha"}
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for 'alpha'; valid: ['alpha']")
    return _FACTORIES[key](**params)


def _rebuild(name: str, params: dict) -> Divergence:
    return get(name, **params)


def table() -> list[dict]:
    """Rows describing every divergence (for the notebooks' property tables)."""
    rows = []
    for n in names():
        d = get(n)
        rows.append({"name": d.name, "label": d.label, "mode_seeking": d.mode_seeking,
                     "bounded": d.bounded, "variance": d.variance, "in_paper": d.in_paper})
    return rows

