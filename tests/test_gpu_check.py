"""scripts/gpu_check.py runs its whole measurement code path on a tiny network on the CPU (the real check
needs a GPU: scripts/gpu_check.sh)."""

from __future__ import annotations

import json

import pytest
import torch

SCRIPT = "scripts/gpu_check.py"


def _run_tiny(gc, tmp_path, capsys, *flags: str) -> tuple[int, str, dict]:
    """gpu_check on the tiny network on the CPU: (exit code, stdout, the JSON figures)."""
    rc = gc.main(["--device", "cpu", "--tiny", "--repeats", "1", *flags, "--json", str(tmp_path / "f.json")])
    return rc, capsys.readouterr().out, json.loads((tmp_path / "f.json").read_text())


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("one_thread")
def test_gpu_check_code_path_on_cpu(tmp_path, capsys, load_script):
    gc = load_script(SCRIPT)
    rc, out, fig = _run_tiny(gc, tmp_path, capsys, "--batch", "4", "--ab-batch", "2", "--profile", "3")
    assert rc == 0
    for text in ("2. batch 4", "teacher fwd+bwd to input", "teacher encoder, no grad (critic, x2)",
                 "student fwd, no grad (critic)", "JS overhead on the iteration", "FLOPs: generator step",
                 "EDM float32 attention", "channels-last", "Self CPU time total"):
        assert text in out
    assert fig["batch_per_gpu"] == 4 and fig["iteration_s"] > 0 and fig["flops_per_iteration"] > 0
    assert fig["student_fwd_bwd_ab_s"]["batch"] == 2 and fig["student_fwd_bwd_ab_s"]["channels-last"] > 0
    assert "errors" not in fig
    assert fig["mfu"] is None  # unknown peak on a CPU
    assert gc.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12 and gc.peak_flops("x", 100.0) == 1e14
    assert gc.peak_flops("NVIDIA H100 PCIe", None) == 756e12 and gc.peak_flops("NVIDIA H100 NVL", None) == 835e12


def test_gpu_check_refuses_cuda_without_a_gpu(capsys, load_script):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert load_script(SCRIPT).main(["--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("one_thread")
def test_gpu_check_reports_a_failing_stage_and_runs_the_rest(tmp_path, capsys, load_script, monkeypatch):
    gc = load_script(SCRIPT)

    def broken(*args):
        raise RuntimeError("flop counter broke")

    monkeypatch.setattr(gc, "step_flops", broken)
    rc, out, fig = _run_tiny(gc, tmp_path, capsys, "--batch", "2", "--ab-batch", "2")
    assert rc == 1
    assert "FAILED: RuntimeError: flop counter broke" in out and "failed stages: mfu" in out
    assert fig["errors"] == {"mfu": "RuntimeError: flop counter broke"}
    assert fig["js_overhead"] is not None and "student_fwd_bwd_ab_s" in fig  # the stages around it ran


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("one_thread")
def test_gpu_check_searches_the_batch_and_times_a_smaller_one(tmp_path, capsys, load_script):
    rc, out, fig = _run_tiny(load_script(SCRIPT), tmp_path, capsys, "--start-batch", "4", "--max-batch", "16",
                             "--ab-batch", "0")
    assert rc == 0
    assert "batch 16: fits" in out and "2. batch 16:" in out and "   batch 8: generator step" in out
    assert fig["largest_batch"] == 16 and set(fig["batches"]) == {"16", "8"}
    best = max(fig["batches"], key=lambda b: fig["batches"][b]["images_per_s"])
    assert fig["batch_per_gpu"] == int(best) and f"fastest per image: batch {best}" in out


def test_gpu_check_presets_pick_their_edm_network(load_script, capsys):
    from fdistill_lab.networks import cifar10_ddpmpp_config, imagenet64_adm_config

    gc = load_script(SCRIPT)
    assert gc.teacher_config("cifar10", False) == dict(cifar10_ddpmpp_config(), dropout=0.0)
    assert gc.teacher_config("dmd2", False) == gc.teacher_config("imagenet64", False) == dict(
        imagenet64_adm_config(), dropout=0.0)
    assert gc.teacher_config("cifar10", True) == gc.teacher_config("imagenet64", True)  # --tiny: the smoke net
    with pytest.raises(SystemExit):
        gc.main(["--device", "cpu", "--preset", "cifar"])
    assert "invalid choice: 'cifar'" in capsys.readouterr().err


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_thread")
def test_gpu_check_times_the_step_variants_side_by_side(tmp_path, capsys, load_script):
    """Stage 8 on the CPU: the eager step and its variants (a compiled one with dynamo's eager backend: graph capture
    only; tests/test_speed.py checks the compiled maths), each from the same initial state, with the same FLOP
    count (counted here, stage 5 being skipped); the CUDA-graph variant is left out on a CPU, and says so."""
    rc, out, fig = _run_tiny(load_script(SCRIPT), tmp_path, capsys, "--batch", "4", "--skip",
                             "passes,js_vs_rkl,mfu,student_ab", "--variants",
                             "layout,microbatch,compile_steps,compile_steps_graphs", "--compile-backend", "eager",
                             "--variant-repeats", "1", "--micro-batch", "2", "--variant-batch", "6")
    assert rc == 0 and "errors" not in fig and fig["batch_per_gpu"] == 4
    var = fig["variants"]
    assert list(var) == ["compile_steps_graphs", "eager", "layout", "microbatch", "compile_steps"]
    assert var["compile_steps_graphs"] == {"skipped": "needs a CUDA device"} and "they need CUDA" in out
    for name in ("eager", "layout", "microbatch", "compile_steps"):
        r = var[name]
        assert r["iteration_s"] > 0 and r["images_per_s"] > 0 and r["mfu"] is None and f"   {name}: batch" in out
        assert r["batch"] == (8 if name == "microbatch" else 6)  # --variant-batch; microbatch: 4 x --micro-batch
    assert fig["flops_per_image"] > 0
    for name in ("layout", "compile_steps"):  # fp32 on a CPU: the same numbers up to rounding
        assert var[name]["max_rel_diff_vs_eager"] < 1e-5 and var[name]["first_logs"]["loss_critic"] > 0
    assert var["compile_steps"]["compile_s"] > 10 * var["compile_steps"]["iteration_s"]  # dynamo traced it
    assert var["compile_steps"]["graphs"] >= 2 and "graphs" not in var["layout"]
    assert "js_overhead" in var["layout"] and "js_overhead" not in var["compile_steps"]  # --variant-js-rkl default
    assert "js_overhead" not in var["microbatch"]  # measured on one batch, not on the micro-batches
    mb = var["microbatch"]
    assert mb["batch"] == 8 and mb["settings"] == {"accum_steps": 4} and mb["single_micro_batch"]["batch"] == 2
    assert mb["overhead_vs_single"] == pytest.approx(mb["iteration_s"] / (4 * mb["single_micro_batch"]["iteration_s"])
                                                     - 1)
    assert "images/s against eager: eager 1.00x" in out


def test_gpu_check_refuses_an_unknown_variant(capsys, load_script):
    assert load_script(SCRIPT).main(["--device", "cpu", "--tiny", "--variants", "eager,fastest"]) == 2
    err = capsys.readouterr().err
    assert "unknown variant(s) ['fastest']" in err and "compile_steps_graphs" in err


def _gpu_check_sh(tmp_path, **env: str):
    import os
    import subprocess

    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", "scripts/gpu_check.sh"], capture_output=True, text=True, env=env, timeout=280,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(300)
def test_gpu_check_sh_dry_run_writes_the_merged_figures(tmp_path):
    """gpu_check.sh's CPU dry run of one stage (the cifar10 stage on the tiny network): the stage's figures merged
    with its exit status and wall time into gpu_check_<date>_cpu.json; an unknown stage name is refused."""
    bad = _gpu_check_sh(tmp_path, GPU_CHECK_STAGES="variants,speed")
    assert bad.returncode == 2 and "unknown stage 'speed'" in bad.stderr
    run = _gpu_check_sh(tmp_path, GPU_CHECK_DRY_RUN="1", GPU_CHECK_STAGES="cifar10_r1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (merged,) = tmp_path.glob("gpu_check_*_cpu.json")
    doc = json.loads(merged.read_text())
    assert doc["device"] == "cpu" and list(doc["stages"]) == ["cifar10_r1"]
    stage = doc["stages"]["cifar10_r1"]
    assert stage["exit"] == 0 and stage["wall_s"] >= 1
    assert set(stage["figures"]["variants"]) == {"eager", "layout"} and "== cifar10_r1:" in run.stdout


@pytest.mark.timeout(60)
def test_gpu_table_renders_a_merged_run(tmp_path, capsys, load_script):
    """scripts/gpu_table.py: one markdown row per measured variant, from gpu_check.sh's merged JSON."""
    eager = {"batch": 160, "iteration_s": 0.75, "images_per_s": 213.3, "peak_memory_gib": 65.6, "mfu": 0.225,
             "compile_s": 0.0, "js_overhead": 0.001}
    fast = {**eager, "iteration_s": 0.5, "images_per_s": 320.0, "mfu": 0.3375, "compile_s": 95.0,
            "max_rel_diff_vs_eager": 2e-3}
    micro = {**eager, "batch": 512, "single_micro_batch": {"batch": 128}, "overhead_vs_single": 0.031}
    doc = {"device": "NVIDIA H200", "date": "2026-12-04", "stages": {"variants": {"exit": 0, "wall_s": 250, "figures": {
        "variants": {"eager": eager, "compile_steps": fast, "microbatch": micro,
                     "compile_steps_graphs": {"skipped": "needs a CUDA device"}}}}, "pytest_gpu": {"exit": 0}}}
    path = tmp_path / "gpu_check_2026-12-04_NVIDIA-H200.json"
    path.write_text(json.dumps(doc))
    table = load_script("scripts/gpu_table.py")
    assert table.main([str(path)]) == 0
    out = capsys.readouterr().out
    row = "| variants | compile_steps | 160 | 500 ms | 320 | 1.50x | 65.6 GiB | 33.8% | 95 s | 2.0e-03 | +0.10% |"
    assert row in out
    assert "| variants | microbatch (4 x 128: +3.10% vs one) | 512 |" in out and "skipped: needs a CUDA device" in out
    assert table.main([str(tmp_path / "missing.json")]) == 2 and "not found" in capsys.readouterr().err
    path.write_text(json.dumps({"stages": {"pytest_gpu": {"exit": 0}}}))
    assert table.main([str(path)]) == 1 and "no measured variants (stages: pytest_gpu)" in capsys.readouterr().err
