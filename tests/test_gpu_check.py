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
