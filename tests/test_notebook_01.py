"""Notebook 01 (f-divergences): papermill smoke run with checks on the recorded results, and bad input."""

from __future__ import annotations

import math

import pytest
from notebook_harness import (
    assert_rejected_before_writing,
    declared_parameters,
    run_notebook,
)

NAME = "01_f_divergences"
PAPER = ["rkl", "srkl", "js", "sh", "fkl", "jeffreys"]

pytestmark = pytest.mark.notebooks


def test_declared_parameters():
    params = declared_parameters(NAME)
    assert {"smoke", "seed", "div", "steps", "lr", "separation", "weight", "output_dir"} == set(params)


@pytest.mark.timeout(180)
def test_smoke_run_records(tmp_path):
    nb, rec = run_notebook(NAME, tmp_path, budget_s=60.0, min_images=7)
    assert rec["gradient_identity_max_abs_error"] < 1e-5
    assert rec["gradient_mean_estimator"]["rkl"] == pytest.approx((0.2 - 1) / 1.3**2, abs=1e-6)
    assert rec["gradient_mean_estimator"]["fkl"] == pytest.approx((0.2 - 1) / 0.8**2, abs=1e-6)
    assert rec["js_weight_sigmoid_max_gap"] < 1e-12
    var = rec["normalized_variance_mu2"]
    assert var["fkl"] == pytest.approx(math.exp(4) - 1, rel=1e-3) and var["rkl"] == pytest.approx(0, abs=1e-12)
    assert var["fkl"] > var["jeffreys"] > var["sh"] > var["js"] > var["srkl"]
    std = rec["final_std_balanced"]
    assert std["rkl"] == pytest.approx(0.5, abs=0.02) and std["srkl"] == pytest.approx(0.5, abs=0.02)
    assert std["fkl"] == pytest.approx(math.sqrt(4.25), abs=0.05)
    assert rec["modes_kept_balanced"] == {"rkl": 1, "srkl": 1, "js": 2, "sh": 2, "fkl": 2, "jeffreys": 2}
    assert rec["modes_kept_imbalanced"] == {"rkl": 1, "srkl": 1, "js": 1, "sh": 1, "fkl": 2, "jeffreys": 1}
    # restarts: only the mode-seeking fits are stuck on the light mode; on one mode D = -log(its weight)
    assert rec["fit_is_best_imbalanced"] == {"rkl": False, "srkl": False, "js": True, "sh": True, "fkl": True,
                                             "jeffreys": True}
    rkl = rec["restart_value_imbalanced"]["rkl"]
    assert rkl["student (1, 1)"] == pytest.approx(-math.log(0.2), abs=1e-3)
    assert min(rkl.values()) == pytest.approx(-math.log(0.8), abs=1e-3)
    assert set(rec["summary"]) >= {"gradient_identity_max_abs_error", "rkl_std_balanced", "fkl_std_balanced"}
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "check_h_js: OK" in text and "check_mode_prediction: OK" in text
    assert "mode SMOKE" in text


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("params", "message"), [
    ({"div": "nonsense"}, "unknown divergence 'nonsense'; valid names: rkl, srkl, js"),
    ({"stepz": 3}, "unknown parameter(s) 'stepz'; valid parameter names: div, lr, output_dir, seed, separation"),
    ({"steps": "abc"}, "parameter 'steps' must be int; got str 'abc'"),
    ({"weight": 1.5}, "weight must be in [0.5, 1); got 1.5"),
])
def test_bad_parameters_rejected_before_writing(tmp_path, params, message):
    assert_rejected_before_writing(NAME, tmp_path, params, message)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_classroom_defaults_within_budget(tmp_path):
    """Full-size run (classroom defaults) inside the 3-minute CPU budget, same qualitative results."""
    _, rec = run_notebook(NAME, tmp_path, parameters={"smoke": False}, budget_s=180.0, min_images=7)
    assert rec["modes_kept_imbalanced"] == {"rkl": 1, "srkl": 1, "js": 1, "sh": 1, "fkl": 2, "jeffreys": 1}
    # restarts: only the mode-seeking fits are stuck on the light mode; on one mode D = -log(its weight)
    assert rec["fit_is_best_imbalanced"] == {"rkl": False, "srkl": False, "js": True, "sh": True, "fkl": True,
                                             "jeffreys": True}
    rkl = rec["restart_value_imbalanced"]["rkl"]
    assert rkl["student (1, 1)"] == pytest.approx(-math.log(0.2), abs=1e-3)
    assert min(rkl.values()) == pytest.approx(-math.log(0.8), abs=1e-3)
    assert rec["gradient_identity_max_abs_error"] < 1e-5
