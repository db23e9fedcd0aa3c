"""Notebook 05 (ImageNet-64, GPU): without a GPU and without smoke it stops in its first code cell; the
smoke run drives the whole pipeline on the CPU (tiny preset, synthetic data, stand-in detector)."""

from __future__ import annotations

import math

import nbformat
import pytest
import torch
from notebook_harness import EXECUTED, declared_parameters, run_notebook, run_notebook_expecting_error

from fdistill_lab.train import launch

NAME = "05_imagenet"

pytestmark = pytest.mark.notebooks


def test_declared_parameters():
    params = declared_parameters(NAME)
    for name in ("div", "teacher_path", "data_path", "batch_size", "steps", "gpus", "output_dir", "smoke", "seed",
                 "fid_every", "fid_images", "overrides"):
        assert name in params, f"parameter {name} missing; declared {sorted(params)}"
    assert params["div"]["default"].strip("\"'") == "js" and params["batch_size"]["default"] == "512"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
@pytest.mark.timeout(120)
def test_without_gpu_and_smoke_it_stops_in_the_first_code_cell(tmp_path, monkeypatch):
    monkeypatch.delenv("FDISTILL_SMOKE", raising=False)
    out = tmp_path / "out"
    err = run_notebook_expecting_error(NAME, out, {"smoke": False, "div": "nonsense"})
    assert err.ename == "RuntimeError" and "needs a CUDA GPU" in err.evalue and "-p smoke True" in err.evalue
    nb = nbformat.read(EXECUTED / f"{NAME}_error.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert any(o.get("output_type") == "error" for o in code[1].outputs)  # the first code cell after parameters
    assert all(c.execution_count is None for c in code[2:])
    assert not out.exists()  # nothing written


@pytest.mark.timeout(120)
def test_bad_divergence_fails_in_the_setup_cell(tmp_path):
    err = run_notebook_expecting_error(NAME, tmp_path / "out", {"div": "nonsense"})
    assert err.ename == "ValueError" and "unknown divergence 'nonsense'" in err.evalue
    assert not (tmp_path / "out").exists()


def test_missing_files_say_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        launch.check_inputs("imagenet64", "js", {"teacher": str(tmp_path / "t.pkl"), "data": str(tmp_path / "d.zip"),
                                                 "fid_ref": str(tmp_path / "r.npz")})
    msg = str(info.value)
    assert "teacher" in msg and "python -m fdistill_lab.download imagenet64" in msg
    assert "prepare_imagenet" in msg and "imagenet-64x64.npz" in msg and "smoke True" in msg
    with pytest.raises(ValueError, match="unknown preset 'in64'"):
        launch.check_inputs("in64", "js", {})
    assert launch.overrides_from_text("lr=1e-5; betas=0.5,0.9;") == {"lr": "1e-5", "betas": "0.5,0.9"}
    with pytest.raises(ValueError, match="key=value"):
        launch.overrides_from_text("lr 1e-5")
    cmd = launch.train_command("imagenet64", "t.pkl", "d.zip", "out", {"lr": "1e-6"}, gpus=8, python="py")
    assert cmd[:5] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    assert cmd[5:7] == ["-m", "fdistill_lab.train"] and "lr=1e-6" in cmd


@pytest.mark.timeout(240)
def test_smoke_run_trains_samples_and_measures_fid(tmp_path):
    """On a CPU-only machine the whole pipeline on the CPU; with a GPU the same smoke run on the GPU."""
    nb, rec = run_notebook(NAME, tmp_path, parameters={"div": "fkl"}, budget_s=90.0, min_images=3)
    run, m = rec["run"], rec["metrics"]
    assert run["status"] == "done" and run["preset"] == "tiny" and run["divergence"] == "fkl" and run["smoke"]
    assert run["steps_done"] == 6 and run["world_size"] == 1 and run["batch_size"] == 8
    assert run["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert m["fid_evaluations"] == 2 and m["sample_grids"] == 2
    assert math.isfinite(m["last_fid"]) and 0 < m["best_fid"] <= m["last_fid"]
    assert m["images_per_s"] > 0 and math.isfinite(m["final_loss_f"]) and m["final_ratio_mean"] > 0
    assert (tmp_path / "run" / "student_final.pt").is_file()
    assert (tmp_path / "run" / "checkpoints" / "latest.json").is_file()
