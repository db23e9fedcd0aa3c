"""Distributed training entry point with the tiny preset on CPU: one step per divergence, 2-process DDP
(gloo) equals one process on the same global batch, kill-and-resume equals an uninterrupted run,
presets and overrides with clear errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fdistill_lab import divergences
from fdistill_lab.train import presets
from fdistill_lab.train.cli import EXIT_INTERRUPTED, batch_layout, main, train
from fdistill_lab.train.dist import GlobalBatchSampler
from fdistill_lab.train.run_folder import read_jsonl
from fdistill_lab.train.smoke_assets import make_smoke_assets

ROOT = Path(__file__).resolve().parents[1]
NO_FID = {"fid_every": 0, "sample_every": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_smoke_assets(tmp_path_factory.mktemp("assets"), num_images=64)


def _run(assets, out, overrides=None, **kw):
    return train("tiny", assets["teacher"], assets["data"], out, {**NO_FID, **(overrides or {})}, progress=False, **kw)


def _state(out: Path) -> dict:
    ckpts = sorted((out / "checkpoints").glob("ckpt_*.pt"))
    return torch.load(ckpts[-1], map_location="cpu", weights_only=True)


def _assert_states_equal(a: dict, b: dict, exact: bool = True, atol: float = 0.0) -> None:
    assert a["step"] == b["step"]
    for name in ("student", "student_ema", "fake_score", "disc", "weighting"):
        for k, v in a[name].items():
            if exact:
                assert torch.equal(v, b[name][k]), (name, k)
            else:
                torch.testing.assert_close(v, b[name][k], rtol=1e-4, atol=atol, msg=f"{name}.{k}")
    for name in ("opt_student", "opt_fake", "opt_disc"):
        for pid, st in a[name]["state"].items():
            for k, v in st.items():
                if exact:
                    assert torch.equal(v, b[name]["state"][pid][k]), (name, pid, k)


@pytest.mark.parametrize("div", divergences.names())
def test_one_generator_and_one_critic_step_per_divergence(assets, tmp_path, div):
    res = _run(assets, tmp_path, {"divergence": div, "steps": 2, "log_every": 1})
    assert res.status == "done" and res.step == 2
    rows = read_jsonl(tmp_path / "logs" / "train.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and [r["generator_step"] for r in rows] == [1.0, 0.0]
    for key in ("loss_f", "loss_g", "ratio_mean", "weight_max", "images_per_s"):
        assert torch.isfinite(torch.tensor(rows[0][key])), key
    for key in ("loss_dsm", "loss_d", "disc_acc"):
        assert torch.isfinite(torch.tensor(rows[1][key])), key
    assert (tmp_path / "student_final.pt").is_file()


def test_full_tiny_run_writes_logs_grids_fid_and_checkpoints(assets, tmp_path):
    over = {"fid_detector": str(assets["detector"]), "fid_ref": str(assets["ref"])}
    res = train("tiny", assets["teacher"], assets["data"], tmp_path, over, progress=False)
    assert res.status == "done" and res.step == 6
    assert res.last_fid is not None and res.best_fid <= res.last_fid and res.best_fid > 0
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["step_0000003.png", "step_0000006.png"]
    assert [r["step"] for r in read_jsonl(tmp_path / "logs" / "fid.jsonl")] == [3, 6]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt_*.pt"))
    assert ckpts == ["ckpt_0000003.pt", "ckpt_0000006.pt"]  # keep_checkpoints=2
    assert not list(tmp_path.rglob("*.tmp"))
    state = _state(tmp_path)
    assert state["extra"]["world_size"] == 1 and len(state["extra"]["rank_rng"]) == 1
    assert state["extra"]["fid"]["best"]["fid"] == res.best_fid
    assert state["history"] == []  # logs live in the JSONL, not in every checkpoint
    import PIL.Image
    with PIL.Image.open(tmp_path / "samples" / "step_0000006.png") as im:
        assert im.mode == "RGB" and im.size == (4 * 9 + 1, 4 * 9 + 1)  # 16 samples of 8x8, 1-pixel padding


@pytest.mark.parametrize("rng_mode", ["shared", "per_rank"])
def test_stop_and_resume_equals_uninterrupted_run(assets, tmp_path, rng_mode):
    over = {"steps": 7, "extra_ema_betas": "0.5,0.8", "generator_labels": "uniform", "rng_mode": rng_mode}
    ref = _run(assets, tmp_path / "ref", over)
    part = _run(assets, tmp_path / "resumed", over, stop_at=3)
    assert part.status == "interrupted" and part.step == 3
    torch.manual_seed(999)  # a different global RNG must not matter
    done = _run(assets, tmp_path / "resumed", over)
    assert done.status == "done" and ref.step == done.step == 7
    a, b = _state(tmp_path / "ref"), _state(tmp_path / "resumed")
    _assert_states_equal(a, b)
    assert all(torch.equal(x, y) for n1, n2 in zip(a["extra"]["emas"]["nets"], b["extra"]["emas"]["nets"])
               for x, y in zip(n1.values(), n2.values()))
    assert not torch.equal(a["weighting"]["normalizer.bins"], torch.ones(10))
    strip = ("images_per_s", "time_s", "data_time_s")
    rows = [[{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(p / "logs" / "train.jsonl")]
            for p in (tmp_path / "ref", tmp_path / "resumed")]
    assert rows[0] == rows[1] and len(rows[0]) == 7


@pytest.mark.parametrize("target,workers", [("process", 0), ("group", 2)])
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_exactly(assets, tmp_path, target, workers):
    """SIGTERM to the trainer alone, or (as Slurm's time limit and scancel do) to its whole process group,
    DataLoader workers included: either way a checkpoint is written and the rerun resumes exactly."""
    steps = 16
    args = [sys.executable, "-m", "fdistill_lab.train", "--preset", "tiny", "--teacher", str(assets["teacher"]),
            "--data", str(assets["data"]), "--out", str(tmp_path / "run"), "--steps", str(steps), "--no-progress",
            "--set", "fid_every=0", "--set", "sample_every=0", "--set", "ckpt_every=1000",
            "--set", f"num_workers={workers}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a batch job's
    log = tmp_path / "run" / "logs" / "train.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and len(read_jsonl(log)) < 3 and proc.poll() is None:
        time.sleep(0.05)
    if target == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_INTERRUPTED, output
    stopped = _state(tmp_path / "run")["step"]
    assert 3 <= stopped < steps, output
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"done at step {steps}" in rerun.stdout
    ref = _run(assets, tmp_path / "ref", {"steps": steps, "ckpt_every": 1000})
    assert ref.step == steps
    _assert_states_equal(_state(tmp_path / "ref"), _state(tmp_path / "run"))
    assert [r["step"] for r in read_jsonl(log)] == list(range(1, steps + 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, assets: dict, out: str, overrides: dict,
                stop_at: int | None = None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    res = train("tiny", assets["teacher"], assets["data"], out, {**NO_FID, **overrides}, progress=False,
                stop_at=stop_at)
    assert res.status == ("done" if stop_at is None else "interrupted")


def _ddp(assets, out, overrides, stop_at=None) -> None:
    mp.start_processes(_ddp_worker, args=(2, _free_port(), assets, str(out), overrides, stop_at), nprocs=2,
                       join=True, start_method="fork")


# adam_eps 1e-4: Adam maps float-noise gradients (e.g. of a conv bias in front of a GroupNorm, mathematically 0)
# to +-lr; a larger eps keeps the update proportional to the gradient, which is what the test compares
@pytest.mark.parametrize("overrides", [
    {"steps": 4, "adam_eps": 1e-4},
    {"steps": 4, "adam_eps": 1e-4, "disc_placement": "fake_score", "generator_labels": "uniform", "schedule": "dmd2",
     "fake_score_weighting": "edm", "divergence": "fkl", "per_gpu_batch": 2},
], ids=["teacher-disc", "fake-score-disc-accum"])
def test_two_process_gloo_ddp_equals_single_process(assets, tmp_path, overrides):
    single = dict(overrides)
    if "per_gpu_batch" in single:  # 2 ranks x micro-batch 2 x 2 accumulation = 1 process x micro 4 x 2
        single["per_gpu_batch"] = 2 * overrides["per_gpu_batch"]
    _run(assets, tmp_path / "single", single)
    _ddp(assets, tmp_path / "ddp", overrides)
    a, b = _state(tmp_path / "single"), _state(tmp_path / "ddp")
    assert b["extra"]["world_size"] == 2 and len(b["extra"]["rank_rng"]) == 2
    _assert_states_equal(a, b, exact=False, atol=1e-6)
    teacher = torch.load(assets["teacher"], weights_only=True)["state_dict"]
    moved = max(float((v - teacher[k]).abs().max()) for k, v in b["student"].items())
    assert moved > 1e-5  # the comparison is not trivial: the student did move
    ra, rb = (read_jsonl(p / "logs" / "train.jsonl") for p in (tmp_path / "single", tmp_path / "ddp"))
    for key in ("loss_f", "loss_dsm", "loss_d", "ratio_mean"):
        va = [r[key] for r in ra if key in r]
        assert va, key
        torch.testing.assert_close(torch.tensor(va), torch.tensor([r[key] for r in rb if key in r]), rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_ddp_with_compiled_networks_equals_eager_ddp(assets, tmp_path, monkeypatch):
    """compile=networks under DDP (each DDP wrapper around the compiled network; aot_eager backend, inherited by the
    forked ranks) trains as eager DDP does, micro-batches included."""
    from fdistill_lab.train import speed

    monkeypatch.setattr(speed, "BACKEND", "aot_eager")
    over = {"steps": 3, "adam_eps": 1e-4, "per_gpu_batch": 2}
    _ddp(assets, tmp_path / "eager", over)
    _ddp(assets, tmp_path / "compiled", {**over, "compile": "networks"})
    _assert_states_equal(_state(tmp_path / "eager"), _state(tmp_path / "compiled"), exact=False, atol=1e-6)


def test_two_process_stop_and_resume_restores_every_ranks_rng(assets, tmp_path):
    over = {"steps": 4, "rng_mode": "per_rank"}  # each rank its own noise streams: both must be restored
    _ddp(assets, tmp_path / "ref", over)
    _ddp(assets, tmp_path / "resumed", over, stop_at=2)
    part = _state(tmp_path / "resumed")
    assert part["step"] == 2 and len({bytes(s.numpy()) for s in part["extra"]["noise_rng"]}) == 2
    _ddp(assets, tmp_path / "resumed", over)
    _assert_states_equal(_state(tmp_path / "ref"), _state(tmp_path / "resumed"))


def test_global_batch_sampler_is_independent_of_world_size_and_resumable():
    one = GlobalBatchSampler(10, 4, seed=3)
    it = iter(one)
    first = [next(it) for _ in range(5)]  # 20 indices: two epochs, batches straddle them
    assert sorted(first[0] + first[1] + first[2][:2]) == list(range(10))
    two = [iter(GlobalBatchSampler(10, 4, rank=r, world_size=2, seed=3)) for r in (0, 1)]
    for b in range(5):
        assert next(two[0]) + next(two[1]) == first[b]
    assert next(iter(GlobalBatchSampler(10, 4, seed=3, start_batch=3))) == first[3]
    with pytest.raises(ValueError, match="multiple of world_size 3"):
        GlobalBatchSampler(10, 4, rank=0, world_size=3)
    # with micro-batches (gradient accumulation) rank r takes slice r of each global micro-batch
    big = GlobalBatchSampler(100, 8, seed=1)
    acc = [GlobalBatchSampler(100, 8, rank=r, world_size=2, seed=1, micro_batch=2) for r in (0, 1)]
    g, l0, l1 = big.global_indices(0), acc[0].local_indices(0), acc[1].local_indices(0)
    assert l0[:2] + l1[:2] + l0[2:] + l1[2:] == g
    with pytest.raises(ValueError, match="must divide the per-rank batch 4"):
        GlobalBatchSampler(100, 8, rank=0, world_size=2, micro_batch=3)


def test_batch_layout():
    assert batch_layout(512, 64, 8) == (64, 1)
    assert batch_layout(512, 64, 1) == (512, 8)
    assert batch_layout(280, 0, 8) == (35, 1)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        batch_layout(512, 64, 3)
    with pytest.raises(ValueError, match="multiple of per_gpu_batch 48; pick per_gpu_batch dividing 64, e.g. 32 or 64"):
        batch_layout(512, 48, 8)
    with pytest.raises(ValueError, match="per-process batch 512 .* per_gpu_batch 160; .* e.g. 128 or 256"):
        batch_layout(512, 160, 1)  # the fastest batch on an 80 GB card does not divide the paper's 512
    with pytest.raises(ValueError, match="per_gpu_batch 128; pick per_gpu_batch dividing 64, e.g. 64$"):
        batch_layout(512, 128, 8)


def test_presets_match_the_paper_and_dmd2():
    d, r = presets.resolve("imagenet64")
    assert (d.divergence, r.batch_size, d.lr_student, d.lr_fake, d.lr_disc, d.gan_weight_gen) == (
        "js", 512, 2e-6, 2e-6, 2e-6, 3e-3)
    assert (d.student_update_freq, d.schedule, d.bin_ema, d.num_bins, d.ratio_min, d.ratio_max) == (
        5, "fastgen", 0.5, 10, 0.1, 20.0)
    assert (d.weight_decay, d.grad_clip, d.disc_placement, d.disc_features, d.precision) == (
        0.01, 10.0, "teacher", ("bottleneck",), "bf16")
    assert (d.ema_beta, r.extra_ema_betas, r.steps) == (0.9999, (0.99995, 0.9996), 380_000)
    d, r = presets.resolve("cifar10")
    assert (d.divergence, r.batch_size, d.lr_student, d.gan_weight_gen, d.r1_gamma) == ("fkl", 2048, 1e-4, 1e-3, 1.0)
    assert d.disc_features == ("32x32", "16x16", "8x8")
    d, r = presets.resolve("dmd2")
    assert (d.divergence, d.schedule, r.batch_size, d.lr_student, d.gan_weight_gen, d.gan_weight_disc) == (
        "rkl", "dmd2", 280, 2e-6, 3e-3, 1e-2)
    assert (d.min_index, d.max_index, d.fake_min_index, d.fake_max_index, d.fake_score_weighting) == (
        20, 980, 0, 999, "edm")
    assert (d.disc_placement, d.generator_labels, d.ema_beta, r.extra_ema_betas, r.warmup_steps) == (
        "fake_score", "uniform", 0.0, (), 500)


def test_overrides_parse_types_and_aliases():
    d, r = presets.resolve("imagenet64", {"lr": "1e-5", "div": "fkl", "betas": "0.5,0.9", "grad_clip": "none",
                                          "disc_features": "8x8,bottleneck", "xflip": "true", "steps": "1_000",
                                          "extra_ema_betas": "0.99"})
    assert (d.lr_student, d.lr_fake, d.lr_disc, d.divergence, d.betas, d.grad_clip) == (
        1e-5, 1e-5, 1e-5, "fkl", (0.5, 0.9), None)
    assert (d.disc_features, r.xflip, r.steps, r.extra_ema_betas) == (("8x8", "bottleneck"), True, 1000, (0.99,))
    d, r = presets.resolve("tiny", {"steps": 3, "ratio_max": 5, "real_same_t": True})  # Python values (notebook)
    assert (r.steps, d.ratio_max, d.real_same_t) == (3, 5.0, True)


@pytest.mark.parametrize("overrides,match", [
    ({"lr_studnt": "1"}, "unknown setting 'lr_studnt'; valid settings: .*lr_student"),
    ({"steps": "1.5"}, "setting 'steps' must be an integer"),
    ({"steps": "0"}, "steps must be an integer >= 1"),
    ({"divergence": "nonsense"}, "unknown divergence 'nonsense'; valid names"),
    ({"xflip": "maybe"}, r"setting 'xflip' must be a bool \(true/false\)"),
    ({"betas": "0.9"}, "setting 'betas' needs 2 values"),
    ({"rng_mode": "global"}, "rng_mode must be one of"),
    ({"fid_quantize": "floor"}, "fid_quantize must be one of"),
    ({"lr": "fast"}, "setting 'lr_student' must be a number"),
])
def test_bad_overrides_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        presets.resolve("imagenet64", overrides)
    with pytest.raises(ValueError, match="unknown preset 'in64'; valid presets: imagenet64, cifar10, dmd2, tiny"):
        presets.resolve("in64")


def test_cli_errors_and_describe(assets, tmp_path, capsys):
    assert main(["--preset", "tiny", "--describe", "--set", "lr=1e-3", "--set", "extra_ema_betas=none"]) == 0
    out = capsys.readouterr().out
    assert "lr_student = 0.001" in out and "extra_ema_betas = ()" in out
    assert "aliases: lr sets lr_student, lr_fake, lr_disc" in out  # so the notebooks' `lr=` is listed too
    assert main(["--preset", "tiny", "--teacher", str(assets["teacher"]), "--data", str(assets["data"]),
                 "--out", str(tmp_path), "--set", "bogus=1"]) == 2
    assert "unknown setting 'bogus'" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--teacher", str(tmp_path / "none.pkl"), "--data", str(assets["data"]),
                 "--out", str(tmp_path / "o"), "--set", "fid_every=0"]) == 2
    err = capsys.readouterr().err
    assert "teacher not found" in err and "make_smoke_assets" in err
    assert main(["--preset", "imagenet64", "--teacher", str(assets["teacher"]), "--data", str(tmp_path / "x.zip"),
                 "--out", str(tmp_path / "o2")]) == 2
    assert "fid_every > 0 needs --fid-detector" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--teacher", str(assets["teacher"]), "--data", str(tmp_path / "x.zip"),
                 "--out", str(tmp_path / "o3"), "--set", "fid_every=0"]) == 2
    assert "training data not found" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--data", "x"]) == 2
    assert "missing --teacher, --out" in capsys.readouterr().err


def test_npz_data_needs_a_label_map_for_a_conditional_teacher(assets, tmp_path):
    """npz labels are in the devkit's class order: a class-conditional run refuses them unmapped."""
    import numpy as np

    from fdistill_lab.train.cli import open_dataset
    from fdistill_lab.train.data import EDMImageDataset

    ds = EDMImageDataset(assets["data"])
    images = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1).numpy()
    npz = tmp_path / "train_data_batch_1.npz"
    np.savez(npz, data=images, labels=ds.labels + 1)  # 1-based, as the release
    with pytest.raises(ValueError, match="npz labels follow.*map_clsloc.txt.*npz_label_map"):
        train("tiny", assets["teacher"], npz, tmp_path / "unmapped", {**NO_FID, "steps": 1}, progress=False)
    settings = {**NO_FID, "steps": 1, "npz_label_map": "identity"}
    assert train("tiny", assets["teacher"], npz, tmp_path / "identity", settings, progress=False).checkpoint
    with pytest.raises(ValueError, match="npz_label_map applies to downsampled-ImageNet npz data only"):
        open_dataset(assets["data"], npz_label_map="identity")


def test_corrupt_newest_checkpoint_points_to_the_older_one_and_that_resumes(assets, tmp_path, capsys):
    import json

    from fdistill_lab.files import CheckpointError

    run = tmp_path / "run"
    _run(assets, run, {"steps": 6, "ckpt_every": 3, "log_every": 1})
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("ckpt_*.pt")) == ["ckpt_0000003.pt", "ckpt_0000006.pt"]
    (ckpts / "ckpt_0000006.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="ckpt_0000006.pt.*ckpt_0000003.pt.*latest.json") as err:
        _run(assets, run, {"steps": 8, "ckpt_every": 3, "log_every": 1})
    # do what the message says: point latest.json at the older checkpoint, rerun
    pointer = re.search(r"write (\{.*?\}) into", str(err.value)).group(1)
    (ckpts / "latest.json").write_text(pointer)
    assert {k: v for k, v in json.loads(pointer).items() if k != "checksums"} == {"file": "ckpt_0000003.pt", "step": 3}
    assert list(json.loads(pointer)["checksums"]) == ["ckpt_0000003.pt"]
    capsys.readouterr()
    res = _run(assets, run, {"steps": 8, "ckpt_every": 3, "log_every": 1})
    assert res.step == 8 and "dropped 3 log rows after step 3, where this run resumes" in capsys.readouterr().err
    assert [r["step"] for r in read_jsonl(run / "logs" / "train.jsonl")] == list(range(1, 9))
    (ckpts / "latest.json").unlink()
    (ckpts / "ckpt_0000008.pt").unlink()
    with pytest.raises(FileNotFoundError, match="latest.json names ckpt_0000008.pt"):
        (ckpts / "latest.json").write_text(json.dumps({"file": "ckpt_0000008.pt", "step": 8}))
        _run(assets, run, {"steps": 9})


def test_a_second_job_on_the_same_run_folder_is_refused(assets, tmp_path):
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".train.lock", "w") as other:  # another job holds the folder
        other.write("4242\n")
        other.flush()
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another training job \\(process 4242\\) is using"):
            _run(assets, run, {"steps": 1})
        assert not (run / "checkpoints").exists()
    assert _run(assets, run, {"steps": 1}).step == 1  # free again once that job ended


def test_read_jsonl_skips_a_torn_last_line_quietly_and_warns_about_damage(tmp_path):
    log = tmp_path / "train.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert [r["step"] for r in read_jsonl(log)] == [1, 2]  # a crash mid-write: expected, no warning
    log.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.warns(UserWarning, match="train.jsonl:2: skipping an unreadable log line"):
        assert [r["step"] for r in read_jsonl(log)] == [1, 3]


def test_rotation_keeps_committed_checkpoints_over_an_orphan(tmp_path):
    """A run that died after writing ckpt 6 but before moving the pointer leaves an orphan; resumed from 3
    and saving 4 with keep=2, rotation must keep 3 and 4 (not 4 and the orphan)."""
    from fdistill_lab.train.run_folder import commit_checkpoint, latest_checkpoint

    for step in (3, 6, 4):
        (tmp_path / f"ckpt_{step:07d}.pt").write_bytes(b"x")
    commit_checkpoint(tmp_path, tmp_path / "ckpt_0000004.pt", 4, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000003.pt", "ckpt_0000004.pt"]
    assert latest_checkpoint(tmp_path).name == "ckpt_0000004.pt"


def test_resume_with_another_world_size_or_config_fails_clearly(assets, tmp_path):
    _run(assets, tmp_path, {"steps": 2})
    with pytest.raises(ValueError, match="another configuration.*divergence"):
        _run(assets, tmp_path, {"steps": 4, "divergence": "fkl"})


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one(assets, tmp_path):
    """The real launcher: torchrun --nproc_per_node 2 (gloo) on the command line equals one process."""
    from fdistill_lab.train.launch import train_command

    over = {"steps": 4, "adam_eps": 1e-4, **NO_FID}
    cmd = train_command("tiny", assets["teacher"], assets["data"], tmp_path / "tr", over, gpus=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("done at step 4") == 1  # printed by rank 0 only
    _run(assets, tmp_path / "single", over)
    _assert_states_equal(_state(tmp_path / "single"), _state(tmp_path / "tr"), exact=False, atol=1e-6)


def test_torn_log_line_is_repaired_on_resume(tmp_path):
    """A crash mid-write leaves a partial last row; resuming rewrites the file so the next row is not glued to it."""
    from fdistill_lab.train.run_folder import append_jsonl, truncate_jsonl

    log = tmp_path / "train.jsonl"
    log.write_text('{"step": 100, "loss": 1.0}\n{"step": 200, "lo')
    assert truncate_jsonl(log, 100) == 0
    append_jsonl(log, {"step": 110, "loss": 0.5})
    assert read_jsonl(log) == [{"step": 100, "loss": 1.0}, {"step": 110, "loss": 0.5}]


def test_best_student_saved_after_the_last_metrics_write_is_kept(tmp_path):
    """A crash between writing student_best.pt and metrics.json: the file's own step shows it is from after the
    checkpoint, so it is kept under its step's name instead of passing for the checkpoint's best."""
    import json

    from fdistill_lab.train.run_folder import export_student, reconcile_fid_records

    ckpt_state = {"last": {"step": 100, "fid": 7.0}, "best": {"step": 100, "fid": 7.0}}
    (tmp_path / "metrics.json").write_text(json.dumps(ckpt_state))  # not yet updated for step 150
    export_student(torch.nn.Linear(2, 2), tmp_path / "student_best.pt", {"step": 150, "fid": 6.0})
    msgs = reconcile_fid_records(tmp_path, ckpt_state, 100)
    assert not (tmp_path / "student_best.pt").exists() and (tmp_path / "student_best_step0000150.pt").is_file()
    assert "step 150" in msgs[0] and "had been overwritten" in msgs[0]


def test_reconcile_fid_records_matches_the_checkpoint(tmp_path):
    import json

    from fdistill_lab.train.run_folder import reconcile_fid_records

    ckpt_state = {"last": {"step": 4, "fid": 7.0}, "best": {"step": 2, "fid": 6.0}}
    (tmp_path / "metrics.json").write_text(json.dumps({"last": {"step": 6, "fid": 5.0},
                                                       "best": {"step": 6, "fid": 5.0}}))
    (tmp_path / "student_best.pt").write_bytes(b"step 6 student")
    msgs = reconcile_fid_records(tmp_path, ckpt_state, 4)
    assert json.loads((tmp_path / "metrics.json").read_text()) == ckpt_state
    assert not (tmp_path / "student_best.pt").exists()
    assert (tmp_path / "student_best_step0000006.pt").read_bytes() == b"step 6 student"  # kept, not deleted
    assert "student of step 6 (FID 5.0), later than the checkpoint of step 4" in msgs[0]
    assert "checkpoint's best, step 2, had been overwritten" in msgs[0] and "rewritten" in msgs[1]
    assert reconcile_fid_records(tmp_path, ckpt_state, 4) == []  # now they agree
    (tmp_path / "metrics.json").write_text("{damaged")
    assert reconcile_fid_records(tmp_path, ckpt_state, 4) and json.loads((tmp_path / "metrics.json").read_text())
    assert "removed" in reconcile_fid_records(tmp_path, {}, 0)[0] and not (tmp_path / "metrics.json").exists()
    (tmp_path / "student_best.pt").write_bytes(b"step 2 student")  # an earlier best than the checkpoint: stays
    (tmp_path / "metrics.json").write_text(json.dumps({"best": {"step": 2, "fid": 6.0}}))
    reconcile_fid_records(tmp_path, ckpt_state, 4)
    assert (tmp_path / "student_best.pt").read_bytes() == b"step 2 student"


def test_resume_after_a_crash_between_fid_and_checkpoint_reconciles_the_records(assets, tmp_path, capsys):
    import json

    run = tmp_path / "run"
    over = {"fid_detector": str(assets["detector"]), "fid_ref": str(assets["ref"])}
    train("tiny", assets["teacher"], assets["data"], run, over, progress=False)  # FID and checkpoints at 3 and 6
    reference = json.loads((run / "metrics.json").read_text())
    # the step-6 checkpoint never made it to disk, and step 6 had looked like the best
    ckpts = run / "checkpoints"
    (ckpts / "ckpt_0000006.pt").unlink()
    (ckpts / "latest.json").write_text(json.dumps({"file": "ckpt_0000003.pt", "step": 3}))
    (run / "metrics.json").write_text(json.dumps({"last": {"step": 6, "fid": 1e-3}, "best": {"step": 6, "fid": 1e-3}}))
    final = torch.load(run / "student_final.pt", weights_only=True)  # whichever step was best, say step 6 was
    torch.save({**final, "info": {"step": 6, "fid": 1e-3}}, run / "student_best.pt")
    capsys.readouterr()
    res = train("tiny", assets["teacher"], assets["data"], run, over, progress=False)
    err = capsys.readouterr().err
    assert res.step == 6 and "metrics.json rewritten to the FID records of the checkpoint of step 3" in err
    assert "kept as student_best_step0000006.pt" in err and (run / "student_best_step0000006.pt").is_file()
    assert json.loads((run / "metrics.json").read_text()) == reference  # the rerun's own evaluations (CPU: exact)
    assert [r["step"] for r in read_jsonl(run / "logs" / "fid.jsonl")] == [3, 6]


def test_init_from_starts_a_fresh_stage_from_another_runs_networks(assets, tmp_path, capsys):
    """The paper's ImageNet-64 fine-tuning stage (lr 5e-7) as a new run: networks and ratio bins from the first
    run, fresh optimisers at step 0; with lr 0 one step leaves the loaded networks exactly as they were."""
    import json

    _run(assets, tmp_path / "stage1", {"steps": 4, "extra_ema_betas": "0.5"})
    src = _state(tmp_path / "stage1")
    res = _run(assets, tmp_path / "stage2", {"steps": 1, "lr": 1e-30, "gan_weight_gen": 0.0, "extra_ema_betas": "0.5",
                                             "init_from": str(tmp_path / "stage1")})
    assert res.status == "done" and res.step == 1
    new = _state(tmp_path / "stage2")
    for name in ("student", "fake_score", "disc"):
        for k, v in src[name].items():
            torch.testing.assert_close(new[name][k], v, rtol=0, atol=1e-20, msg=f"{name}.{k}")
    assert all(st["step"] == 1 for st in new["opt_student"]["state"].values())  # fresh optimiser, one step
    cfg = json.loads((tmp_path / "stage2" / "config.json").read_text())["initialised_from"]
    assert cfg["step"] == 4 and cfg["checkpoint"].endswith("ckpt_0000004.pt")
    assert cfg["changed"]["lr_student"] == [src["config"]["lr_student"], 1e-30] and "gan_weight_gen" in cfg["changed"]
    assert "initialised from" in capsys.readouterr().err


def test_init_from_run_resumes_from_its_own_checkpoints(assets, tmp_path):
    _run(assets, tmp_path / "stage1", {"steps": 3})
    over = {"steps": 5, "lr": 1e-4, "init_from": str(tmp_path / "stage1" / "checkpoints" / "ckpt_0000003.pt")}
    _run(assets, tmp_path / "ref", over)
    assert _run(assets, tmp_path / "stage2", over, stop_at=2).status == "interrupted"
    (tmp_path / "stage1" / "checkpoints" / "ckpt_0000003.pt").unlink()  # no longer needed: stage 2 has its own
    assert _run(assets, tmp_path / "stage2", over).step == 5
    _assert_states_equal(_state(tmp_path / "ref"), _state(tmp_path / "stage2"))
    import json
    assert json.loads((tmp_path / "stage2" / "config.json").read_text())["initialised_from"]["step"] == 3


def test_init_from_bad_sources_fail_clearly(assets, tmp_path, capsys):
    from fdistill_lab.files import CheckpointError

    _run(assets, tmp_path / "stage1", {"steps": 2})
    with pytest.raises(FileNotFoundError, match="init_from: .*nowhere not found"):
        _run(assets, tmp_path / "b", {"init_from": str(tmp_path / "nowhere")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        _run(assets, tmp_path / "b", {"init_from": str(tmp_path / "empty")})
    with pytest.raises(CheckpointError, match="not an exported student"):
        _run(assets, tmp_path / "b", {"init_from": str(tmp_path / "stage1" / "student_final.pt")})
    with pytest.raises(ValueError, match="its weighting does not fit this run"):
        _run(assets, tmp_path / "b", {"init_from": str(tmp_path / "stage1"), "num_bins": 5})
    assert not (tmp_path / "b" / "checkpoints").exists()
    rc = main(["--preset", "tiny", "--teacher", str(assets["teacher"]), "--data", str(assets["data"]), "--out",
               str(tmp_path / "c"), "--set", "fid_every=0", "--set",
               f"init_from={tmp_path / 'stage1' / 'student_final.pt'}", "--no-progress"])
    assert rc == 2 and "not an exported student" in capsys.readouterr().err
