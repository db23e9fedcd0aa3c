"""Notebook 06 (text to image, GPU): without a GPU and without smoke it stops in its first code cell; bad settings
and missing downloads fail in the setup cell, naming what to fix; the smoke run drives the whole pipeline on the
CPU (tiny random diffusers components, synthetic captioned images, fake COCO, stand-in detector and CLIP)."""

from __future__ import annotations

import math

import nbformat
import pytest
import torch
from notebook_harness import EXECUTED, assert_rejected_before_writing, declared_parameters, run_notebook

pytest.importorskip("diffusers")

from notebook_harness import run_notebook_expecting_error  # noqa: E402

NAME = "06_text_to_image"

pytestmark = pytest.mark.notebooks


def test_declared_parameters():
    params = declared_parameters(NAME)
    for name in ("div", "preset", "pipeline", "data", "coco_ref", "fid_detector", "clip_model", "guidance",
                 "batch_size", "steps", "gpus", "fid_every", "fid_images", "overrides", "seed", "smoke", "output_dir"):
        assert name in params, f"parameter {name} missing; declared {sorted(params)}"
    assert params["div"]["default"].strip("\"'") == "js" and params["guidance"]["default"] == "1.75"
    assert params["batch_size"]["default"] == "1024" and params["steps"]["default"] == "60000"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
@pytest.mark.timeout(120)
def test_without_gpu_and_smoke_it_stops_in_the_first_code_cell(tmp_path, monkeypatch):
    monkeypatch.delenv("FDISTILL_SMOKE", raising=False)
    out = tmp_path / "out"
    err = run_notebook_expecting_error(NAME, out, {"smoke": False, "div": "nonsense"})
    assert err.ename == "RuntimeError" and "needs a CUDA GPU" in err.evalue and "-p smoke True" in err.evalue
    assert "Stable Diffusion 1.5" in err.evalue
    nb = nbformat.read(EXECUTED / f"{NAME}_error.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert any(o.get("output_type") == "error" for o in code[1].outputs)
    assert all(c.execution_count is None for c in code[2:])
    assert not out.exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("params", "message"), [
    ({"div": "nonsense"}, "unknown divergence 'nonsense'"),
    ({"overrides": "lr=2e-5; t_min=2"}, "need 0 <= t_min < t_max <= 1"),
])
def test_bad_settings_fail_in_the_setup_cell(tmp_path, params, message):
    assert_rejected_before_writing(NAME, tmp_path, params, message)


@pytest.mark.timeout(240)
def test_smoke_run_trains_evaluates_and_tabulates_against_table4(tmp_path):
    nb, rec = run_notebook(NAME, tmp_path, parameters={"div": "js"}, budget_s=120.0, min_images=4)
    run, m = rec["run"], rec["metrics"]
    assert run["status"] == "done" and run["preset"] == "tiny" and run["smoke"] and run["divergence"] == "js"
    assert run["steps_done"] == 4 and run["world_size"] == 1 and run["sample_grids"] == 2
    assert run["fid_evaluations_during_training"] == 2
    assert m["images"] == 16 and math.isfinite(m["fid"]) and m["fid"] > 0 and -1 <= m["clip_score"] <= 1
    assert 0 < m["latency_student_s"] < m["latency_teacher50_s"] and not m["comparable_with_paper"]
    assert math.isfinite(m["final_loss_f"]) and m["final_ratio_mean"] > 0
    text = "".join(o.get("data", {}).get("text/plain", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "paper, Table 4" in text and "SMOKE (not a result)" in text and "7.42" in text
    assert (tmp_path / "results.json").is_file() and (tmp_path / "run" / "checkpoints" / "latest.json").is_file()
