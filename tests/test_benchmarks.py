"""The benchmark scripts run end to end on tiny sizes (their figures are measured by hand, not tested)."""


def test_loss_overhead_runs_and_reports_every_figure(capsys, load_script):
    out = load_script("benchmarks/loss_overhead.py").main(["--repeats", "4", "--block", "2", "--batch", "4",
                                                           "--res", "8"])
    assert set(out) == {"rkl_ms", "fdiv_ms", "weighting_ms", "weighting_in_loop_ms", "control_ops",
                        "control_ms", "control_in_loop_ms", "overhead_pct", "overhead_paired_pct"}
    assert out["control_ops"] >= 20  # the weighting's aten calls, counted by the profiler
    assert all(v > 0 for k, v in out.items() if k.endswith("_ms"))
    printed = capsys.readouterr().out
    assert "overhead on the bare loss" in printed and "issue target < 5%" in printed
    assert "distinct" in printed and "one tiny op" in printed
