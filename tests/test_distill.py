"""The image-scale f-distill trainer on a tiny EDM network (CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from fdistill_lab import divergences
from fdistill_lab.files import CheckpointError, load_file
from fdistill_lab.networks import build_edm, tiny_adm_config, tiny_ddpmpp_config
from fdistill_lab.networks.discriminator import Discriminator, DiscriminatorHead, _groups
from fdistill_lab.train.trainer import DistillConfig, FDistillTrainer, fit

pytestmark = pytest.mark.usefixtures("one_thread")


B = 8


def _teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_adm_config(img_resolution=8, img_channels=1, label_dim=10, model_channels=8, attn_resolutions=[])
    return build_edm(**cfg)


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.rand(B, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (B,), generator=g)


def _batches(start: int = 0):
    i = start
    while True:
        yield _batch(i)
        i += 1


def _params(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _changed(before: list[torch.Tensor], m: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


@pytest.mark.parametrize("div", divergences.names())
def test_one_generator_and_one_critic_step_per_divergence(div):
    tr = FDistillTrainer(_teacher(), DistillConfig(divergence=div, student_update_freq=2, gan_weight_gen=1e-2))
    teacher0, student0, fake0, disc0 = (_params(m) for m in (tr.teacher, tr.student, tr.fake_score, tr.disc))
    logs = tr.step(*_batch(0))  # iteration 0: generator step
    assert logs["generator_step"] == 1.0 and "loss_dsm" not in logs
    for k in ("loss_f", "loss_gan_g", "loss_g", "ratio_mean", "weight_std", "grad_norm_student", "images_per_s"):
        assert torch.isfinite(torch.tensor(logs[k])), (k, logs[k])
    assert _changed(student0, tr.student)
    assert not _changed(fake0, tr.fake_score) and not _changed(disc0, tr.disc)
    student1 = _params(tr.student)
    logs = tr.step(*_batch(1))  # iteration 1: critic step
    assert logs["generator_step"] == 0.0 and "loss_f" not in logs
    for k in ("loss_dsm", "loss_d", "disc_acc", "grad_norm_critic"):
        assert torch.isfinite(torch.tensor(logs[k])), (k, logs[k])
    assert _changed(fake0, tr.fake_score) and _changed(disc0, tr.disc)
    assert not _changed(student1, tr.student)
    assert not _changed(teacher0, tr.teacher)


@pytest.mark.parametrize("placement", ["teacher", "fake_score"])
def test_micro_batches_share_one_weighting_over_the_whole_batch(placement, monkeypatch):
    """With gradient accumulation both normalisation stages see the whole batch (section 5), as without it: one
    bin update and one batch mean per generator step, from logits that the gradient pass reproduces exactly
    (dropout included)."""
    from fdistill_lab import method
    from fdistill_lab.method import FDistillWeighting

    torch.manual_seed(0)
    teacher = build_edm(**tiny_adm_config(img_resolution=8, img_channels=1, label_dim=10, model_channels=8,
                                          attn_resolutions=[], dropout=0.3))
    cfg = DistillConfig(divergence="fkl", accum_steps=4, bin_ema=0.5, disc_placement=placement, gan_weight_gen=1e-2)
    tr = FDistillTrainer(teacher, cfg)
    calls, logits, used = [], [], []
    weigh, to_logits, loss_fn = tr.weighting.forward, tr._logits, method.fdistill_loss

    def weighting(lg, sg, update=True):
        calls.append((lg, sg))
        return weigh(lg, sg, update)

    def recorded_logits(*args):
        logits.append(to_logits(*args))
        return logits[-1]

    def recorded_loss(*args):
        used.append(args[3])
        return loss_fn(*args)

    monkeypatch.setattr(tr.weighting, "forward", weighting)
    monkeypatch.setattr(tr, "_logits", recorded_logits)
    monkeypatch.setattr(method, "fdistill_loss", recorded_loss)
    tr.generator_step(*_batch(0))
    assert len(calls) == 1 and calls[0][0].shape == (B,)  # one weighting of the whole batch
    h = torch.cat(used)
    assert len(used) == 4 and float(h.mean()) == pytest.approx(1.0, abs=1e-6)  # stage 2 over the whole batch
    assert any(abs(float(u.mean()) - 1) > 1e-3 for u in used)  # ... not per micro-batch
    for first, replay in zip(logits[:4], logits[4:]):  # the gradient pass draws exactly what the first pass drew
        assert torch.equal(first, replay.detach())
    once = FDistillWeighting.from_config(cfg)
    once(*calls[0])
    assert torch.equal(once.normalizer.bins, tr.weighting.normalizer.bins)  # one bin update, as without accumulation


def test_student_and_fake_score_start_as_teacher_copies():
    teacher = _teacher()
    tr = FDistillTrainer(teacher, DistillConfig())
    for net in (tr.student, tr.fake_score, tr.student_ema):
        assert net is not teacher
        for a, b in zip(net.state_dict().values(), teacher.state_dict().values()):
            assert torch.equal(a, b)
    assert not any(p.requires_grad for p in tr.teacher.parameters())


@pytest.mark.parametrize("schedule,expected_critic", [
    ("fastgen", [False, True, True, False, True, True, False]),
    ("dmd2", [True] * 7),
])
def test_schedule(schedule, expected_critic):
    tr = FDistillTrainer(_teacher(), DistillConfig(schedule=schedule, student_update_freq=3))
    fit(tr, _batches(), 7, progress=False)
    gen = [bool(h["generator_step"]) for h in tr.history]
    assert gen == [i % 3 == 0 for i in range(7)]
    assert ["loss_dsm" in h for h in tr.history] == expected_critic
    assert ["loss_f" in h for h in tr.history] == gen


def test_resume_gives_bit_identical_next_steps(tmp_path):
    cfg = DistillConfig(divergence="fkl", student_update_freq=2, bin_ema=0.5, generator_labels="uniform",
                        gan_weight_gen=1e-2, ema_beta=0.9)
    torch.manual_seed(0)
    ref = FDistillTrainer(_teacher(), cfg)
    fit(ref, _batches(0), 3, progress=False)
    ckpt = ref.save_checkpoint(tmp_path / "ckpt.pt", extra={"data_position": 3})
    assert not list(tmp_path.glob("*.tmp"))
    fit(ref, _batches(3), 4, progress=False)

    torch.manual_seed(123)  # a different global RNG must not matter
    resumed = FDistillTrainer(_teacher(), cfg)
    extra = resumed.load_checkpoint(ckpt)
    assert extra == {"data_position": 3} and resumed.step_count == 3
    fit(resumed, _batches(extra["data_position"]), 4, progress=False)

    assert resumed.step_count == ref.step_count == 7
    for a, b in zip(ref.state_dict()["student"].values(), resumed.state_dict()["student"].values()):
        assert torch.equal(a, b)
    for name in ("student_ema", "fake_score", "disc", "weighting"):
        for a, b in zip(getattr(ref, name).state_dict().values(), getattr(resumed, name).state_dict().values()):
            assert torch.equal(a, b), name
    assert not torch.equal(ref.weighting.normalizer.bins, torch.ones_like(ref.weighting.normalizer.bins))
    drop = ("time_s", "images_per_s")
    strip = [{k: v for k, v in h.items() if k not in drop} for h in ref.history]
    assert strip == [{k: v for k, v in h.items() if k not in drop} for h in resumed.history]


def test_checkpoint_errors(tmp_path):
    tr = FDistillTrainer(_teacher(), DistillConfig())
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        tr.load_checkpoint(bad)
    ckpt = tr.save_checkpoint(tmp_path / "ok.pt")
    other = FDistillTrainer(_teacher(), DistillConfig(divergence="rkl"))
    with pytest.raises(ValueError, match="another configuration.*divergence"):
        other.load_checkpoint(ckpt)


def test_resume_may_change_speed_only_settings(tmp_path):
    """compile_norms may differ between a checkpoint and the resumed run, and checkpoints written before it
    existed (no such key) still load; a setting that changes results is still refused."""
    tr = FDistillTrainer(_teacher(), DistillConfig())
    state = tr.state_dict()
    del state["config"]["compile_norms"]  # as written by earlier versions
    torch.save(state, tmp_path / "old.pt")
    for cfg in (DistillConfig(), DistillConfig(compile_norms=True)):
        assert FDistillTrainer(_teacher(), cfg).load_checkpoint(tmp_path / "old.pt") == {}
    with pytest.raises(ValueError, match="another configuration.*'seed': \\(0, 1\\)"):
        FDistillTrainer(_teacher(), DistillConfig(seed=1)).load_checkpoint(tmp_path / "old.pt")


def test_mapped_checkpoint_loading_matches_reading_and_names_bad_files(tmp_path):
    """GPU resume maps the file (ranks share host memory): same contents, same clear error for a bad file."""
    tr = FDistillTrainer(_teacher(), DistillConfig())
    tr.step(*_batch(0))
    ckpt = tr.save_checkpoint(tmp_path / "ok.pt")
    read, mapped = load_file(ckpt), load_file(ckpt, mmap=True)
    for key in ("student", "weighting", "opt_student"):
        flat_a, flat_b = list(_tensors(read[key])), list(_tensors(mapped[key]))
        assert flat_a and len(flat_a) == len(flat_b) and all(torch.equal(a, b) for a, b in zip(flat_a, flat_b))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_file(bad, mmap=True)


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_ratio_only_mode_still_trains_the_discriminator():
    tr = FDistillTrainer(_teacher(), DistillConfig(gan_weight_gen=0.0, student_update_freq=2))
    logs = tr.step(*_batch(0))
    assert logs["loss_gan_g"] == 0.0 and logs["loss_g"] == logs["loss_f"]
    disc0 = _params(tr.disc)
    tr.step(*_batch(1))
    assert _changed(disc0, tr.disc)


def test_rkl_generator_weights_are_exactly_one():
    tr = FDistillTrainer(_teacher(), DistillConfig(divergence="rkl", student_update_freq=2))
    logs = tr.step(*_batch(0))
    assert logs["weight_std"] == 0.0 and logs["weight_max"] == 1.0


def test_fake_score_placement_trains_the_fake_encoder_through_the_gan_loss():
    cfg = DistillConfig(disc_placement="fake_score", disc_features=("8x8", "bottleneck"), student_update_freq=2)
    tr = FDistillTrainer(_teacher(), cfg)
    assert tr.disc.keys == ["8x8", "bottleneck"]
    tr.step(*_batch(0))
    tr.opt_fake.zero_grad(set_to_none=True)
    loss, _ = tr._critic_loss(*(t.to(tr.device) for t in _batch(1)))
    loss.backward()
    enc_grads = [p.grad for n, p in tr.fake_score.named_parameters() if ".enc." in n]
    assert all(g is not None for g in enc_grads)


@pytest.mark.parametrize("attention", [False, True], ids=["no-attention", "attention"])
@pytest.mark.parametrize("placement", ["teacher", "fake_score"])
def test_r1_bf16_and_accumulation_run(placement, attention):
    """R1 (a gradient of a gradient) in bf16, also through attention, whose fused kernels have no second
    derivative (the cifar10 preset: bf16, R1 on, DDPM++ with attention)."""
    cfg = DistillConfig(disc_placement=placement, r1_gamma=1.0, precision="bf16", accum_steps=2,
                        student_update_freq=2, fake_score_weighting="edm")
    torch.manual_seed(0)
    teacher = build_edm(**tiny_adm_config(img_resolution=8, img_channels=1, label_dim=10, model_channels=32,
                                          attn_resolutions=[4] if attention else []))
    assert any(getattr(m, "num_heads", 0) for m in teacher.model.enc.modules()) == attention  # before the heads
    tr = FDistillTrainer(teacher, cfg)
    logs = fit(tr, _batches(), 2, progress=False)
    assert torch.isfinite(torch.tensor(logs[1]["r1"])) and torch.isfinite(torch.tensor(logs[0]["loss_f"]))
    with pytest.raises(ValueError, match="not divisible by accum_steps=2"):
        tr.step(torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long))


def test_sample_shapes_and_determinism():
    tr = FDistillTrainer(_teacher(), DistillConfig())
    x1 = tr.sample(5, generator=torch.Generator().manual_seed(0))
    x2 = tr.sample(5, generator=torch.Generator().manual_seed(0))
    assert x1.shape == (5, 1, 8, 8) and torch.equal(x1, x2)
    with pytest.raises(ValueError, match="pass n, labels or z"):
        tr.sample()


@pytest.mark.gpu
def test_sample_draws_on_the_generators_device():
    tr = FDistillTrainer(_teacher(), DistillConfig(), device="cuda")
    x = tr.sample(5, generator=torch.Generator(device="cuda").manual_seed(0))
    assert x.shape == (5, 1, 8, 8) and x.device.type == "cuda"


@pytest.mark.parametrize("changes,match", [
    (dict(divergence="nonsense"), "unknown divergence 'nonsense'; valid names"),
    (dict(schedule="ttur"), "schedule must be one of"),
    (dict(disc_placement="student"), "disc_placement must be one of"),
    (dict(generator_labels="none"), "generator_labels must be one of"),
    (dict(precision="fp16"), "precision must be one of"),
    (dict(student_update_freq=1), "student_update_freq must be >= 2 with schedule='fastgen'"),
    (dict(student_update_freq=0, schedule="dmd2"), "student_update_freq must be an integer >= 1"),
    (dict(lr_student=-1.0), "lr_student must be a finite number > 0"),
    (dict(gan_weight_disc=0.0), "gan_weight_disc must be a finite number > 0"),
    (dict(min_index=10, max_index=5), "min_index <= max_index"),
    (dict(max_index=1000), "max_index < num_grid"),
    (dict(ema_beta=1.0), r"ema_beta must be in \[0, 1\)"),
    (dict(ratio_min=2.0, ratio_max=1.0), "ratio_min < ratio_max"),
    (dict(disc_features=()), "disc_features must be a non-empty list"),
    (dict(fake_score_weighting="lambda"), "fake_score_weighting must be one of"),
    (dict(accum_steps=0), "accum_steps must be an integer >= 1"),
    (dict(betas=(0.9, 1.5)), "betas must be two numbers"),
    (dict(compile_norms="yes"), "compile_norms must be True or False; got 'yes'"),
    (dict(normalize_ratio=1), "normalize_ratio must be True or False; got 1"),
    (dict(schedule="critic_first", student_update_freq=1), "student_update_freq must be >= 2 with schedule='critic"),
    (dict(critic_warmup=-1), "critic_warmup must be an integer >= 0"),
    (dict(gan_head_loss="mean"), r"gan_head_loss must be one of \('per_head', 'mean_logit'\); got 'mean'"),
])
def test_bad_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**changes)


def test_config_roundtrip_and_unknown_keys():
    cfg = DistillConfig(divergence="jensen-shannon", disc_features=["8x8"])
    assert cfg.divergence == "js" and cfg.disc_features == ("8x8",)
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown DistillConfig setting.*'lr'.*valid: divergence"):
        cfg.replace(lr=1e-3)


def test_trainer_input_errors():
    with pytest.raises(ValueError, match="unknown feature key.*provides"):
        FDistillTrainer(_teacher(), DistillConfig(disc_features=("64x64",)))
    tr = FDistillTrainer(_teacher(), DistillConfig())
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        tr.step(torch.zeros(B, 1, 8, 8))


def test_discriminator_head_shapes():
    head = DiscriminatorHead(16, 16)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 4, 1]
    assert head(torch.randn(3, 16, 16, 16)).shape == (3,)
    assert DiscriminatorHead(8, 4)(torch.randn(2, 8, 4, 4)).shape == (2,)
    with pytest.raises(ValueError, match="power of two >= 4"):
        DiscriminatorHead(8, 2)
    with pytest.raises(ValueError, match=r"expected features \[B, 8, 4, 4\]"):
        DiscriminatorHead(8, 4)(torch.randn(2, 8, 8, 8))
    disc = Discriminator({"a": (8, 4, 4), "b": (4, 8, 8)})
    feats = {"a": torch.randn(2, 8, 4, 4), "b": torch.randn(2, 4, 8, 8)}
    expect = torch.stack([disc.heads["a"](feats["a"]), disc.heads["b"](feats["b"])], 1)  # [B, H], as FastGen
    assert torch.equal(disc(feats), expect)
    with pytest.raises(KeyError, match="features lack"):
        disc({"a": feats["a"]})


# FastGen's _get_optimal_groups: above 32 channels the largest divisor <= 32; up to 32, channels // 4
FASTGEN_GROUPS = {4: 1, 8: 2, 16: 4, 32: 8, 33: 11, 48: 24, 64: 32, 96: 32, 100: 25, 127: 1, 128: 32, 256: 32,
                  768: 32}


@pytest.mark.parametrize("channels", sorted(FASTGEN_GROUPS))
def test_discriminator_groupnorm_groups_follow_fastgen(channels):
    assert _groups(channels) == FASTGEN_GROUPS[channels]
    if channels > 32:
        assert _groups(channels) == max(g for g in range(1, 33) if channels % g == 0)
    head = DiscriminatorHead(channels, 8)
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 2 and all(n.num_groups == FASTGEN_GROUPS[channels] for n in norms)
    # FastGen asserts where channels // 4 does not divide (e.g. 18, 30); here the largest divisor below it
    assert (_groups(18), _groups(30), _groups(2)) == (3, 6, 1)


def _head_loss_spy(monkeypatch) -> list[tuple[str, torch.Tensor, str]]:
    """Record every GAN loss call of the method file: (which, fake logits, head_loss)."""
    from fdistill_lab import losses, method

    calls: list[tuple[str, torch.Tensor, str]] = []

    def gen(logits, head_loss="per_head"):
        calls.append(("g", logits.detach().clone(), head_loss))
        return losses.gan_generator_loss(logits, head_loss)

    def disc(logits_real, logits_fake, head_loss="per_head"):
        calls.append(("d", logits_fake.detach().clone(), head_loss))
        calls.append(("d_real", logits_real.detach().clone(), head_loss))
        return losses.gan_discriminator_loss(logits_real, logits_fake, head_loss)

    monkeypatch.setattr(method, "gan_generator_loss", gen)
    monkeypatch.setattr(method, "gan_discriminator_loss", disc)
    return calls


@pytest.mark.parametrize("form", ["per_head", "mean_logit"])
def test_trainer_gan_losses_with_three_heads(form, monkeypatch):
    """Three heads (8x8, 4x4, bottleneck, as the cifar10 preset's 32/16/8): the trainer hands the method file the
    per-head logits [B, 3] and its ``gan_head_loss``; the logged losses are the hand-computed ones of that form
    and the ratio statistics come from the mean logit."""
    calls = _head_loss_spy(monkeypatch)
    cfg = DistillConfig(disc_features=("8x8", "4x4", "bottleneck"), student_update_freq=2, gan_weight_gen=1e-2,
                        gan_head_loss=form, normalize_ratio=False)
    tr = FDistillTrainer(_teacher(), cfg)
    gen_logs, critic_logs = tr.step(*_batch(0)), tr.step(*_batch(1))
    (_, lg, fg), (_, lf, fd), (_, lr_, _) = calls
    assert lg.shape == lf.shape == lr_.shape == (B, 3) and fg == fd == form
    sp = torch.nn.functional.softplus
    if form == "per_head":
        want_g = sum(sp(-lg[:, h]).mean() for h in range(3)) / 3
        want_d = sum(sp(lf[:, h]).mean() + sp(-lr_[:, h]).mean() for h in range(3)) / 3
    else:
        want_g = sp(-lg.mean(1)).mean()
        want_d = sp(lf.mean(1)).mean() + sp(-lr_.mean(1)).mean()
    assert gen_logs["loss_gan_g"] == pytest.approx(float(want_g), rel=1e-6)
    assert critic_logs["loss_d"] == pytest.approx(float(want_d), rel=1e-6)
    r = lg.mean(1).clamp(-10, 10).exp().clamp(0.1, 20)
    assert gen_logs["ratio_mean"] == pytest.approx(float(r.mean()), rel=1e-6)


def _short_run(cfg: DistillConfig, steps: int = 4) -> FDistillTrainer:
    tr = FDistillTrainer(_teacher(), cfg)
    fit(tr, _batches(), steps, progress=False)
    return tr


def test_one_head_trains_bit_for_bit_the_same_in_both_forms():
    """With one head the two GAN head losses are the same maths: identical networks, bins and logs (R1 on,
    micro-batches, both placements)."""
    for placement in ("teacher", "fake_score"):
        runs = [_short_run(DistillConfig(gan_head_loss=form, disc_placement=placement, student_update_freq=2,
                                         gan_weight_gen=1e-2, r1_gamma=1.0, accum_steps=2))
                for form in ("per_head", "mean_logit")]
        for name in ("student", "fake_score", "disc", "weighting"):
            a, b = (getattr(r, name).state_dict() for r in runs)
            assert all(torch.equal(a[k], b[k]) for k in a), (placement, name)
        drop = ("time_s", "images_per_s")
        assert [{k: v for k, v in h.items() if k not in drop} for h in runs[0].history] == [
            {k: v for k, v in h.items() if k not in drop} for h in runs[1].history]


def test_old_checkpoints_resume_with_the_head_loss_they_trained_with(tmp_path):
    """Records without ``gan_head_loss`` were written by code that took the GAN losses of the mean logit: with
    several heads they resume only with ``gan_head_loss="mean_logit"`` (the new default is refused, naming the
    setting); with one head, where both forms agree, they resume with either."""
    three = ("8x8", "4x4", "bottleneck")
    for feats, refused in ((three, True), (("bottleneck",), False)):
        tr = FDistillTrainer(_teacher(), DistillConfig(disc_features=feats, gan_head_loss="mean_logit"))
        state = tr.state_dict()
        del state["config"]["gan_head_loss"]  # as written before the setting existed
        path = tmp_path / f"old_{len(feats)}.pt"
        torch.save(state, path)
        FDistillTrainer(_teacher(), DistillConfig(disc_features=feats, gan_head_loss="mean_logit")).load_checkpoint(
            path)
        new = FDistillTrainer(_teacher(), DistillConfig(disc_features=feats))
        if refused:
            with pytest.raises(ValueError, match=r"another configuration.*'gan_head_loss': \('mean_logit', "
                                                 r"'per_head'\)"):
                new.load_checkpoint(path)
        else:
            new.load_checkpoint(path)
    # a new several-head checkpoint records its form, and resuming it with the other is refused
    tr = FDistillTrainer(_teacher(), DistillConfig(disc_features=three))
    tr.save_checkpoint(tmp_path / "new.pt")
    FDistillTrainer(_teacher(), DistillConfig(disc_features=three)).load_checkpoint(tmp_path / "new.pt")
    with pytest.raises(ValueError, match=r"'gan_head_loss': \('per_head', 'mean_logit'\)"):
        FDistillTrainer(_teacher(), DistillConfig(disc_features=three, gan_head_loss="mean_logit")).load_checkpoint(
            tmp_path / "new.pt")


def _ddpmpp_teacher() -> torch.nn.Module:
    """CIFAR-10's network type: it has an augment-label mapping that distillation never feeds."""
    torch.manual_seed(0)
    return build_edm(**tiny_ddpmpp_config(img_resolution=8, img_channels=1, label_dim=10, model_channels=8,
                                          attn_resolutions=[]))


def _ddp_worker(rank: int, world: int, placement: str, port: int, out: str, net: str = "adm") -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = DistillConfig(disc_placement=placement, student_update_freq=2, gan_weight_gen=1e-2, r1_gamma=0.1)
        teacher = _teacher() if net == "adm" else _ddpmpp_teacher()
        tr = FDistillTrainer(teacher, cfg, "cpu", rank=rank, world_size=world, rng_mode="per_rank")
        for i in range(4):
            tr.step(*_batch(world * i + rank))
        flat = torch.cat([p.detach().flatten() for m in (tr.student, tr.fake_score, tr.disc) for p in m.parameters()])
        torch.save({"params": flat, "bins": tr.weighting.normalizer.bins.clone()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("placement", "net"), [pytest.param("teacher", "adm", marks=pytest.mark.slow),
                                                ("fake_score", "adm"), ("teacher", "ddpmpp")])
def test_ddp_wrap_keeps_ranks_in_sync(tmp_path, placement, net):
    """Two gloo ranks with different data: DDP-wrapped networks and all-reduced ratio bins stay identical
    (one forward per backward for every wrapped network, frozen critics unwrapped in generator steps)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, placement, port, str(tmp_path), net), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["params"], r1["params"]) and torch.equal(r0["bins"], r1["bins"])
    assert not torch.equal(r0["bins"], torch.ones_like(r0["bins"]))


@pytest.mark.parametrize("channels", [4, 8, 32, 768])
def test_discriminator_head_is_not_constant_for_narrow_features(channels):
    """GroupNorm after the 4x4 stride-4 conv sees a 1x1 map: each group needs several channels, or the
    normalised value is always 0 and the logit (hence the ratio) never depends on the input."""
    torch.manual_seed(0)
    head = DiscriminatorHead(channels, 4)
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_channels // m.num_groups >= 4 for m in norms)
    logits = head(torch.randn(16, channels, 4, 4)).detach()
    assert float(logits.std()) > 1e-3


def test_trainer_is_reproducible_from_its_seed_alone():
    teacher = _teacher()
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        tr = FDistillTrainer(teacher, DistillConfig(student_update_freq=2, seed=5))
        fit(tr, _batches(), 3, progress=False)
        runs.append(torch.cat([p.detach().flatten() for p in tr.student.parameters()]))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("placement", ["teacher", "fake_score"])
def test_steps_skip_decoder_work_that_no_loss_uses(placement):
    """With the discriminator on the teacher, the critic step runs only the teacher's encoder (its x0 is unused)
    and the generator step keeps no decoder graph of the network that feeds the discriminator (its x0 enters
    the loss detached); with the heads on the fake score, the critic needs that network whole."""
    tr = FDistillTrainer(_teacher(), DistillConfig(disc_placement=placement), device="cpu")
    seen = []
    spied = tr.teacher if placement == "teacher" else tr.fake_score
    forward = spied.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("decoder", "grad") if kwargs.get("return_features") else "x0 only")
        return forward(*args, **kwargs)

    spied.forward = spy
    x, y = _batch(0)
    tr.generator_step(x, y)
    assert seen == ["no_grad"]
    seen.clear()
    tr.critic_step(x, y)
    assert seen == (["skip"] if placement == "teacher" else ["grad"])


@pytest.mark.parametrize("preset", ["imagenet64", "cifar10", "dmd2"])
def test_gpu_presets_take_a_bf16_step_on_a_small_network_with_attention(preset):
    """Each GPU preset's trainer settings (bf16, its discriminator placement and features, R1 or not) run a
    generator and a critic step on a small teacher with attention in the encoder, as the real runs do."""
    from fdistill_lab.train.presets import resolve

    dcfg, _ = resolve(preset, {})
    torch.manual_seed(0)
    teacher = build_edm(**tiny_adm_config(img_resolution=32, channel_mult=[1, 2, 2], attn_resolutions=[16, 8]))
    tr = FDistillTrainer(teacher, dcfg)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([3, 7])
    gen, crit = tr.generator_step(x, y), tr.critic_step(x, y)
    assert all(math.isfinite(v) for v in (*gen.values(), *crit.values()))
    assert ("r1" in crit) == (dcfg.r1_gamma > 0)


def test_compile_norms_reaches_every_network_and_keeps_the_numbers(monkeypatch):
    """compile_norms changes speed, not maths: it reaches every network (teacher, student, fake score, EMA), and a
    generator and a critic step give the plain trainer's losses, also with R1 in bf16 (whose double backward runs
    the norms eagerly). torch.compile is a stand-in here (see test_networks)."""
    from fdistill_lab.networks import layers

    calls = []
    monkeypatch.setattr(layers, "_get_compiled_norm_act", lambda: lambda *a: calls.append(1) or layers._norm_act(*a))
    x, y = _batch(0)
    for extra in ({}, dict(r1_gamma=1.0, precision="bf16")):
        logs = []
        for fast in (False, True):
            tr = FDistillTrainer(_teacher(), DistillConfig(student_update_freq=2, compile_norms=fast, **extra))
            for net in (tr.teacher, tr.student, tr.fake_score, tr.student_ema):
                assert all(m.compiled == fast for m in net.modules() if isinstance(m, layers.GroupNorm))
            calls.clear()
            logs.append({**tr.generator_step(x, y), **tr.critic_step(x, y)})
            assert bool(calls) == fast
        same = [k for k in logs[0] if k != "images_per_s"]  # the stand-in is the eager function: equal numbers
        assert "loss_f" in same and {k: logs[1][k] for k in same} == {k: logs[0][k] for k in same}


def test_discriminator_head_gives_the_same_logits_for_channels_last_features():
    """Channels-last bf16 features (compile_norms/channels_last runs) give the NCHW logits: the head works in NCHW
    (torch 2.13's CPU bf16 convolution to a 1x1 output is wrong for channels-last input)."""
    torch.manual_seed(0)
    head = DiscriminatorHead(16, 8)
    f = torch.randn(4, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = head(f)
        out = head(f.to(memory_format=torch.channels_last))
    assert torch.equal(out, ref)
