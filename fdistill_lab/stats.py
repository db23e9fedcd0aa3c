"""Statistics over seeds, once, for every results table of notebooks 02-04.

A result is reported as its mean with a 95% interval over seeds (``mean_interval``: Student-t, or a BCa bootstrap),
and a comparison against a baseline as the interval of the paired difference over the same seeds
(``paired_difference``; pairing removes the seed-to-seed spread that both runs share). A difference is stated only
when its interval excludes zero; otherwise the text says "no measurable difference" (``compare``, ``verdict_text``).
One seed gives no interval (NaN bounds); values that are all equal (to rounding) give a zero-width one.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

METHODS = ("t", "bootstrap")
NO_DIFFERENCE = "no measurable difference"
# scipy >= 1.15 seeds bootstrap with ``rng``; older versions call it ``random_state``
_BOOTSTRAP_SEED_ARG = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
_LABELS = {"t": "t", "bootstrap": "BCa bootstrap"}


def _number(x: float, digits: int, signed: bool = False) -> str:
    """``x`` to ``digits`` significant digits, trailing zeros kept (0.79 -> "0.790"), no dangling point."""
    if math.isnan(x):
        return "nan"
    text = f"{x:{'+' if signed else ''}#.{digits}g}"
    text = text.replace(".e", "e")
    return text[:-1] if text.endswith(".") else text


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds with its ``confidence`` interval [low, high], computed by ``method``."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    method: str

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero (False for NaN bounds)."""
        return bool(self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict, NaN as None."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """``"0.812 [0.790, 0.834]"`` with ``digits`` significant digits (``signed``: "+0.12 [+0.05, +0.19]", for a
        difference)."""
        mean, low, high = (_number(v, digits, signed) for v in (self.mean, self.low, self.high))
        return f"{mean} [{low}, {high}]"

    def __str__(self) -> str:
        return self.format()


def _check_options(confidence: float, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown interval method {method!r}; valid methods: {', '.join(map(repr, METHODS))}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def _as_values(values: Sequence[float] | np.ndarray, what: str = "values") -> np.ndarray:
    """``values`` as a non-empty 1-D float array of finite numbers; ValueError otherwise."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a sequence of numbers: {err}") from err
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence of numbers (one per seed), got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{what} has non-finite entries {array[bad].tolist()} at positions {bad.tolist()}; "
                         "fix or drop those seeds (in every run compared) first")
    return array


def _interval(array: np.ndarray, confidence: float, method: str, n_resamples: int, seed: int,
              scale: float) -> Interval:
    """The interval of ``array``'s mean; a spread within rounding of inputs of size ``scale`` counts as none."""
    n = int(array.size)
    if n == 1:  # an interval needs two seeds
        return Interval(float(array[0]), math.nan, math.nan, 1, confidence, method)
    spread = float(np.ptp(array))
    if spread <= 4 * np.finfo(float).eps * scale:  # no spread: scipy's t and BCa give NaN or warn here
        value = float(array[0]) if spread == 0 else float(np.mean(array))
        return Interval(value, value, value, n, confidence, method)
    if method == "t":
        low, high = stats.ttest_1samp(array, 0.0).confidence_interval(confidence_level=confidence)
    else:
        result = stats.bootstrap((array,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                                 method="BCa", **{_BOOTSTRAP_SEED_ARG: np.random.default_rng(seed)})
        low, high = result.confidence_interval
    return Interval(float(np.mean(array)), float(low), float(high), n, confidence, method)


def mean_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95, method: str = "t",
                  n_resamples: int = 9999, seed: int = 0) -> Interval:
    """The mean of per-seed ``values`` with its ``confidence`` interval: Student-t (``"t"``) or BCa ``"bootstrap"``
    (``n_resamples`` resamples drawn from ``seed``)."""
    _check_options(confidence, method)
    array = _as_values(values)
    return _interval(array, confidence, method, n_resamples, seed, float(np.max(np.abs(array))))


def paired_difference(values: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray,
                      confidence: float = 0.95, method: str = "t", n_resamples: int = 9999,
                      seed: int = 0) -> Interval:
    """The interval of mean(values[i] - baseline[i]); entry i of both must come from the same seed."""
    _check_options(confidence, method)
    a, b = _as_values(values, "values"), _as_values(baseline, "baseline")
    if a.size != b.size:
        raise ValueError(f"paired values need one entry per seed in both: values has {a.size}, baseline {b.size}")
    scale = float(max(np.max(np.abs(a)), np.max(np.abs(b))))  # rounding in a - b is relative to a and b
    return _interval(a - b, confidence, method, n_resamples, seed, scale)


def _verdict(interval: Interval, higher_is_better: bool) -> str:
    if not interval.excludes_zero():
        return NO_DIFFERENCE
    return "better" if (interval.low > 0) == higher_is_better else "worse"


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def compare(metrics: Mapping[str, Sequence[float]], baseline: str, higher_is_better: bool = True,
            **kwargs: Any) -> list[dict]:
    """One row per name of ``metrics`` (name -> per-seed values, seeds aligned): its mean and interval, the paired
    difference against ``baseline`` and a verdict ("baseline", "better", "worse" or "no measurable difference").
    ``kwargs`` go to ``mean_interval`` (confidence, method, n_resamples, seed)."""
    if baseline not in metrics:
        raise ValueError(f"baseline {baseline!r} is not among the compared names: {', '.join(map(repr, metrics))}")
    rows = []
    for name, values in metrics.items():
        own = mean_interval(values, **kwargs)
        row = {"name": name, "n": own.n, "mean": _json_float(own.mean), "low": _json_float(own.low),
               "high": _json_float(own.high), "diff": None, "diff_low": None, "diff_high": None,
               "verdict": "baseline"}
        if name != baseline:
            if len(values) != len(metrics[baseline]):
                raise ValueError(f"{name!r} has {len(values)} seeds but the baseline {baseline!r} has "
                                 f"{len(metrics[baseline])}; compare runs over the same seeds")
            diff = paired_difference(values, metrics[baseline], **kwargs)
            row.update(diff=_json_float(diff.mean), diff_low=_json_float(diff.low), diff_high=_json_float(diff.high),
                       verdict=_verdict(diff, higher_is_better))
        rows.append(row)
    return rows


def row_text(row: Mapping[str, Any], diff: bool = False, digits: int = 3) -> str:
    """A :func:`compare` row as text: ``"0.812 [0.790, 0.834]"``, or with ``diff`` its paired difference
    ``"+0.12 [+0.05, +0.19]"`` ("-" for the baseline; the mean alone when there is no interval)."""
    keys = ("diff", "diff_low", "diff_high") if diff else ("mean", "low", "high")
    mean, low, high = (row.get(k) for k in keys)
    if mean is None:
        return "-"
    if low is None or high is None:
        return _number(mean, digits, signed=diff)
    return f"{_number(mean, digits, diff)} [{_number(low, digits, diff)}, {_number(high, digits, diff)}]"


def verdict_text(name: str, baseline: str, metric: str, interval: Interval, higher_is_better: bool = True) -> str:
    """One sentence for the paired difference ``interval`` of ``name`` against ``baseline`` on ``metric``, e.g.
    "js - rkl on precision: +0.120 [+0.0500, +0.190] (95% t interval over 8 seeds): js is better"."""
    numbers = (f"{_number(interval.mean, 3, signed=True)} "
               f"[{_number(interval.low, 3, signed=True)}, {_number(interval.high, 3, signed=True)}]")
    seeds = f"{interval.n} seed{'' if interval.n == 1 else 's'}"
    label = _LABELS.get(interval.method, interval.method)
    verdict = _verdict(interval, higher_is_better)
    if verdict == NO_DIFFERENCE:
        ending = NO_DIFFERENCE + (" (an interval needs two seeds)" if interval.n < 2 else "")
    else:
        ending = f"{name} is {verdict}"
    how = f"{interval.confidence * 100:g}% {label} interval over {seeds}"
    return f"{name} - {baseline} on {metric}: {numbers} ({how}): {ending}"


def _per_seed_numbers(values: Any) -> np.ndarray | None:
    """``values`` as a 1-D array of numbers, or None when it is not one (a string, a scalar, lists per seed)."""
    if isinstance(values, (str, bytes, Mapping)):
        return None
    try:
        array = np.asarray(values)
    except (TypeError, ValueError):  # ragged nesting
        return None
    if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "iuf":
        return None
    return array


def summarise(per_seed: Mapping[str, Sequence[float]], **kwargs: Any) -> dict[str, dict]:
    """{metric: ``mean_interval(values).to_dict()``} for every metric of ``per_seed`` (metric -> per-seed numbers);
    metrics whose values are not numbers (lists per seed, strings, flags) are skipped. ``kwargs`` go to
    ``mean_interval``; a non-finite number raises ValueError naming the metric."""
    out = {}
    for metric, values in per_seed.items():
        array = _per_seed_numbers(values)
        if array is None:
            continue
        try:
            out[metric] = mean_interval(array, **kwargs).to_dict()
        except ValueError as err:
            raise ValueError(f"metric {metric!r}: {err}") from err
    return out
