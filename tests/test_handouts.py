"""Handouts: papermill execution and instructor/student HTML (on the smoke run of notebook 01 only)."""

from __future__ import annotations

import pytest
from notebook_harness import NOTEBOOKS, prepare_environment

from fdistill_lab import handouts
from fdistill_lab.records import read_records


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
    assert (tmp_path / "executed" / "01_f_divergences.ipynb").is_file()
    assert read_records(tmp_path / "outputs" / "01_f_divergences")["gradient_identity_max_abs_error"] < 1e-5
    instructor = (tmp_path / "html" / "instructor" / "01_f_divergences.html").read_text()
    pupil = (tmp_path / "html" / "student" / "01_f_divergences.html").read_text()
    assert instructor.count("BEGIN SOLUTION") == 2 and "BEGIN SOLUTION" not in pupil
    assert pupil.count("YOUR CODE HERE") == 2 and "NotImplementedError" in pupil
    for html in (instructor, pupil):
        assert html.count("data:image/png;base64") >= 7
