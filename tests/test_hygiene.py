"""Notebook hygiene (no kernel): valid, stripped, one literal `parameters` cell, python3, no pip, NN_topic names."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]
PARAM_TYPES = {"int", "float", "str", "bool"}
PIP_CALL = re.compile(r"[\"']pip[\"']|pip install")
PIP = re.compile(r"^\s*[%!]\s*(pip|conda|mamba)\b|get_ipython\(\)\.(system|run_line_magic)\(.*pip", re.M)


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _param_cells(nb: nbformat.NotebookNode) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_name_and_format(path):
    assert re.fullmatch(r"\d\d_[a-z0-9]+(_[a-z0-9]+)*\.ipynb", path.name), f"{path.name}: name must be NN_topic.ipynb"
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "kernelspec.name must be python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_outputs_stripped(path):
    nb = _read(path)
    assert "widgets" not in nb.metadata, "saved widget state in metadata.widgets: run nbstripout"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"cell {i} has outputs: run nbstripout"
    res = subprocess.run([sys.executable, "-m", "nbstripout", "--verify", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, f"nbstripout --verify would change {path.name}: {res.stdout}{res.stderr}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_one_literal_parameters_cell(path):
    nb = _read(path)
    cells = _param_cells(nb)
    assert len(cells) == 1, f"expected exactly one cell tagged 'parameters'; found {len(cells)}"
    tree = ast.parse(nb.cells[cells[0]].source)
    names = []
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None, (
            f"parameters cell line {node.lineno}: only annotated assignments `name: type = literal`")
        name = node.target.id
        assert isinstance(node.annotation, ast.Name) and node.annotation.id in PARAM_TYPES, (
            f"parameter {name}: annotation must be one of {sorted(PARAM_TYPES)}")
        value = ast.literal_eval(node.value)  # raises for expressions
        kind = node.annotation.id
        assert type(value).__name__ == kind, f"parameter {name}: default {value!r} is not {kind}"
        assert not (isinstance(value, str) and "=" in value), f"{name}: no '=' in string defaults (papermill #864)"
        assert name == name.lower(), f"parameter {name}: lowercase names"
        names.append(name)
    for required in ("smoke", "seed", "output_dir"):
        assert required in names, f"parameters cell must declare {required}"
    smoke = next(n for n in tree.body if n.target.id == "smoke")
    assert ast.literal_eval(smoke.value) is False, "smoke must default to False"
    inspected = pm.inspect_notebook(str(path))
    assert sorted(inspected) == sorted(names)
    for name, info in inspected.items():
        assert info["help"], f"parameter {name} needs a trailing `# help` comment"
    following = [c for c in nb.cells[cells[0] + 1:] if c.cell_type == "code"][0]
    assert "setup_notebook(globals()" in following.source, "next code cell must call setup_notebook(globals())"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_pip_no_path_hacks(path):
    for i, cell in enumerate(_read(path).cells):
        if cell.cell_type == "code":
            assert not PIP.search(cell.source), f"cell {i}: no %pip/!pip/conda cells (install with pip install -e .)"
            if "hosted-install" not in cell.metadata.get("tags", []):  # the generated Colab cell (test_hosted.py)
                assert not PIP_CALL.search(cell.source), f"cell {i}: only the hosted-install cell may run pip"
            assert "sys.path" not in cell.source, f"cell {i}: no sys.path hacks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_listed_in_readme(path):
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md does not exist yet")
    text = readme.read_text(encoding="utf-8")
    if "SYLLABUS_PLACEHOLDER" in text:
        pytest.skip("README.md syllabus not written yet (SYLLABUS_PLACEHOLDER)")
    assert path.name in text or path.stem in text, f"{path.name} is not listed in README.md's syllabus"


def test_hygiene_checks_can_fail(tmp_path):
    """A notebook with an expression in its parameters cell, outputs and a pip cell is caught."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("smoke: bool = False\nsteps = 2 * 10")
    params.metadata["tags"] = ["parameters"]
    pip = nbformat.v4.new_code_cell("%pip install torch")
    hidden = nbformat.v4.new_code_cell('import subprocess, sys\nsubprocess.run([sys.executable, "-m", "pip"])')
    pip.outputs = [nbformat.v4.new_output("stream", text="x")]
    nb.cells = [params, pip]
    only_hidden = nbformat.v4.new_notebook(cells=[hidden])
    nbformat.write(only_hidden, tmp_path / "98_hidden.ipynb")
    with pytest.raises(AssertionError, match="only the hosted-install cell may run pip"):
        test_no_pip_no_path_hacks(tmp_path / "98_hidden.ipynb")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "99_bad.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(AssertionError, match="only annotated assignments"):
        test_one_literal_parameters_cell(path)
    with pytest.raises(AssertionError, match="no %pip"):
        test_no_pip_no_path_hacks(path)
    with pytest.raises(AssertionError, match="has outputs"):
        test_outputs_stripped(path)
