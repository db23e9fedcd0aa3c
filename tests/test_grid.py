"""Grids of toy runs (fdistill_lab.toy.grid, ``python -m fdistill_lab.sweep``): one result file per run, resume,
failures kept without stopping the others, the command line and the background mode of notebook 03."""

from __future__ import annotations

import json
import os
import time

import pytest

from fdistill_lab.toy import grid

TINY = dict(steps=20, critic_warmup=5, batch_size=32, hidden=16, depth=2, eval_every=10, eval_samples=100)


def dies(params, eval_samples):  # a worker whose process is killed (e.g. by the out-of-memory killer)
    if params["seed"] == 1:
        os._exit(9)
    return grid._worker(params, eval_samples)


def test_grid_writes_one_result_per_run_and_resumes(tmp_path):
    points = grid.expand_grid({"divergence": ["js", "fkl"], "seed": [0, 1]})
    table = grid.run_grid(points, tmp_path, base=TINY, jobs=2, eval_samples=200, progress=False)
    files = sorted((tmp_path / grid.RUNS_DIR).glob("*.json"))
    assert len(files) == 4 and len(table) == 4 and (table.status == "done").all() and table.attrs["failed"] == 0
    assert files[0].name.startswith("divergence-fkl_steps-20_")  # the non-default settings, then a hash of all
    assert table["metrics.mass_tv"].between(0, 1).all() and (table["cost.sec_per_iter"] > 0).all()
    assert set(table.divergence) == {"js", "fkl"} and set(table.steps) == {20}
    result = json.loads(files[0].read_text())
    assert result["params"]["divergence"] == "fkl" and result["curve"]["step"][-1] == 20
    stamps = [f.stat().st_mtime_ns for f in files]
    again = grid.run_grid(points, tmp_path, base=TINY, jobs=2, progress=False)  # all finished: nothing runs
    assert [f.stat().st_mtime_ns for f in files] == stamps and len(again) == 4


def test_the_same_run_gives_the_same_result_in_the_pool_and_here(tmp_path):
    """A grid run is the toy trainer's run: the worker's numbers equal an in-process run's."""
    grid.run_grid([{"divergence": "sh"}], tmp_path, base=TINY, eval_samples=200, progress=False)
    [path] = (tmp_path / grid.RUNS_DIR).glob("*.json")
    here = grid.run_point({**TINY, "divergence": "sh"}, 200)
    assert json.loads(path.read_text())["metrics"] == json.loads(json.dumps(here["metrics"]))


def test_a_run_keeps_its_curves_and_fluctuation_and_load_run_finds_it(tmp_path):
    base = {**TINY, "student_update_freq": 2, "critic_warmup": 4, "eval_every": 8}
    table = grid.run_grid([{"divergence": "fkl"}], tmp_path, base=base, eval_samples=200, progress=False)
    result = grid.load_run(tmp_path, {"divergence": "fkl"}, base)
    gen = result["generator_curve"]
    assert len(gen["step"]) == len(gen["loss_f"]) == len(gen["grad_norm_student"]) == (20 - 4) // 2
    assert len(result["curve"]["precision"]) == len(result["curve"]["step"])
    cv = result["fluctuation"]["grad_norm_student"]["cv"]
    assert table["fluctuation.grad_norm_student.cv"].iloc[0] == cv and cv > 0
    assert "fluctuation.loss_f.step_change" in table.columns
    with pytest.raises(FileNotFoundError, match="no result for this run"):
        grid.load_run(tmp_path, {"divergence": "js"}, base)


def test_failures_are_kept_and_retried_and_the_others_finish(tmp_path):
    points = [{"seed": 0}, {"seed": 1, "sigma_data": 0.0}]  # the second run raises while building its networks
    table = grid.run_grid(points, tmp_path, base=TINY, jobs=2, progress=False)
    failed = table[table.status == "failed"]
    assert table.attrs["failed"] == 1 and len(failed) == 1 and "sigma_data must be > 0" in failed.error.iloc[0]
    assert (table[table.seed == 0].status == "done").all()
    path = next(p for p in (tmp_path / grid.RUNS_DIR).glob("*.json") if "sigma_data" in p.read_text()
                and json.loads(p.read_text())["status"] == "failed")
    before = path.stat().st_mtime_ns
    time.sleep(0.01)
    grid.run_grid(points, tmp_path, base=TINY, progress=False)
    assert path.stat().st_mtime_ns != before  # retried (and failed again), the finished run was not


def test_a_dead_worker_fails_its_run_only(tmp_path):
    """A process that dies breaks its pool and every run in it: the runs that were waiting go on in a fresh pool,
    those in flight rerun alone, and only the one whose process dies again is written as failed."""
    points = [{"seed": s} for s in range(5)]
    table = grid.run_grid(points, tmp_path, base=TINY, jobs=2, progress=False, worker=dies)
    assert table.attrs["failed"] == 1 and len(table) == 5
    assert "process died" in table[table.seed == 1].error.iloc[0]
    assert (table[table.seed != 1].status == "done").all()
    assert not list((tmp_path / grid.RUNS_DIR).glob("*.started"))


def test_bad_settings_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown toy setting.*'divergenc'.*valid: divergence"):
        grid.run_grid([{"divergenc": "js"}], tmp_path)
    with pytest.raises(ValueError, match="unknown divergence 'nope'"):
        grid.run_grid([{"divergence": "nope"}], tmp_path)
    with pytest.raises(ValueError, match="jobs must be an integer >= 1"):
        grid.run_grid([{}], tmp_path, jobs=0)
    with pytest.raises(ValueError, match="non-empty list"):
        grid.expand_grid({"seed": []})
    assert not (tmp_path / grid.RUNS_DIR).exists() or not any((tmp_path / grid.RUNS_DIR).iterdir())


def test_command_line(tmp_path, capsys):
    args = ["--grid", "divergence=js,fkl", "--out", str(tmp_path), "--eval-samples", "100"]
    args += [f"--set={k}={v}" for k, v in TINY.items()]
    assert grid.main(args) == 0
    out = capsys.readouterr().out
    assert "divergence-fkl" in out and "metrics.mass_tv" in out and len(list((tmp_path / "runs").iterdir())) == 2
    assert grid.main(["--grid", "divergenc=js", "--out", str(tmp_path)]) == 2
    assert "unknown toy setting 'divergenc'" in capsys.readouterr().err
    assert grid.main(["--set", "steps=many", "--out", str(tmp_path)]) == 2
    assert "steps='many': expected a int value" in capsys.readouterr().err
    assert grid.main(["--set", "sigma_data=0", "--out", str(tmp_path / "bad")] + args[4:]) == 1
    assert "1 run(s) failed" in capsys.readouterr().err
    assert grid.parse_value("oracle", "true") is True and grid.parse_value("logit_clip", "none") is None
    assert grid.parse_value("init_center", "1:0.5") == (1.0, 0.5)


def test_runs_are_named_by_their_configuration(tmp_path):
    """The same configuration is the same run in any grid, with a default written out or not; a grid's table holds
    its own runs only."""
    grid.run_grid([{"divergence": "js"}], tmp_path, base=TINY, progress=False)
    again = grid.run_grid([{"divergence": "js", "lr_student": 2e-3}, {"divergence": "fkl"}], tmp_path, base=TINY,
                          progress=False)
    assert len(list((tmp_path / grid.RUNS_DIR).glob("*.json"))) == 2 and len(again) == 2  # js was not run again
    only_fkl = grid.run_grid([{"divergence": "fkl"}], tmp_path, base=TINY, progress=False)
    assert list(only_fkl.divergence) == ["fkl"] and len(grid.table(tmp_path)) == 2
    assert grid.run_name({"steps": 1300}) == grid.run_name({}) != grid.run_name({"steps": 1301})


def test_background_grid(tmp_path):
    bg = grid.start_grid([{"seed": 3}], tmp_path, base=TINY, eval_samples=100)
    with pytest.raises(RuntimeError, match="already running into"):
        grid.start_grid([{"seed": 4}], tmp_path, base=TINY)
    table = bg.wait()
    assert bg.done() and list(table.status) == ["done"] and list(table.seed) == [3]
    failing = grid.start_grid([{"nonsense": 1}], tmp_path)
    with pytest.raises(ValueError, match="unknown toy setting"):
        failing.wait()


def test_a_cancelled_grid_stops_at_once_and_resumes(tmp_path):
    slow = {**TINY, "steps": 3000, "eval_every": 3000}
    bg = grid.start_grid([{"seed": s} for s in range(4)], tmp_path, base=slow, jobs=2)
    time.sleep(3)
    t0 = time.perf_counter()
    bg.cancel()
    assert bg.done() and time.perf_counter() - t0 < 20
    assert not any(json.loads(p.read_text())["status"] == "done" for p in (tmp_path / grid.RUNS_DIR).glob("*.json"))
    assert not list((tmp_path / grid.RUNS_DIR).glob("*.started"))
