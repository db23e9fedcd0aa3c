"""Markdown tables of the results documents (fdistill_lab.course.tables)."""

from __future__ import annotations

import pytest

from fdistill_lab import stats
from fdistill_lab.course.tables import comparison_table, markdown_table


def test_markdown_table_and_a_row_of_the_wrong_length():
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"
    with pytest.raises(ValueError, match="row 0 has 1 cells, the header 2"):
        markdown_table(["a", "b"], [[1]])


def test_comparison_table_shows_the_paired_difference_and_verdict():
    rows = stats.compare({"base": [1.0, 2.0, 3.0], "other": [2.0, 3.1, 3.9]}, "base")
    text = comparison_table({"precision": rows}, against="minus base").splitlines()
    assert text[0] == "| measure | setting | mean [95% CI] | minus base | verdict |"
    assert text[2].startswith("| precision | base | 2.00 [") and text[2].endswith("| - | baseline |")
    diff = stats.paired_difference([2.0, 3.1, 3.9], [1.0, 2.0, 3.0])
    assert f"| {diff.format(signed=True)} | better |" in text[3]  # +1.0 with an interval above zero


def test_run_records_names_what_to_do(tmp_path):
    from fdistill_lab.course.tables import run_records

    with pytest.raises(ValueError, match="run notebook 04 with -p output_dir"):
        run_records(tmp_path, "04", ("fd_curves",))
    (tmp_path / "results.json").write_text('{"config": {}}')
    with pytest.raises(ValueError, match="no fd_curves, students record: it was written by an older notebook 04"):
        run_records(tmp_path, "04", ("config", "fd_curves", "students"))
    assert run_records(tmp_path, "04", ("config",)) == {"config": {}}
