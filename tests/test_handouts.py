"""Handouts: papermill execution and instructor/student HTML (on the smoke run of notebook 01 only)."""

from __future__ import annotations

import pytest
from notebook_harness import NOTEBOOKS, prepare_environment

from fdistill_lab.course import handouts
from fdistill_lab.course.records import read_records


def test_select_notebooks():
    assert [p.name for p in handouts.select_notebooks(NOTEBOOKS, ["01_f_divergences.ipynb"])] == [
        "01_f_divergences.ipynb"]
    assert all(p.name[:2].isdigit() for p in handouts.select_notebooks(NOTEBOOKS, None))
    with pytest.raises(ValueError, match="unknown notebook '99_nope'; available: 01_f_divergences"):
        handouts.select_notebooks(NOTEBOOKS, ["99_nope"])


@pytest.mark.notebooks
@pytest.mark.timeout(240)
def test_handouts_smoke_notebook_01(tmp_path, capsys):
    prepare_environment()
    assert handouts.main(["--smoke", "--only", "01_f_divergences", "--build", str(tmp_path)]) == 0
    assert "01_f_divergences: executed in" in capsys.readouterr().out
    root = tmp_path / "handouts" / "smoke"  # apart from full builds and from the test harness' build/executed
    assert (root / "executed" / "01_f_divergences.ipynb").is_file()
    assert read_records(root / "outputs" / "01_f_divergences")["gradient_identity_max_abs_error"] < 1e-5
    instructor = (root / "html" / "instructor" / "01_f_divergences.html").read_text()
    pupil = (root / "html" / "student" / "01_f_divergences.html").read_text()
    assert instructor.count("BEGIN SOLUTION") == 2 and "BEGIN SOLUTION" not in pupil
    assert pupil.count("YOUR CODE HERE") == 2 and "NotImplementedError" in pupil
    for html in (instructor, pupil):
        assert html.count("data:image/png;base64") >= 7


@pytest.mark.notebooks
@pytest.mark.timeout(240)
def test_a_failing_notebook_is_rendered_and_the_next_one_still_runs(tmp_path, capsys):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    prepare_environment()
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for name, body in [("01_bad", "raise RuntimeError('boom')"), ("02_slow", "import time\ntime.sleep(60)"),
                       ("03_good", "print('fine')")]:
        params = new_code_cell('smoke = False\noutput_dir = "out"')
        params.metadata["tags"] = ["parameters"]
        nb = new_notebook(cells=[params, new_code_cell(body)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, nbs / f"{name}.ipynb")
    stale = tmp_path / "build" / "handouts" / "full" / "outputs" / "03_good" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier build")
    assert handouts.main(["--notebooks", str(nbs), "--build", str(tmp_path / "build"), "--cell-timeout", "3"]) == 1
    out, err = capsys.readouterr()
    assert "01_bad: FAILED (RuntimeError: boom)" in out and "03_good: executed" in out and "01_bad" in err
    assert "02_slow: FAILED (CellTimeoutError" in out  # a cell timeout is rendered too, and the next one runs
    html = tmp_path / "build" / "handouts" / "full" / "html" / "instructor"
    assert "boom" in (html / "01_bad.html").read_text() and "fine" in (html / "03_good.html").read_text()
    assert (html / "02_slow.html").is_file()
    assert not stale.exists()  # every notebook starts from a fresh output folder
