"""scripts/gpu_check.py runs its whole measurement code path on a tiny network on the CPU (the real check
needs a GPU: scripts/gpu_check.sh)."""

from __future__ import annotations

import json

import pytest
import torch

SCRIPT = "scripts/gpu_check.py"


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("one_thread")
def test_gpu_check_code_path_on_cpu(tmp_path, capsys, load_script):
    gc = load_script(SCRIPT)
    assert gc.main(["--device", "cpu", "--tiny", "--batch", "4", "--repeats", "1",
                    "--json", str(tmp_path / "f.json")]) == 0
    out = capsys.readouterr().out
    for text in ("2. batch 4", "teacher fwd+bwd to input", "JS overhead on the iteration", "FLOPs: generator step"):
        assert text in out
    fig = json.loads((tmp_path / "f.json").read_text())
    assert fig["batch_per_gpu"] == 4 and fig["iteration_s"] > 0 and fig["flops_per_iteration"] > 0
    assert fig["mfu"] is None  # unknown peak on a CPU
    assert gc.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12 and gc.peak_flops("x", 100.0) == 1e14
    assert gc.peak_flops("NVIDIA H100 PCIe", None) == 756e12 and gc.peak_flops("NVIDIA H100 NVL", None) == 835e12


def test_gpu_check_refuses_cuda_without_a_gpu(capsys, load_script):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert load_script(SCRIPT).main(["--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
