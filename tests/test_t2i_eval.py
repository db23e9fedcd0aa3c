"""Evaluation of the text-to-image student with tiny components and stand-ins (no downloads): the teacher's DDIM
sampler, CLIP score through transformers' CLIPModel, COCO captions and reference statistics, zero-shot FID, the
command line end to end, latency."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from fdistill_lab.t2i import cli  # noqa: E402
from fdistill_lab.t2i.data import write_caption_folder  # noqa: E402
from fdistill_lab.t2i.evaluate import (  # noqa: E402
    coco_prompts,
    coco_reference,
    evaluate_fid,
    latency,
    prompts_path,
    teacher_sample,
)
from fdistill_lab.t2i.tiny import (  # noqa: E402
    RandomFeatureDetector,
    save_tiny_pipeline,
    synthetic_pairs,
    tiny_clip_scorer,
    tiny_components,
    write_fake_coco,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def comps():
    return tiny_components()


def test_teacher_sampler_is_deterministic_and_guidance_matters(comps):
    a = teacher_sample(comps, ["a red circle", "a blue square"], steps=4, guidance=3.0, seed=1)
    b = teacher_sample(comps, ["a red circle", "a blue square"], steps=4, guidance=3.0, seed=1)
    c = teacher_sample(comps, ["a red circle", "a blue square"], steps=4, guidance=1.0, seed=1)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and not torch.allclose(a, c)
    assert float(a.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        teacher_sample(comps, ["x"], steps=0)


def test_clip_score_is_a_cosine_per_image_and_checks_its_inputs(comps):
    scorer = tiny_clip_scorer()
    images, captions = synthetic_pairs(3, 32)
    s = scorer(images, captions)
    assert s.shape == (3,) and bool((s.abs() <= 1).all())
    assert not torch.allclose(s, scorer(images, ["a yellow square"] * 3))  # the text enters the score
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        scorer(images[:2], captions)
    with pytest.raises(FileNotFoundError, match="hf download openai/clip-vit-large-patch14"):
        type(scorer).from_pretrained("/no/such/clip")


def test_coco_prompts_and_reference_give_fid_zero_for_the_reference_images(tmp_path):
    coco = write_fake_coco(tmp_path / "coco", n=12, resolution=40)
    pairs = coco_prompts(coco, 10, seed=0)
    assert len(pairs) == 10 and len({p["file"] for p in pairs}) == 10 and pairs == coco_prompts(coco, 10, seed=0)
    det = RandomFeatureDetector()
    ref = coco_reference(coco, tmp_path / "ref.npz", det, n=10, resolution=32, batch_size=4)
    stored = json.loads(prompts_path(ref).read_text())
    assert [p["caption"] for p in stored["pairs"]] == [p["caption"] for p in pairs]
    from fdistill_lab.t2i.data import load_image

    real = torch.stack([load_image(coco / "val2014" / p["file"], 32) for p in pairs])  # in the captions' order
    same = evaluate_fid(lambda prompts, i: real[i:i + len(prompts)], det, ref, batch_size=4)
    assert same["images"] == 10 and abs(same["fid"]) < 1e-4
    noise = evaluate_fid(lambda prompts, i: torch.rand(len(prompts), 3, 32, 32) * 2 - 1, det, ref, batch_size=4)
    assert noise["fid"] > 0.1
    with pytest.raises(FileNotFoundError, match="captions_val2014.json not found.*val2014.zip"):
        coco_prompts(tmp_path / "empty")
    with pytest.raises(ValueError, match="asked for 99 captions but"):
        coco_prompts(coco, 99)


def test_command_line_trains_builds_the_reference_and_evaluates(tmp_path, capsys):
    pipe = save_tiny_pipeline(tmp_path / "pipe")
    images, captions = synthetic_pairs(8, 32)
    data = write_caption_folder(tmp_path / "data", images, captions)
    run = tmp_path / "run"
    argv = ["train", "--pipeline", str(pipe), "--data", str(data), "--out", str(run), "--preset", "tiny",
            "--set", "steps=2", "--set", "sample_every=0"]
    assert cli.main(argv) == 0 and "done at step 2" in capsys.readouterr().out
    det_path = tmp_path / "detector.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated; the Inception detector is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(RandomFeatureDetector()).save(str(det_path))
    coco = write_fake_coco(tmp_path / "coco", n=6, resolution=32)
    ref = tmp_path / "coco.npz"
    assert cli.main(["coco-ref", "--coco", str(coco), "--detector", str(det_path), "--out", str(ref), "--n", "6",
                     "--resolution", "32", "--device", "cpu"]) == 0
    assert cli.main(["evaluate", "--run", str(run), "--pipeline", str(pipe), "--detector", str(det_path), "--ref",
                     str(ref), "--batch", "3"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["images"] == 6 and np.isfinite(res["fid"]) and res["step"] == 2
    assert 0 < res["latency_student_s"] < res["latency_teacher50_s"]
    grid = tmp_path / "grid.png"
    assert cli.main(["grid", "--run", str(run), "--pipeline", str(pipe), "--prompt", "a red circle", "--prompt",
                     "a blue square", "--out", str(grid), "--teacher-steps", "3"]) == 0
    from PIL import Image

    assert Image.open(grid).size == (2 * 33 + 1, 2 * 33 + 1)  # 2 x 2 tiles of 32 pixels, 1-pixel padding
    assert cli.main(["describe", "--preset", "sd15", "--set", "cfg=nope"]) == 2
    assert "guidance_scale" in capsys.readouterr().err


def test_latency_is_a_median_of_positive_times():
    assert 0.0 < latency(lambda: sum(range(1000)), repeats=3) < 1.0
