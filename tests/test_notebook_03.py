"""Notebook 03 (ratio, normalisation, cost and sensitivity): papermill smoke run with checks on its records and
bad parameters rejected before anything is written."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from notebook_harness import (
    ROOT,
    assert_rejected_before_writing,
    declared_parameters,
    run_notebook,
)

NAME = "03_ratio_normalisation_and_sensitivity"
PAPER = ["rkl", "srkl", "js", "sh", "fkl", "jeffreys"]

pytestmark = pytest.mark.notebooks


def test_declared_parameters():
    params = declared_parameters(NAME)
    assert sorted(params) == ["full", "gan_weight", "jobs", "output_dir", "seed", "smoke", "steps"]
    assert params["full"]["default"] == "False"


@pytest.mark.timeout(240)
def test_smoke(tmp_path, load_script, capsys):
    """Launched from the repository root (``papermill notebooks/03_... out.ipynb``, as README shows): the notebook
    works from ``notebooks/`` all the same (its output folder is relative to it)."""
    _, rec = run_notebook(NAME, tmp_path, budget_s=60.0, min_images=6, cwd=ROOT)
    assert rec["config"]["smoke"] is True and rec["config"]["full"] is False

    cal = pd.DataFrame(rec["ratio_calibration"]["rows"])
    assert set(cal.variant) == {"raw", "clipped", "clipped+bins", "true (KDE)"} and cal.sigma.nunique() == 7
    assert cal.abs_log_error.map(math.isfinite).all() and (cal.mean_ratio > 0).all()

    norm = pd.DataFrame(rec["normalisation"])
    assert len(norm) == 8 and set(norm["div"]) == {"fkl", "js"}
    assert norm[["loss_cv", "grad_cv"]].map(math.isfinite).all().all()

    gv = pd.DataFrame(rec["gradient_variance"])
    assert set(gv["div"]) == set(PAPER) and gv.state.nunique() == 3
    assert (gv[gv["div"] == "rkl"].weight_var == 0).all()  # h = 1
    final = gv[gv.state == gv.state.iloc[-1]].set_index("div")
    assert final.loc["fkl", "weight_var"] > final.loc["js", "weight_var"]  # Table 1: FKL high, JS low

    gan = pd.DataFrame(rec["gan_ablation"])
    assert set(gan.GAN) == {"w/ GAN", "w/o GAN"} and ((gan.mass_tv >= 0) & (gan.mass_tv <= 1)).all()
    from fdistill_lab import stats  # the paired intervals: recomputed from the per-seed records

    effect = pd.DataFrame(rec["gan_effect"])
    for _, row in effect.iterrows():
        arms = gan[gan["div"] == row["div"]].sort_values("seed")
        d = stats.paired_difference(list(arms[arms.GAN == "w/ GAN"][row["metric"]]),
                                    list(arms[arms.GAN == "w/o GAN"][row["metric"]]))
        assert row["diff"] == pytest.approx(d.mean) and row["verdict"] in ("better", "worse", stats.NO_DIFFERENCE)
    assert set(rec["normalisation_intervals"]) == {f"{d}/{k}" for d in ("fkl", "js") for k in ("loss_cv", "grad_cv",
                                                                                               "mass_tv")}
    for rows in rec["normalisation_intervals"].values():
        assert rows[0]["name"] == "both stages" and rows[0]["verdict"] == "baseline" and len(rows) == 4

    cost = pd.DataFrame(rec["cost"]).set_index("div")
    assert list(cost.index) == PAPER and (cost.sec_per_iter > 0).all() and (cost.peak_tensor_mb > 0).all()

    sw = rec["sweep"]
    assert sw["runs"] == 2 and sw["failed"] == 0
    table = pd.read_csv(sw["csv"])
    assert (table.status == "done").all() and sorted(table.lr_student) == [0.002, 0.005]
    assert table["metrics.mass_tv"].between(0, 1).all() and (table["cost.peak_rss_mb"] > 0).all()
    for name in ("ratio_calibration", "normalisation_ablation", "gradient_variance", "gan_ablation", "cost",
                 "sensitivity_heatmaps"):
        assert (tmp_path / f"{name}.png").is_file()

    capsys.readouterr()
    assert load_script("scripts/full_study_tables.py").main([str(tmp_path)]) == 0  # the tables of the full-study doc
    printed = capsys.readouterr().out
    for title in ("Sensitivity", "Density ratio", "Two-stage normalisation", "Gradient variance", "GAN ablation",
                  "Cost"):
        assert f"## {title}" in printed
    assert "| js | 0." in printed and "2 runs, 0 failed." in printed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("params, message", [({"jobs": 0}, "jobs must be >= 1"),
                                             ({"full": "yes"}, "must be bool"),
                                             ({"nonsense": 1}, "unknown parameter")])
def test_bad_parameters_fail_before_writing(tmp_path, params, message):
    assert_rejected_before_writing(NAME, tmp_path, params, message)


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_classroom_defaults_within_budget(tmp_path):
    """Classroom defaults inside the 5-minute CPU budget; the Table 1 variance order holds at the start state."""
    _, rec = run_notebook(NAME, tmp_path, parameters={"smoke": False}, budget_s=300.0, min_images=6)
    assert rec["sweep"]["runs"] == 20 and rec["sweep"]["failed"] == 0
    gv = pd.DataFrame(rec["gradient_variance"])
    start = gv[gv.state == "step 0"].set_index("div").weight_var
    assert start["fkl"] > start["jeffreys"] > start["js"] > start["srkl"] > start["rkl"] == 0
