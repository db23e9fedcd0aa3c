"""Unit tests of fdistill_lab.course.notebook (parameter validation) and fdistill_lab.course.records (JSON records)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fdistill_lab.course import records
from fdistill_lab.course.notebook import injected_names, setup_notebook, validate_parameters


def _ns(tmp_path: Path, injected: str | None = None, **overrides) -> dict:
    ns = {"__annotations__": {"smoke": bool, "seed": int, "steps": int, "lr": float, "div": str, "output_dir": str},
          "smoke": False, "seed": 0, "steps": 3000, "lr": 1e-3, "div": "js", "output_dir": str(tmp_path / "out"),
          "In": ["", 'smoke: bool = False'] + ([injected] if injected else [])}
    ns.update(overrides)
    return ns


def test_valid_parameters_and_pick(tmp_path, monkeypatch):
    monkeypatch.delenv("FDISTILL_SMOKE", raising=False)
    ns = _ns(tmp_path, injected="# Parameters\nsteps = 5\nlr = 1\n", steps=5, lr=1)
    cfg = setup_notebook(ns, quiet=True)
    assert cfg.params["steps"] == 5 and cfg.params["lr"] == 1.0 and isinstance(ns["lr"], float)
    assert cfg.output_dir.is_dir() and cfg.pick(full=100, smoke=2) == 100 and not cfg.smoke


def test_unknown_injected_name_lists_valid_names(tmp_path):
    ns = _ns(tmp_path, injected="# Parameters\nstepz = 3\nSMOKE = True\n", stepz=3, SMOKE=True)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) 'stepz', 'SMOKE'; valid parameter names: div, lr"):
        setup_notebook(ns, quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "value", "pattern"), [
    ("steps", "abc", "parameter 'steps' must be int; got str 'abc'"),
    ("steps", True, "parameter 'steps' must be int; got bool"),
    ("smoke", "true", "-p smoke True"),
    ("lr", "0.1", "parameter 'lr' must be float"),
    ("div", 3, "parameter 'div' must be str"),
])
def test_wrong_type_rejected_before_output_dir(tmp_path, name, value, pattern):
    with pytest.raises(TypeError, match=pattern):
        setup_notebook(_ns(tmp_path, **{name: value}), quiet=True)
    assert not (tmp_path / "out").exists()


def test_notebook_validate_hook_runs_before_output_dir(tmp_path):
    def validate(values):
        raise ValueError(f"unknown divergence {values['div']!r}")

    with pytest.raises(ValueError, match="unknown divergence 'js'"):
        setup_notebook(_ns(tmp_path), validate=validate, quiet=True)
    assert not (tmp_path / "out").exists()


def test_missing_required_and_unsupported_annotation(tmp_path):
    ns = _ns(tmp_path)
    del ns["__annotations__"]["seed"]
    with pytest.raises(ValueError, match="missing seed"):
        validate_parameters(ns)
    ns = _ns(tmp_path)
    ns["__annotations__"]["shape"] = list
    ns["shape"] = [1]
    with pytest.raises(TypeError, match="annotated 'list'"):
        validate_parameters(ns)


def test_smoke_env_and_seeding(tmp_path, monkeypatch):
    monkeypatch.setenv("FDISTILL_SMOKE", "1")
    ns = _ns(tmp_path, seed=7)
    cfg = setup_notebook(ns, quiet=True)
    a = torch.rand(3)
    assert cfg.smoke and ns["smoke"] is True and cfg.pick(full=100, smoke=2) == 2
    setup_notebook(_ns(tmp_path, seed=7), quiet=True)
    assert torch.equal(a, torch.rand(3))
    monkeypatch.setenv("FDISTILL_SMOKE", "0")  # does not force smoke off: an explicit -p smoke True wins
    assert setup_notebook(_ns(tmp_path, smoke=True), quiet=True).smoke
    assert not setup_notebook(_ns(tmp_path), quiet=True).smoke
    monkeypatch.setenv("FDISTILL_SMOKE", "maybe")
    with pytest.raises(ValueError, match="FDISTILL_SMOKE must be 1 or 0"):
        setup_notebook(_ns(tmp_path), quiet=True)


def test_injected_names_takes_latest_parameters_cell():
    hist = ["# Parameters\na = 1\n", "x = 2", "# Parameters\nb = 'q=1'\nc: int = 3\n", "y = 1"]
    assert injected_names(hist) == ["b", "c"]
    assert injected_names(None) == []


def test_record_merges_atomically(tmp_path):
    records.record(tmp_path, "a", 1.5, show=False)
    records.record(tmp_path, "b", {"x": torch.tensor([1.0, 2.0]), "y": [True, None]}, show=False)
    records.record(tmp_path, "a", 2, show=False)
    assert records.read_records(tmp_path) == {"a": 2, "b": {"x": [1.0, 2.0], "y": [True, None]}}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary files left
    json.loads((tmp_path / "results.json").read_text())


def test_record_failure_keeps_previous_file(tmp_path, monkeypatch):
    records.record(tmp_path, "a", 1, show=False)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        records.record(tmp_path, "b", 2, show=False)
    assert records.read_records(tmp_path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_record_bad_input(tmp_path):
    with pytest.raises(ValueError, match="non-empty string"):
        records.record(tmp_path, "", 1, show=False)
    with pytest.raises(TypeError, match="cannot record a object"):
        records.record(tmp_path, "x", object(), show=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        records.record(tmp_path / "missing", "x", 1, show=False)
    with pytest.raises(FileNotFoundError, match="no records"):
        records.read_records(tmp_path / "missing")


def test_papermill_from_the_repository_root_works_in_notebooks(tmp_path, monkeypatch):
    """A notebook launched from this checkout's root moves to notebooks/ (relative paths as under Jupyter);
    launched anywhere else it stays put."""
    from fdistill_lab.course import notebook

    root = notebook.NOTEBOOKS_DIR.parent
    assert (root / "pyproject.toml").is_file() and (notebook.NOTEBOOKS_DIR / "01_f_divergences.ipynb").is_file()
    monkeypatch.chdir(root)
    assert notebook.use_notebooks_folder() == notebook.NOTEBOOKS_DIR
    assert Path.cwd() == notebook.NOTEBOOKS_DIR
    monkeypatch.chdir(tmp_path)
    assert notebook.use_notebooks_folder() is None and Path.cwd() == tmp_path
