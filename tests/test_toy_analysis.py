"""Notebook 03's measurement helpers (toy.analysis) and the one-factor-at-a-time design (toy.sensitivity)."""

from __future__ import annotations

import math

import matplotlib
import pandas as pd
import pytest
import torch

from fdistill_lab import toy
from fdistill_lab.toy import analysis as toy_analysis
from fdistill_lab.toy import sensitivity

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def teacher():
    return toy.default_teacher()


@pytest.fixture(scope="module")
def short_run(teacher):
    cfg = toy.ToyConfig(divergence="js", steps=41, batch_size=64, critic_warmup=5, eval_every=6, eval_samples=200)
    return toy_analysis.train_and_evaluate(teacher, cfg, eval_samples=300, progress=False)


def test_fluctuation():
    f = toy_analysis.fluctuation([5.0] * 10)
    assert f == {"mean": 5.0, "cv": 0.0, "step_change": 0.0}
    g = toy_analysis.fluctuation([1.0, 3.0] * 10, burn_in=0.0)
    assert g["mean"] == 2.0 and g["step_change"] == pytest.approx(1.0)
    assert g["cv"] == pytest.approx(float(torch.tensor([1.0, 3.0] * 10).std()) / 2)
    with pytest.raises(ValueError, match="at least 3"):
        toy_analysis.fluctuation([1.0, 2.0])


def test_train_and_evaluate_logs_grad_norms(short_run):
    _, norms = short_run["run"].curve("grad_norm_student")
    assert len(norms) == 12 and all(math.isfinite(v) and v > 0 for v in norms)  # (41 - 5) / 3 generator steps
    assert short_run["sec_per_iter"] > 0 and short_run["metrics"]["modes_covered"] >= 1
    assert set(short_run["fluctuation"]) == {"loss_f", "grad_norm_student"}


def test_gradient_variance_matched_state(short_run):
    snap = toy_analysis.snapshot(short_run["run"])
    out = toy_analysis.gradient_variance(snap, ["rkl", "js", "fkl"], num_batches=6, batch=128)
    assert out["rkl"]["weight_var"] == 0.0  # h = 1 for reverse KL
    assert out["fkl"]["weight_var"] > out["js"]["weight_var"] > 0  # Table 1: high vs low variance
    assert all(v["trace_var"] > 0 and v["rel_var"] > 0 for v in out.values())
    again = toy_analysis.gradient_variance(snap, ["fkl"], num_batches=6, batch=128)
    assert again["fkl"]["trace_var"] == pytest.approx(out["fkl"]["trace_var"], rel=1e-5)  # same seed, same batches
    assert snap.student is not short_run["run"].student
    with pytest.raises(ValueError, match="valid"):
        toy_analysis.gradient_variance(snap, ["nope"], num_batches=2)


def test_noise_to_signal_is_not_capped_by_the_number_of_batches():
    """Gradients g_b = mu + noise with ||mu||^2 = 1 and E||noise||^2 = 10: the true ratio is 10 for every B.
    The plain trace_var / ||mean g||^2 reads about B / (1 + B/10) (4.4 at B = 8); the corrected one does not."""
    g = torch.Generator().manual_seed(0)
    P = 400
    mu = torch.zeros(P, dtype=torch.float64)
    mu[0] = 1.0
    for B in (8, 48):
        trace, ratio, plain = [], [], []
        for _ in range(200):
            G = mu + torch.randn(B, P, generator=g, dtype=torch.float64) * math.sqrt(10 / P)
            t, r = toy_analysis.noise_to_signal(G)
            trace.append(t)
            ratio.append(r)
            plain.append(t / float(G.mean(0).pow(2).sum()))
        assert sum(trace) / len(trace) == pytest.approx(10, rel=0.02)
        assert sorted(ratio)[100] == pytest.approx(10, rel=0.15)  # median over 200 draws
        assert sum(plain) / len(plain) == pytest.approx(B / (1 + B / 10), rel=0.15)  # the plain ratio's bias
    noise_only = torch.randn(8, P, generator=g, dtype=torch.float64)
    assert toy_analysis.noise_to_signal(noise_only)[1] > 50  # no signal: very large or inf
    with pytest.raises(ValueError, match="B >= 2"):
        toy_analysis.noise_to_signal(torch.zeros(1, 3))


def test_ratio_calibration_against_a_constant_discriminator(short_run):
    snap = toy_analysis.snapshot(short_run["run"])

    class Zero(torch.nn.Module):
        def forward(self, x, sigma):
            return torch.zeros(x.shape[0])

    snap.disc = Zero()
    cal = toy_analysis.ratio_calibration(snap, [0.3, 2.0], n=400, kde_samples=600)
    rows = pd.DataFrame(cal["rows"])
    assert set(rows.variant) == {"raw", "clipped", "clipped+bins", "true (KDE)"}
    for s in (0.3, 2.0):
        true = cal["points"][s]["true"]
        raw = rows[(rows.sigma == s) & (rows.variant == "raw")].iloc[0]
        assert raw.abs_log_error == pytest.approx(float(true.abs().mean()))  # log r_hat = 0
        assert raw.mean_ratio == pytest.approx(1.0)
    assert cal["kde_bandwidth"] > 0
    with pytest.raises(ValueError, match="sigmas must be > 0"):
        toy_analysis.ratio_calibration(snap, [0.0], n=10, kde_samples=20)


def test_peak_tensor_bytes_and_cost(teacher):
    def two_big():
        a = torch.ones(512, 512)
        b = a * 2
        return b.sum()

    assert toy_analysis.peak_tensor_bytes(two_big) >= 2 * 512 * 512 * 4
    cost = toy_analysis.iteration_cost(teacher, toy.ToyConfig(divergence="fkl", batch_size=32), iters=2, warmup=1)
    assert all(v > 0 for v in cost.values())
    assert cost["gen_step_s"] <= cost["sec_per_iter"]


AXES = {"lr": [0.002, 0.005], "clip": [{"ratio_min": 0.1, "ratio_max": 20.0}, {"ratio_min": 0.5, "ratio_max": 2.0}]}
DEFAULTS = {"lr": 0.002, "ratio_min": 0.1, "ratio_max": 20.0}


def test_ofat_points_share_the_default_runs():
    pts = sensitivity.ofat_points(["js", "fkl"], [0, 1], AXES, DEFAULTS)
    assert len(pts) == 2 * 2 * 3  # default + one other setting per axis
    assert {"divergence": "js", "seed": 0, "lr": 0.005, "ratio_min": 0.1, "ratio_max": 20.0} in pts
    with pytest.raises(ValueError, match="no default"):
        sensitivity.ofat_points(["js"], [0], {"gan_weight": [0.0]}, DEFAULTS)
    assert sensitivity.setting_label({"ratio_min": 0.1, "ratio_max": 20.0}) == "0.1-20"
    assert sensitivity.setting_label({"student_update_freq": 2, "steps": 650, "label": "2"}) == "2"
    labelled = sensitivity.ofat_points(["js"], [0], {"k": [{"k": 3, "steps": 9, "label": "3"}]},
                                       {"k": 3, "steps": 9})
    assert labelled == [{"divergence": "js", "seed": 0, "k": 3, "steps": 9}]  # the label is not a setting


def test_axis_summary_and_heatmaps():
    pts = sensitivity.ofat_points(["js", "fkl"], [0, 1], AXES, DEFAULTS)
    rows = [{**p, "status": "done", "tv": p["lr"] * 100 + p["seed"] + (p["ratio_max"] == 2.0)} for p in pts]
    rows.append({**pts[0], "seed": 9, "status": "failed", "tv": float("nan")})
    table = pd.DataFrame(rows)
    mean, std, count = sensitivity.axis_summary(table, "lr", AXES["lr"], DEFAULTS, "tv", AXES)
    assert list(mean.columns) == ["0.002", "0.005"] and list(mean.index) == ["js", "fkl"]
    assert mean.loc["js", "0.005"] == pytest.approx(1.0) and std.loc["js", "0.005"] == pytest.approx(math.sqrt(0.5))
    assert (count.to_numpy() == 2).all()  # the failed run does not count
    mean_c, _, _ = sensitivity.axis_summary(table, "clip", AXES["clip"], DEFAULTS, "tv", AXES)
    assert mean_c.loc["fkl", "0.5-2"] == pytest.approx(1.7)
    with pytest.raises(ValueError, match="not a column"):
        sensitivity.axis_summary(table, "lr", AXES["lr"], DEFAULTS, "nope", AXES)
    fig = sensitivity.plot_heatmaps(table, AXES, DEFAULTS, "tv")
    assert len([a for a in fig.axes if a.get_visible() and a.get_title()]) == 2


def test_seed_values_pair_the_settings_of_one_divergence_by_seed():
    pts = sensitivity.ofat_points(["js", "fkl"], [1, 0], AXES, DEFAULTS)  # seeds out of order on purpose
    table = pd.DataFrame([{**p, "status": "done", "tv": p["lr"] * 100 + p["seed"] + (p["ratio_max"] == 2.0)}
                          for p in pts])
    lr = sensitivity.seed_values(table, "lr", AXES["lr"], DEFAULTS, "tv", AXES, "fkl")
    assert lr == {"0.002": [0.2, 1.2], "0.005": [0.5, 1.5]}  # seed 0 first in every setting
    clip = sensitivity.seed_values(table, "clip", AXES["clip"], DEFAULTS, "tv", AXES, "js")
    assert clip == {"0.1-20": [0.2, 1.2], "0.5-2": [1.2, 2.2]}
    assert sensitivity.default_label("clip", AXES, DEFAULTS) == "0.1-20"
    with pytest.raises(ValueError, match="expected"):  # a seed missing from one setting breaks the pairing
        sensitivity.seed_values(table.drop(index=table.index[(table.seed == 1) & (table.lr == 0.005)]), "lr",
                                AXES["lr"], DEFAULTS, "tv", AXES, "js")
    with pytest.raises(ValueError, match="no finished rkl run"):
        sensitivity.seed_values(table, "lr", AXES["lr"], DEFAULTS, "tv", AXES, "rkl")


def test_train_with_snapshots(teacher):
    cfg = toy.ToyConfig(divergence="fkl", steps=20, batch_size=32, critic_warmup=2, eval_every=3, eval_samples=100)
    run, snaps = toy_analysis.train_with_snapshots(teacher, cfg, [2, 14], progress=False)
    assert sorted(snaps) == [2, 14] and run.step_count == 20 and snaps[14].step_count == 14
    w2, w14 = (next(s.student.parameters()) for s in (snaps[2], snaps[14]))
    assert not torch.equal(w2, w14) and not torch.equal(w14, next(run.student.parameters()))
    assert snaps[14].history == [] and len(run.history) == 20
    with pytest.raises(ValueError, match="snapshot steps"):
        toy_analysis.train_with_snapshots(teacher, cfg, [21])


def test_learned_critic_analyses_refuse_an_oracle_run(teacher):
    run = toy.ToyTrainer(teacher, toy.ToyConfig(oracle=True, steps=2, batch_size=32, eval_every=2, eval_samples=100))
    x, s = torch.zeros(4, 2), torch.full((4,), 0.5)
    for call in (lambda: toy_analysis.log_ratio_estimates(run, x, s),
                 lambda: toy_analysis.ratio_calibration(run, [0.5], n=10, kde_samples=20),
                 lambda: toy_analysis.gradient_variance(run, ["js"], num_batches=2)):
        with pytest.raises(ValueError, match="oracle=True"):
            call()


def test_snapshots_do_not_change_the_trained_run(teacher):
    cfg = dict(divergence="js", steps=27, batch_size=32, critic_warmup=3, eval_every=8, eval_samples=100)
    whole = toy_analysis.train_and_evaluate(teacher, toy.ToyConfig(**cfg), eval_samples=100, progress=False)["run"]
    chunked, snaps = toy_analysis.train_with_snapshots(teacher, toy.ToyConfig(**cfg), at=[3, 12, 18], progress=False)
    assert sorted(snaps) == [3, 12, 18]
    for a, b in zip(whole.student.parameters(), chunked.student.parameters()):
        assert torch.equal(a, b)
