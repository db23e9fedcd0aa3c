"""fdistill_lab.stats: intervals over seeds checked against scipy and the textbook formula, paired differences,
verdicts, and the edge cases (one seed, equal values, non-finite values)."""

from __future__ import annotations

import inspect
import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from fdistill_lab import stats
from fdistill_lab.stats import Interval, compare, mean_interval, paired_difference, summarise, verdict_text

# Eight seeds whose level varies a lot from seed to seed (the seed effect both runs share).
BASE = np.array([1.0, 3.0, 2.0, 5.0, 4.0, 6.0, 0.5, 2.5])
# +0.1 on every seed, with a little noise: unpaired intervals overlap, the paired one excludes zero.
BETTER = BASE + np.array([0.10, 0.12, 0.09, 0.11, 0.10, 0.08, 0.12, 0.10])
# Differences centred on zero: the paired interval holds zero.
SAME = BASE + np.array([0.1, -0.1, 0.05, -0.05, 0.02, -0.03, 0.04, -0.03])


def textbook_t(values, confidence=0.95):
    x = np.asarray(values, dtype=float)
    half = sps.t.ppf((1 + confidence) / 2, x.size - 1) * np.std(x, ddof=1) / math.sqrt(x.size)
    return x.mean() - half, x.mean() + half


def direct_bootstrap(values, seed, n_resamples=9999, confidence=0.95):
    name = "rng" if "rng" in inspect.signature(sps.bootstrap).parameters else "random_state"
    result = sps.bootstrap((np.asarray(values, dtype=float),), np.mean, confidence_level=confidence,
                           n_resamples=n_resamples, method="BCa", **{name: np.random.default_rng(seed)})
    return result.confidence_interval


@pytest.mark.parametrize(("values", "confidence"), [([1.0, 2.0, 4.0], 0.95), (BASE.tolist(), 0.95), (BASE, 0.9)])
def test_t_interval_is_the_textbook_formula(values, confidence):
    got = mean_interval(values, confidence=confidence)
    low, high = textbook_t(values, confidence)
    assert got.mean == pytest.approx(np.mean(values))
    assert (got.low, got.high) == pytest.approx((low, high), rel=1e-12)
    assert (got.n, got.confidence, got.method) == (len(values), confidence, "t")


def test_t_interval_uses_the_t_quantile_and_the_sample_sd():
    """With n = 3 the z quantile or ddof=0 give far narrower intervals; the result must not be either."""
    x = np.array([1.0, 2.0, 4.0])
    got = mean_interval(x)
    width = got.high - got.low
    z_ddof0 = 2 * sps.norm.ppf(0.975) * np.std(x) / math.sqrt(3)
    z_ddof1 = 2 * sps.norm.ppf(0.975) * np.std(x, ddof=1) / math.sqrt(3)
    t_ddof0 = 2 * sps.t.ppf(0.975, 2) * np.std(x) / math.sqrt(3)
    assert width == pytest.approx(2 * sps.t.ppf(0.975, 2) * np.std(x, ddof=1) / math.sqrt(3))
    assert width > 2.5 * z_ddof0 and width > 2 * z_ddof1 and width > 1.2 * t_ddof0


def test_bootstrap_matches_scipy_and_is_reproducible():
    got = mean_interval(BASE, method="bootstrap", n_resamples=2000, seed=7)
    low, high = direct_bootstrap(BASE, seed=7, n_resamples=2000)
    assert (got.low, got.high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    assert got.low < BASE.mean() < got.high and got.method == "bootstrap"
    assert mean_interval(BASE, method="bootstrap", n_resamples=2000, seed=7) == got
    assert mean_interval(BASE, method="bootstrap", n_resamples=2000, seed=8) != got


@pytest.mark.parametrize("method", ["t", "bootstrap"])
def test_pairing_removes_the_shared_seed_spread(method):
    kw = {"method": method, "n_resamples": 2000}
    a, b = mean_interval(BETTER, **kw), mean_interval(BASE, **kw)
    assert a.low < b.high and b.low < a.high  # unpaired: the intervals overlap
    diff = paired_difference(BETTER, BASE, **kw)
    assert diff.excludes_zero() and diff.low > 0
    assert diff.mean == pytest.approx(np.mean(BETTER - BASE))
    same = paired_difference(SAME, BASE, **kw)
    assert not same.excludes_zero() and same.low < 0 < same.high


def test_paired_t_is_the_one_sample_t_of_the_differences():
    got = paired_difference(BETTER, BASE)
    assert (got.low, got.high) == pytest.approx(textbook_t(BETTER - BASE), rel=1e-9)


@pytest.mark.parametrize("method", ["t", "bootstrap"])
def test_one_seed_gives_no_interval(method):
    got = mean_interval([0.7], method=method)
    assert got.mean == 0.7 and got.n == 1 and math.isnan(got.low) and math.isnan(got.high)
    assert not got.excludes_zero()
    diff = paired_difference([0.9], [0.7], method=method)
    assert diff.mean == pytest.approx(0.2) and math.isnan(diff.low) and not diff.excludes_zero()
    assert compare({"a": [0.7], "b": [0.9]}, "a")[1]["verdict"] == "no measurable difference"


@pytest.mark.parametrize("method", ["t", "bootstrap"])
def test_equal_values_give_a_zero_width_interval_without_warnings(method):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = mean_interval([0.5, 0.5, 0.5, 0.5], method=method)
        diff = paired_difference([2, 3, 4], [1, 2, 3], method=method)
    assert (got.mean, got.low, got.high, got.n) == (0.5, 0.5, 0.5, 4)
    assert (diff.mean, diff.low, diff.high) == (1.0, 1.0, 1.0) and diff.excludes_zero()
    assert not mean_interval([0.0, 0.0], method=method).excludes_zero()


@pytest.mark.parametrize("method", ["t", "bootstrap"])
def test_differences_equal_up_to_rounding_count_as_equal(method):
    """BASE - 0.2 - BASE is -0.2 only to rounding; scipy would warn of catastrophic cancellation."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diff = paired_difference(BASE - 0.2, BASE, method=method)
    assert diff.low == diff.high == diff.mean == pytest.approx(-0.2) and diff.excludes_zero()
    assert np.ptp((BASE - 0.2) - BASE) > 0  # the case is real: the differences are not all equal


@pytest.mark.parametrize("bad", [[1.0, float("nan"), 2.0], [1.0, 2.0, float("inf")]])
def test_non_finite_values_are_named(bad):
    with pytest.raises(ValueError, match=r"non-finite entries \[(nan|inf)\] at positions \[(1|2)\]"):
        mean_interval(bad)
    with pytest.raises(ValueError, match="baseline has non-finite"):
        paired_difference([1.0, 2.0, 3.0], bad)


def test_bad_input_and_options():
    with pytest.raises(ValueError, match="values has 5, baseline 4"):
        paired_difference([1, 2, 3, 4, 5], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="'t', 'bootstrap'"):
        mean_interval([1, 2], method="z")
    for confidence in (0, 1, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="confidence"):
            mean_interval([1, 2], confidence=confidence)
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="1-D"):
        mean_interval([[1, 2], [3, 4]])


def test_compare_rows_and_verdicts():
    metrics = {"rkl": BASE.tolist(), "js": BETTER.tolist(), "kl": SAME.tolist(), "fkl": (BASE - 0.2).tolist()}
    rows = compare(metrics, "rkl")
    assert [r["name"] for r in rows] == ["rkl", "js", "kl", "fkl"]
    assert [r["verdict"] for r in rows] == ["baseline", "better", "no measurable difference", "worse"]
    assert set(rows[0]) == {"name", "n", "mean", "low", "high", "diff", "diff_low", "diff_high", "verdict"}
    assert rows[0]["diff"] is None and rows[0]["diff_low"] is None and rows[0]["diff_high"] is None
    js = paired_difference(BETTER, BASE)
    assert (rows[1]["diff"], rows[1]["diff_low"], rows[1]["diff_high"]) == (js.mean, js.low, js.high)
    assert rows[1]["n"] == 8 and rows[1]["mean"] == pytest.approx(BETTER.mean())
    lower = compare(metrics, "rkl", higher_is_better=False)  # e.g. FID: the higher js is worse
    assert [r["verdict"] for r in lower] == ["baseline", "worse", "no measurable difference", "better"]
    boot = compare(metrics, "rkl", method="bootstrap", n_resamples=1000)
    assert [r["verdict"] for r in boot] == ["baseline", "better", "no measurable difference", "worse"]
    json.dumps(rows)


def test_compare_errors():
    with pytest.raises(ValueError, match="'a', 'b'"):
        compare({"a": [1, 2], "b": [2, 3]}, "c")
    with pytest.raises(ValueError, match="'b' has 3 seeds but the baseline 'a' has 2"):
        compare({"a": [1, 2], "b": [2, 3, 4]}, "a")


def test_to_dict_is_json_ready():
    got = json.loads(json.dumps(mean_interval([1.0, 2.0, 4.0]).to_dict()))
    assert set(got) == {"mean", "low", "high", "n", "confidence", "method"} and got["n"] == 3
    one = mean_interval([0.3]).to_dict()
    assert one["low"] is None and one["high"] is None and one["mean"] == 0.3
    assert json.loads(json.dumps(one, allow_nan=False)) == one


def test_format():
    iv = Interval(0.8123, 0.79, 0.8341, 8, 0.95, "t")
    assert iv.format() == "0.812 [0.790, 0.834]" == str(iv)
    assert iv.format(2) == "0.81 [0.79, 0.83]"
    assert Interval(12.0, 100.0, 123456.0, 3, 0.95, "t").format() == "12.0 [100, 1.23e+05]"
    assert mean_interval([0.3]).format() == "0.300 [nan, nan]"


def test_verdict_text():
    better = Interval(0.12, 0.05, 0.19, 8, 0.95, "t")
    assert verdict_text("js", "rkl", "precision", better) == \
        "js - rkl on precision: +0.120 [+0.0500, +0.190] (95% t interval over 8 seeds): js is better"
    assert verdict_text("js", "rkl", "fid", better, higher_is_better=False).endswith(": js is worse")
    same = paired_difference(SAME, BASE, method="bootstrap", n_resamples=1000)
    text = verdict_text("kl", "rkl", "recall", same)
    assert "(95% BCa bootstrap interval over 8 seeds)" in text and text.endswith(": no measurable difference")
    one = verdict_text("js", "rkl", "fid", paired_difference([1.0], [2.0]))
    assert one.endswith("over 1 seed): no measurable difference (an interval needs two seeds)")


def test_summarise_skips_non_numeric_metrics():
    per_seed = {"fid": [10.0, 11.0, 12.5], "precision": (0.8, 0.82, 0.79), "curve": [[1, 2], [3, 4], [5, 6]],
                "ragged": [[1], [2, 3]], "divergence": "js", "names": ["a", "b", "c"], "steps": 100,
                "converged": [True, True, False], "empty": [], "counts": np.array([3, 4, 5])}
    got = summarise(per_seed, confidence=0.9)
    assert list(got) == ["fid", "precision", "counts"]
    assert got["fid"] == mean_interval([10.0, 11.0, 12.5], confidence=0.9).to_dict()
    assert got["counts"]["n"] == 3 and got["counts"]["confidence"] == 0.9
    json.dumps(got)
    with pytest.raises(ValueError, match="metric 'fid'.*non-finite"):
        summarise({"fid": [1.0, float("nan")]})


def test_row_text_formats_compare_rows():
    rows = stats.compare({"rkl": [0.5, 0.6, 0.7], "js": [0.6, 0.72, 0.79]}, "rkl")
    want = stats.mean_interval([0.5, 0.6, 0.7])
    assert stats.row_text(rows[0]) == want.format()
    assert stats.row_text(rows[0], diff=True) == "-"
    d = stats.paired_difference([0.6, 0.72, 0.79], [0.5, 0.6, 0.7])
    assert stats.row_text(rows[1], diff=True).startswith("+0.103 [+")
    assert stats.row_text(rows[1], diff=True) == f"+{d.mean:#.3g} [+{d.low:#.3g}, +{d.high:#.3g}]"
    one = stats.compare({"rkl": [0.5], "js": [0.6]}, "rkl")
    assert stats.row_text(one[0]) == "0.500" and stats.row_text(one[1], diff=True) == "+0.100"
