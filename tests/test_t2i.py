"""Text-to-image f-distill (fdistill_lab.t2i) on CPU with tiny randomly initialised diffusers components: one
step per divergence, rkl equals DMD2's update on the same latents, CFG in the target, kill-and-resume equals an
uninterrupted run, two gloo processes equal one on the same global batch, loader round trip and clear errors."""

from __future__ import annotations

import os
import socket
import tarfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fdistill_lab import divergences  # noqa: E402
from fdistill_lab.t2i.config import T2IConfig, resolve  # noqa: E402
from fdistill_lab.t2i.data import CaptionDataset, write_caption_folder  # noqa: E402
from fdistill_lab.t2i.denoiser import GuidedDenoiser, SDDenoiser  # noqa: E402
from fdistill_lab.t2i.evaluate import coco_reference  # noqa: E402
from fdistill_lab.t2i.loader import load_components, missing_files  # noqa: E402
from fdistill_lab.t2i.run import train  # noqa: E402
from fdistill_lab.t2i.schedule import VPSchedule, timestep_from_sigma  # noqa: E402
from fdistill_lab.t2i.tiny import (  # noqa: E402
    save_detector,
    save_tiny_clip,
    save_tiny_pipeline,
    synthetic_pairs,
    tiny_components,
    write_fake_coco,
)
from fdistill_lab.t2i.trainer import T2ITrainer  # noqa: E402
from fdistill_lab.train.fid import load_detector  # noqa: E402
from fdistill_lab.train.run_folder import read_jsonl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle", "a blue square", "a green circle", "a yellow square"]


@pytest.fixture(scope="module")
def comps():
    return tiny_components()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t2i")
    images, captions = synthetic_pairs(16, 32)
    coco = write_fake_coco(root / "coco", n=8, resolution=32)
    det = save_detector(root / "detector.pt")
    ref = coco_reference(coco, root / "coco.npz", load_detector(det), n=8, resolution=32)
    return {"pipeline": save_tiny_pipeline(root / "pipe"), "data": write_caption_folder(root / "data", images,
                                                                                         captions),
            "fid": {"fid_ref": str(ref), "fid_detector": str(det), "clip_model": str(save_tiny_clip(root / "clip")),
                    "fid_images": 8}}


def _batch(comps, seed: int = 0, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    images, captions = synthetic_pairs(n, 32, seed)
    return comps.encode_images(images), comps.encode_text(captions)


def _cfg(**kw) -> T2IConfig:
    return resolve("tiny", kw)[0]


@pytest.mark.parametrize("div", divergences.names())
def test_one_generator_and_one_critic_step_per_divergence(comps, div):
    tr = T2ITrainer(comps, _cfg(divergence=div, r1_gamma=0.5), "cpu")
    before = [p.detach().clone() for p in tr.student.parameters()]
    g = tr.step(*_batch(comps))
    c = tr.step(*_batch(comps, 1))
    assert g["generator_step"] == 1.0 and "loss_dsm" in c and "r1" in c
    assert all(torch.isfinite(torch.tensor(v)) for v in {**g, **c}.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.student.parameters()))
    assert abs(g["ratio_norm_mean"] - 1.0) < 1e-5  # stage 1 with bin EMA 0: per-bin mean ratio 1


def _dmd2_gradients(tr: T2ITrainer, emb: torch.Tensor) -> list[torch.Tensor]:
    """DMD2's distribution-matching gradient written out here (no weighting, no library loss): the same draws as
    the trainer's generator micro-batch (latents, time, noise)."""
    n = emb.shape[0]
    s = tr.config.student_sigma
    z = tr.rng.randn(n, 4, 8, 8)
    x = tr.student(z * s, torch.full((n,), s), emb)
    sigma = tr.draw_sigma(n, critic=False)
    eps = tr.rng.randn(*x.shape)
    x_t = x + sigma.reshape(-1, 1, 1, 1) * eps
    with torch.no_grad():
        real = tr.teacher(x_t, sigma, emb, decoder="no_grad")  # CFG teacher, the branches apart as in training
        fake = tr.fake_score(x_t, sigma, emb)
        w = (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
        grad = (fake - real) / w
    loss = 0.5 * torch.nn.functional.mse_loss(x, (x - grad).detach())
    return torch.autograd.grad(loss, list(tr.student.parameters()), allow_unused=True)


def _library_gradients(tr: T2ITrainer, emb: torch.Tensor) -> list[torch.Tensor]:
    tr.student.zero_grad(set_to_none=True)
    loss, _ = tr._generator_loss(emb, emb.shape[0])
    return torch.autograd.grad(loss, list(tr.student.parameters()), allow_unused=True)


def test_rkl_generator_update_equals_dmd2_on_the_same_latents(comps):
    _, emb = _batch(comps)
    grads = {}
    for div in ("rkl", "js"):
        tr = T2ITrainer(comps, _cfg(divergence=div, gan_weight_gen=0.0), "cpu")
        state = tr.rng.snapshot()
        grads[div] = _library_gradients(tr, emb)
        tr.rng.restore(state)
        grads["dmd2-" + div] = _dmd2_gradients(tr, emb)
    pairs = [(a, b) for a, b in zip(grads["rkl"], grads["dmd2-rkl"]) if a is not None]
    assert len(pairs) > 10
    # equal up to the 1e-6 the library adds to DMD's normaliser mean|x - x0_teacher| (and float rounding)
    a, b = (torch.cat([t.flatten() for t in ts]) for ts in zip(*pairs))
    rel = float((a - b).norm() / a.norm())
    assert rel < 1e-5, rel
    # the comparison can fail: JS weights samples by h(r) = r / (r + 1), normalised, which is not DMD2's update
    js = [(x, y) for x, y in zip(grads["js"], grads["dmd2-js"]) if x is not None]
    a, b = (torch.cat([t.flatten() for t in ts]) for ts in zip(*js))
    assert float((a - b).norm() / a.norm()) > 10 * rel


def test_guided_teacher_is_the_cfg_combination_in_every_decoder_mode(comps):
    base = SDDenoiser(comps.unet, comps.schedule, comps.encode_text([""])[0])
    guided = GuidedDenoiser(base, 1.75)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 3.0])
    emb = comps.encode_text(PROMPTS[:2])
    with torch.no_grad():
        c, u = base(x, sigma, emb), base(x, sigma, base.null_labels(2))
        want = u + 1.75 * (c - u)
        got, feats = guided(x, sigma, emb, return_features=True)
        got2, feats2 = guided(x, sigma, emb, return_features=True, decoder="no_grad")
        decoder_calls = []
        hook = comps.unet.up_blocks[0].register_forward_hook(lambda *a: decoder_calls.append(1))
        none, feats3 = guided(x, sigma, emb, return_features=True, decoder="skip")
        hook.remove()
        assert decoder_calls == []  # features only: the U-Net stopped after its mid block
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got2, want, rtol=1e-4, atol=1e-5)
    assert none is None and sorted(feats) == ["down0", "down1", "mid"] and feats["mid"].shape == (2, 64, 4, 4)
    for f in (feats2, feats3):
        torch.testing.assert_close(f["mid"], feats["mid"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(c, u)  # the text changes the prediction, so guidance is not trivially 1
    with pytest.raises(ValueError, match="guidance scale must be a number >= 1"):
        GuidedDenoiser(base, 0.5)


def test_denoiser_maps_eps_prediction_to_x0_and_inverts_the_schedule(comps):
    sched = VPSchedule()
    sig = sched.sigma_at(torch.tensor([0.0, 0.25, 0.5, 1.0]))
    torch.testing.assert_close(timestep_from_sigma(sig, sched.log_sigmas()),
                               torch.tensor([0.0, 249.75, 499.5, 999.0], dtype=torch.float64))
    base = SDDenoiser(comps.unet, sched, comps.encode_text([""])[0])
    x, sigma, emb = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 5.0]), comps.encode_text(PROMPTS[:2])
    with torch.no_grad():
        a_bar = 1 / (1 + sigma ** 2)
        eps = comps.unet(x * a_bar.sqrt().reshape(-1, 1, 1, 1), timestep_from_sigma(sigma, sched.log_sigmas()).float(),
                         encoder_hidden_states=emb).sample
        torch.testing.assert_close(base(x, sigma, emb), x - sigma.reshape(-1, 1, 1, 1) * eps, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"text embeddings \[B=2, tokens, 32\]"):
        base(x, sigma, torch.zeros(2, 32))


def _state(out: Path) -> dict:
    return torch.load(sorted((out / "checkpoints").glob("ckpt_*.pt"))[-1], map_location="cpu", weights_only=True)


def _assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a["step"] == b["step"]
    for name in ("student", "student_ema", "fake_score", "disc", "weighting"):
        for k, v in a[name].items():
            if atol:
                torch.testing.assert_close(v, b[name][k], rtol=1e-4, atol=atol, msg=f"{name}.{k}")
            else:
                assert torch.equal(v, b[name][k]), (name, k)


def test_kill_and_resume_equals_an_uninterrupted_run(assets, tmp_path):
    over = {"steps": 4, "sample_every": 0}
    full = train(assets["pipeline"], assets["data"], tmp_path / "full", "tiny", over, progress=False)
    part = train(assets["pipeline"], assets["data"], tmp_path / "part", "tiny", over, stop_at=3, progress=False)
    assert (full.status, part.status, part.step) == ("done", "interrupted", 3)
    rest = train(assets["pipeline"], assets["data"], tmp_path / "part", "tiny", over, progress=False)
    assert rest.status == "done" and rest.step == 4
    a, b = _state(tmp_path / "full"), _state(tmp_path / "part")
    _assert_same(a, b)
    moved = max(float((v - a["student_ema"][k]).abs().max()) for k, v in a["student"].items())
    assert moved > 0  # the run trained something
    with pytest.raises(ValueError, match="trained with batch_size 4, this command gives 8"):
        train(assets["pipeline"], assets["data"], tmp_path / "part", "tiny", {**over, "steps": 6, "batch_size": 8},
              progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        train(assets["pipeline"], assets["data"], tmp_path / "part", "tiny", {**over, "steps": 6, "div": "fkl"},
              progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, assets: dict, out: str, over: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert train(assets["pipeline"], assets["data"], out, "tiny", over, progress=False).status == "done"


# adam_eps 1e-4 as in tests/test_train.py: Adam maps float-noise gradients to +-lr; a larger eps keeps the update
# proportional to the gradient, which is what the comparison checks
@pytest.mark.parametrize("extra", [{"r1_gamma": 0.5, "fid_every": 3},
                                   pytest.param({"disc_placement": "fake_score", "per_gpu_batch": 1, "div": "fkl"},
                                                marks=pytest.mark.slow)],
                         ids=["teacher-disc-r1-fid", "fake-score-disc-accum"])
def test_two_gloo_processes_equal_one_on_the_same_global_batch(assets, tmp_path, extra):
    over = {"steps": 3, "sample_every": 0, "adam_eps": 1e-4, **extra}
    if "fid_every" in over:  # the evaluation shards its batches over the ranks: the same FID and CLIP score
        over.update(assets["fid"])
    single = {**over, "per_gpu_batch": 2 * over["per_gpu_batch"]} if "per_gpu_batch" in over else over
    train(assets["pipeline"], assets["data"], tmp_path / "single", "tiny", single, progress=False)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), assets, str(tmp_path / "ddp"), over), nprocs=2,
                       join=True, start_method="fork")
    a, b = _state(tmp_path / "single"), _state(tmp_path / "ddp")
    assert b["extra"]["world_size"] == 2 and len(b["extra"]["trainer_rng"]) == 2
    _assert_same(a, b, atol=1e-6)
    teacher = tiny_components().unet.state_dict()
    assert max(float((v - teacher[k.removeprefix("unet.")]).abs().max()) for k, v in b["student"].items()) > 1e-6
    if "fid_every" in over:
        fa, fb = (read_jsonl(tmp_path / r / "logs" / "fid.jsonl") for r in ("single", "ddp"))
        assert [r["step"] for r in fa] == [r["step"] for r in fb] == [3]
        assert fa[0]["fid"] == pytest.approx(fb[0]["fid"], rel=1e-4, abs=1e-6)
        assert fa[0]["clip_score"] == pytest.approx(fb[0]["clip_score"], abs=1e-5)


def test_run_folder_has_logs_grids_fid_and_config(assets, tmp_path):
    res = train(assets["pipeline"], assets["data"], tmp_path / "run", "tiny", {"steps": 2, "fid_every": 1,
                                                                                **assets["fid"]}, progress=False)
    out = res.out
    assert (out / "samples" / "step_0000002.png").is_file() and (out / "logs" / "train.jsonl").is_file()
    assert (out / "checkpoints" / "latest.json").is_file()
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(out / "student_final", local_files_only=True)
    ckpt = _state(out)["student_ema"]
    assert all(torch.equal(v, ckpt["unet." + k]) for k, v in exported.state_dict().items())
    fids = read_jsonl(out / "logs" / "fid.jsonl")
    assert [r["step"] for r in fids] == [1, 2] and all(r["images"] == 8 and r["fid"] > 0 for r in fids)
    with pytest.raises(ValueError, match="fid_every > 0 needs fid_ref"):
        resolve("tiny", {"fid_every": 10})


def test_loader_round_trip_through_save_pretrained(assets):
    loaded, built = load_components(assets["pipeline"]), tiny_components()
    assert loaded.schedule == built.schedule and loaded.prediction_type == "epsilon"
    for a, b in zip(loaded.unet.state_dict().values(), built.unet.state_dict().values()):
        assert torch.equal(a, b)
    torch.testing.assert_close(loaded.encode_text(PROMPTS), built.encode_text(PROMPTS))


def test_missing_or_partial_pipeline_folder_names_what_to_download(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*stable-diffusion-v1-5"):
        load_components(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("model_index.json", "unet", "scheduler"):
        src = Path(assets["pipeline"]) / name
        os.symlink(src, partial / name, target_is_directory=src.is_dir())
    assert "vae/config.json" in missing_files(partial)
    with pytest.raises(FileNotFoundError, match=r"missing vae/config.json.*text_encoder/model.safetensors.*"
                                                r"tokenizer.*hf download stable-diffusion-v1-5"):
        load_components(partial)
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        load_components("nobody-xyz/no-such-model-here")


@pytest.mark.parametrize(("over", "match"), [
    ({"div": "nope"}, "unknown divergence 'nope'; valid names"),
    ({"cfg": 0.5}, "guidance_scale must be a number >= 1"),
    ({"t_min": 0.9, "t_max": 0.2}, r"need 0 <= t_min < t_max <= 1"),
    ({"min_index": 5}, "Karras-grid settings"),
    ({"generator_labels": "uniform"}, "generator_labels must be 'real'"),
    ({"beta_schedule": "cosine"}, r"beta_schedule must be one of \('scaled_linear', 'linear'\)"),
    ({"disc_placement": "x"}, r"disc_placement must be one of \('teacher', 'fake_score'\)"),
    ({"rng_mode": "x"}, r"rng_mode must be one of"),
    ({"no_such": 1}, "unknown setting 'no_such'; valid settings"),
    ({"batch_size": "many"}, "must be an integer"),
    ({"student_sigma": 20.0}, "student_sigma follows from student_t"),
    ({"compile_norms": True}, "compile_norms fuses the GroupNorms"),
])
def test_bad_settings_raise_clear_errors(over, match):
    with pytest.raises(ValueError, match=match):
        resolve("sd15", over)


def test_sd15_preset_is_table5_and_every_value_overridable():
    d, r = resolve("sd15")
    assert (d.divergence, d.lr_student, d.lr_fake, d.lr_disc, d.student_update_freq, d.gan_weight_gen, d.r1_gamma,
            d.guidance_scale, d.weight_decay, r.batch_size, r.steps) == ("js", 1e-5, 1e-5, 1e-5, 10, 1e-3, 1.0, 1.75,
                                                                         0.01, 1024, 60_000)
    assert d.disc_features == ("mid",) and d.precision == "bf16"
    d2, r2 = resolve("sd15", {"lr": "2e-5", "cfg": "5", "batch_size": "2048", "disc_features": "down2,mid"})
    assert (d2.lr_fake, d2.guidance_scale, r2.batch_size, d2.disc_features) == (2e-5, 5.0, 2048, ("down2", "mid"))
    with pytest.raises(ValueError, match="unknown text-to-image preset 'sdxl'; valid presets: sd15, tiny"):
        resolve("sdxl")


def test_trainer_refuses_a_schedule_or_features_the_pipeline_lacks(comps):
    with pytest.raises(ValueError, match="not the pipeline's"):
        T2ITrainer(comps, _cfg(beta_end=0.02), "cpu")
    with pytest.raises(ValueError, match=r"unknown feature key\(s\) \['bottleneck'\].*'mid'"):
        T2ITrainer(comps, _cfg(disc_features=("bottleneck",)), "cpu")


def test_caption_folder_and_webdataset_shards_read_the_same_pairs(tmp_path):
    images, captions = synthetic_pairs(5, 32, seed=3)
    folder = write_caption_folder(tmp_path / "f", images, captions)
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for p in sorted(folder.iterdir()):
            tar.add(p, arcname=p.name)
    a, b = CaptionDataset(folder, 32), CaptionDataset(tmp_path / "shard-000.tar", 32)
    assert len(a) == len(b) == 5
    for i in range(5):
        assert a[i][1] == b[i][1] == captions[i]
        assert torch.equal(a[i][0], b[i][0]) and (a[i][0] - images[i]).abs().max() < 1 / 127
    (folder / "000000.txt").unlink()
    with pytest.raises(ValueError, match="without a caption file.*000000.png"):
        CaptionDataset(folder, 32)
    with pytest.raises(FileNotFoundError, match="image-caption data not found"):
        CaptionDataset(tmp_path / "none", 32)


def test_gradient_checkpointing_changes_memory_not_numbers_and_bf16_steps_run(comps):
    batch = _batch(comps)
    states = []
    for ckpt in (False, True):
        tr = T2ITrainer(comps, _cfg(gradient_checkpointing=ckpt), "cpu")
        assert tr.student.unet.is_gradient_checkpointing == ckpt
        tr.step(*batch)
        tr.step(*batch)
        states.append(torch.cat([p.detach().flatten() for p in tr.student.parameters()]))
    torch.testing.assert_close(states[0], states[1], rtol=1e-5, atol=1e-7)
    tr = T2ITrainer(comps, _cfg(precision="bf16"), "cpu")
    logs = {**tr.step(*batch), **tr.step(*batch)}
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert T2IConfig(gradient_checkpointing=True).differences(T2IConfig().to_dict()) == {}  # speed only


def test_latent_batches_encode_under_bf16_without_leaking_autocast(assets, comps):
    from fdistill_lab.t2i.data import latent_batches

    ds = CaptionDataset(assets["data"], 32)
    for bf16 in (False, True):
        lat, emb = next(latent_batches(ds, comps, 4, bf16=bf16))
        assert lat.shape == (4, 4, 8, 8) and emb.shape == (4, 16, 32) and lat.dtype == emb.dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")  # the consumer (the trainer) runs in its own precision


def test_loader_finds_a_repo_id_in_the_hugging_face_cache_offline(assets, tmp_path, monkeypatch):
    """A repo id resolves through the local HF cache layout (refs/main -> snapshots/<commit>), never the network."""
    import shutil

    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(assets["pipeline"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    comps = load_components("someone/tiny-sd")
    assert comps.source == str(repo / "snapshots" / commit) and comps.latent_resolution == 8


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_checkpoints_and_the_rerun_equals_an_uninterrupted_run(assets, tmp_path):
    """A real kill: SIGTERM to `python -m fdistill_lab.t2i train` mid-run saves a checkpoint and exits 143; the same
    command again finishes the run, equal to one that was never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    over = {"steps": 30, "sample_every": 0, "ckpt_every": 0}
    train(assets["pipeline"], assets["data"], tmp_path / "ref", "tiny", over, progress=False)
    cmd = [sys.executable, "-m", "fdistill_lab.t2i", "train", "--pipeline", str(assets["pipeline"]), "--data",
           str(assets["data"]), "--out", str(tmp_path / "killed"), "--preset", "tiny",
           *[a for k, v in over.items() for a in ("--set", f"{k}={v}")]]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "killed" / "logs" / "train.jsonl"
    while proc.poll() is None and not (log.is_file() and len(read_jsonl(log)) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out[-2000:]
    part = _state(tmp_path / "killed")
    assert 3 <= part["step"] < 30
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and "done at step 30" in res.stdout, res.stdout[-1000:] + res.stderr[-2000:]
    _assert_same(_state(tmp_path / "ref"), _state(tmp_path / "killed"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_cpu_processes_equal_one(assets, tmp_path):
    """The real launcher notebook 06 uses for gpus > 1: torchrun --nproc_per_node 2 (gloo here) equals one process."""
    import subprocess

    from fdistill_lab.t2i.run import train_command

    over = {"steps": 3, "sample_every": 0, "adam_eps": 1e-4}
    cmd = train_command(assets["pipeline"], assets["data"], tmp_path / "tr", "tiny", over, gpus=2)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-1000:] + res.stderr[-3000:]
    assert res.stdout.count("done at step 3") == 1  # printed by rank 0 only
    train(assets["pipeline"], assets["data"], tmp_path / "single", "tiny", over, progress=False)
    _assert_same(_state(tmp_path / "single"), _state(tmp_path / "tr"), atol=1e-6)
