"""scripts/t2i_gpu_check.py runs its measurement code path on the tiny components on the CPU (the real check, a
full-size SD1.5 U-Net in bf16, needs a GPU)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

SCRIPT = "scripts/t2i_gpu_check.py"


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("one_thread")
def test_t2i_gpu_check_code_path_on_cpu(tmp_path, capsys, load_script):
    gc = load_script(SCRIPT)
    rc = gc.main(["--device", "cpu", "--tiny", "--start-batch", "2", "--max-batch", "4", "--repeats", "1",
                  "--json", str(tmp_path / "f.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    fig = json.loads((tmp_path / "f.json").read_text())
    for text in ("1. batch per GPU 4", "2. generator step", "3. model FLOPs per iteration", "4. estimate: 60000"):
        assert text in out
    assert fig["batch_per_gpu"] == 4 and fig["iteration_s"] > 0 and fig["flops_per_iteration"] > 0
    assert fig["mfu"] is None and fig["paper_run_accum_steps"] == 32 and fig["paper_run_estimate_h"] > 0


def test_a_pipeline_folder_replaces_the_random_weights(tmp_path, capsys, load_script):
    from fdistill_lab.t2i.tiny import save_tiny_pipeline

    pipe = save_tiny_pipeline(tmp_path / "pipe")
    rc = load_script(SCRIPT).main(["--device", "cpu", "--tiny", "--pipeline", str(pipe), "--batch", "2", "--repeats",
                                   "1", "--json", str(tmp_path / "f.json")])
    assert rc == 0 and "1. batch per GPU 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "f.json").read_text())["weights"] == str(pipe)


def test_full_size_unet_config_is_sd15s(load_script):
    """The random U-Net the GPU check times has SD1.5's shape: 859,520,964 parameters (built on the meta device:
    no memory, no download)."""
    from diffusers import UNet2DConditionModel

    cfg = load_script(SCRIPT).SD15_UNET
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert cfg["sample_size"] == 64 and cfg["cross_attention_dim"] == 768


def test_refuses_cuda_without_a_gpu(capsys, load_script):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert load_script(SCRIPT).main(["--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_flop_count_on_the_meta_device_runs_nothing(tmp_path, capsys, load_script):
    gc = load_script(SCRIPT)
    assert gc.main(["--device", "meta", "--tiny", "--json", str(tmp_path / "f.json")]) == 0
    fig = json.loads((tmp_path / "f.json").read_text())
    assert fig["generator_step_flops_per_image"] > 0 and fig["critic_step_flops_per_image"] > 0
    k = 2  # the tiny preset's student_update_freq
    want = (fig["generator_step_flops_per_image"] + (k - 1) * fig["critic_step_flops_per_image"]) / k
    assert fig["iteration_flops_per_image"] == pytest.approx(want)
    assert "a lower bound, not a measurement" in capsys.readouterr().out
