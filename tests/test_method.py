"""The method file (fdistill_lab.method): the schedule, the two objectives against hand-computed values and
autograd, and both trainers running through them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fdistill_lab import method, toy
from fdistill_lab.method import FDistillWeighting, critic_objective, generator_objective, iteration_updates
from fdistill_lab.networks import build_edm, tiny_adm_config
from fdistill_lab.train.config import DistillConfig
from fdistill_lab.train.trainer import FDistillTrainer


def _pattern(schedule: str, k: int, warmup: int = 0, n: int = 9) -> str:
    """G: generator only, C: critic only, B: both."""
    return "".join({(True, False): "G", (False, True): "C", (True, True): "B"}[iteration_updates(i, schedule, k,
                                                                                                warmup)]
                   for i in range(n))


def test_schedules():
    assert _pattern("fastgen", 3) == "GCCGCCGCC"  # FastGen: the generator opens each cycle of K
    assert _pattern("critic_first", 3) == "CCGCCGCCG"  # the critics first, as in GANs (the toy's default)
    assert _pattern("dmd2", 3) == "BCCBCCBCC"  # DMD2: the critic every iteration
    assert _pattern("fastgen", 2, warmup=3) == "CCCGCGCGC"  # a critic warm-up delays the cycles
    assert _pattern("critic_first", 2, warmup=1, n=5) == "CCGCG"
    with pytest.raises(ValueError, match="schedule must be one of"):
        iteration_updates(0, "ttur", 3)


def _inputs(b: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 2, generator=g, dtype=torch.float64, requires_grad=True)
    sigma = torch.rand(b, generator=g, dtype=torch.float64) + 0.1
    eps = torch.randn(b, 2, generator=g, dtype=torch.float64)
    return x, sigma, eps, g


@pytest.mark.parametrize("div", ["rkl", "js", "fkl"])
def test_generator_objective_gradient_is_the_weighted_score_difference(div):
    """dL/dx = g / numel with g = h_norm (x0_fake - x0_teacher) / mean|x - x0_teacher| (section 6), plus the GAN
    term's gradient through the logit; h_norm from the weighting of the logit."""
    x, sigma, eps, g = _inputs()
    w_x0t, w_x0f, w_l = (torch.randn(2, 2, generator=g, dtype=torch.float64) for _ in range(3))

    def predict(x_t):  # smooth stand-ins for the networks
        return torch.tanh(x_t @ w_x0t), torch.tanh(x_t @ w_x0f), (x_t @ w_l).sum(1)

    weighting = FDistillWeighting(div, normalize_ratio=False)
    loss, stats = generator_objective(x, sigma, eps, predict, weighting, gan_weight=0.3)
    (grad,) = torch.autograd.grad(loss, x)
    x_t = x.detach() + sigma[:, None] * eps
    x0t, x0f, logit = predict(x_t)
    h = weighting.divergence.h(torch.exp(logit).clamp(0.1, 20.0))
    h = h / h.mean()
    want = h[:, None] * (x0f - x0t) / (x.detach() - x0t).abs().mean(1, keepdim=True) / x.numel()
    lt = x_t.clone().requires_grad_(True)
    (gan,) = torch.autograd.grad(F.softplus(-(lt @ w_l).sum(1)).mean(), lt)
    torch.testing.assert_close(grad, want + 0.3 * gan, rtol=2e-5, atol=1e-7)  # the losses compute in float32
    assert set(stats) >= {"loss_f", "loss_gan_g", "loss_g", "ratio_mean", "weight_std"}
    assert float(stats["loss_g"]) == pytest.approx(float(stats["loss_f"]) + 0.3 * float(stats["loss_gan_g"]))


def test_generator_objective_without_gan_gives_predict_no_graph():
    x, sigma, eps, _ = _inputs()
    seen = []

    def predict(x_t):
        seen.append((x_t.requires_grad, torch.is_grad_enabled()))
        return x_t * 0.5, x_t * 0.4, x_t.sum(1)

    loss, stats = generator_objective(x, sigma, eps, predict, FDistillWeighting("rkl"), gan_weight=0.0)
    assert seen == [(False, False)] and float(stats["loss_gan_g"]) == 0.0
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_critic_objective_by_hand():
    x, sigma, eps, g = _inputs()
    real = torch.randn(6, 2, generator=g, dtype=torch.float64)
    sigma_r, eps_r = sigma.flip(0), eps.flip(0)
    w = torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def predict(x_t, x_r):
        return x_t @ w, (x_t**2).sum(1) - 1, (x_r**2).sum(1) - 1

    loss, stats = critic_objective(x, sigma, eps, real, sigma_r, eps_r, predict, gan_weight=0.5, r1_gamma=2.0)
    x_t = x.detach() + sigma[:, None] * eps
    x_r = real + sigma_r[:, None] * eps_r
    l_f, l_r = (x_t**2).sum(1) - 1, (x_r**2).sum(1) - 1
    dsm = ((x_t @ w - x.detach()) ** 2).mean()
    gan = F.softplus(l_f).mean() + F.softplus(-l_r).mean()
    r1 = (2 * x_r).pow(2).sum(1).mean()  # d l_real / d x_r = 2 x_r
    torch.testing.assert_close(loss.double(), dsm + 0.5 * gan + 0.5 * 2.0 * r1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats["r1"].double(), r1.detach(), rtol=1e-6, atol=1e-7)
    loss.backward()
    assert w.grad is not None and x.grad is None  # the student's samples enter detached


def test_both_trainers_use_the_method_objectives(monkeypatch):
    calls = {"generator": 0, "critic": 0}
    gen, crit = method.generator_objective, method.critic_objective

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    for module in ("fdistill_lab.toy.trainer", "fdistill_lab.train.trainer"):
        monkeypatch.setattr(f"{module}.generator_objective", counted("generator", gen))
        monkeypatch.setattr(f"{module}.critic_objective", counted("critic", crit))
    run = toy.ToyTrainer(toy.default_teacher(), toy.ToyConfig(steps=5, critic_warmup=2, batch_size=16, hidden=8,
                                                              eval_every=5, eval_samples=50))
    run.fit(progress=False)
    assert calls == {"generator": 1, "critic": 4}
    torch.manual_seed(0)
    teacher = build_edm(**tiny_adm_config(img_resolution=8, img_channels=1, label_dim=10, model_channels=8,
                                          attn_resolutions=[]))
    tr = FDistillTrainer(teacher, DistillConfig(student_update_freq=2))
    images, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (4,))
    for _ in range(2):
        tr.step(images, labels)
    assert calls == {"generator": 2, "critic": 5}


def test_older_checkpoints_load(tmp_path):
    """A trainer checkpoint from before the shared schedule (no critic_warmup in its settings, no device stream)
    resumes: a missing setting counts as its default."""
    torch.manual_seed(0)
    teacher = build_edm(**tiny_adm_config(img_resolution=8, img_channels=1, label_dim=0, model_channels=8,
                                          attn_resolutions=[]))
    tr = FDistillTrainer(teacher, DistillConfig(student_update_freq=2))
    tr.step(torch.rand(4, 1, 8, 8) * 2 - 1)
    state = tr.state_dict()
    del state["config"]["critic_warmup"], state["device_rng"]
    torch.save(state, tmp_path / "old.pt")
    other = FDistillTrainer(teacher, DistillConfig(student_update_freq=2))
    other.load_checkpoint(tmp_path / "old.pt")
    assert other.step_count == 1 and torch.equal(other.rng.cpu.get_state(), tr.rng.cpu.get_state())
    state["config"]["critic_warmup"] = 3
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="critic_warmup"):
        other.load_checkpoint(tmp_path / "other.pt")


def test_resume_with_another_rng_mode_is_refused_before_anything_loads(tmp_path):
    torch.manual_seed(0)
    teacher = build_edm(**tiny_adm_config(img_resolution=8, img_channels=1, label_dim=0, model_channels=8,
                                          attn_resolutions=[]))
    tr = FDistillTrainer(teacher, DistillConfig(student_update_freq=2), "cpu", rng_mode="per_rank")
    tr.step(torch.rand(4, 1, 8, 8) * 2 - 1)
    tr.save_checkpoint(tmp_path / "c.pt")
    other = FDistillTrainer(teacher, DistillConfig(student_update_freq=2), "cpu", rng_mode="shared")
    before = [p.detach().clone() for p in other.student.parameters()]
    with pytest.raises(ValueError, match=r"c\.pt: checkpoint was written with another rng_mode"):
        other.load_checkpoint(tmp_path / "c.pt")
    assert all(torch.equal(a, b) for a, b in zip(before, other.student.parameters())) and other.step_count == 0


def _three_head_predict(g: torch.Generator):
    """Stand-ins for the networks with three discriminator heads: logits [B, 3], head h linear in x_t."""
    w_x0t, w_x0f = (torch.randn(2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    w_l = torch.randn(2, 3, generator=g, dtype=torch.float64)

    def predict(x_t):
        return torch.tanh(x_t @ w_x0t), torch.tanh(x_t @ w_x0f), x_t @ w_l
    return predict, w_l


@pytest.mark.parametrize("form", ["per_head", "mean_logit"])
def test_generator_objective_with_several_heads(form):
    """Logits [B, 3]: the weight h comes from the heads' mean logit in both forms (FastGen's
    ``fake_logits.mean(dim=1)``); the GAN loss is mean_h mean_b softplus(-l[b, h]) (``per_head``, FastGen) or
    mean_b softplus(-mean_h l[b, h]) (``mean_logit``), and so is its gradient."""
    x, sigma, eps, g = _inputs()
    predict, w_l = _three_head_predict(g)
    weighting = FDistillWeighting("js", normalize_ratio=False)
    loss, stats = generator_objective(x, sigma, eps, predict, weighting, gan_weight=0.3, gan_head_loss=form)
    (grad,) = torch.autograd.grad(loss, x)
    x_t = x.detach() + sigma[:, None] * eps
    x0t, x0f, logits = predict(x_t)
    r = torch.exp(logits.mean(1)).clamp(0.1, 20.0)
    h = weighting.divergence.h(r)
    h = h / h.mean()
    want = h[:, None] * (x0f - x0t) / ((x.detach() - x0t).abs().mean(1, keepdim=True) + 1e-6) / x.numel()
    lt = x_t.clone().requires_grad_(True)
    gan = F.softplus(-(lt @ w_l)).mean() if form == "per_head" else F.softplus(-(lt @ w_l).mean(1)).mean()
    (gan_grad,) = torch.autograd.grad(gan, lt)
    torch.testing.assert_close(grad, want + 0.3 * gan_grad, rtol=2e-5, atol=1e-7)
    assert float(stats["loss_gan_g"]) == pytest.approx(float(gan.detach()), rel=1e-6)
    assert float(stats["ratio_mean"]) == pytest.approx(float(r.mean()), rel=1e-6)
    assert float(stats["logit_gen_mean"]) == pytest.approx(float(logits.mean()), rel=1e-6, abs=1e-7)
    other = F.softplus(-(x_t @ w_l).mean(1)).mean() if form == "per_head" else F.softplus(-(x_t @ w_l)).mean()
    assert abs(float(gan.detach()) - float(other)) > 1e-3  # the forms differ on these logits


@pytest.mark.parametrize("form", ["per_head", "mean_logit"])
def test_critic_objective_with_several_heads(form):
    """Logits [B, 3]: the discriminator loss per head and averaged, or on the mean logit; R1 and the accuracy read
    the mean logit in both forms."""
    x, sigma, eps, g = _inputs()
    real = torch.randn(6, 2, generator=g, dtype=torch.float64)
    sigma_r, eps_r = sigma.flip(0), eps.flip(0)
    w = torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)

    def heads(v):  # head h: scale_h (|v|^2 - 1) + h, so the heads disagree
        return ((v**2).sum(1, keepdim=True) - 1) * scale + torch.arange(3, dtype=torch.float64)

    def predict(x_t, x_r):
        return x_t @ w, heads(x_t), heads(x_r)

    loss, stats = critic_objective(x, sigma, eps, real, sigma_r, eps_r, predict, gan_weight=0.5, r1_gamma=2.0,
                                   gan_head_loss=form)
    x_t = x.detach() + sigma[:, None] * eps
    x_r = real + sigma_r[:, None] * eps_r
    l_f, l_r = heads(x_t), heads(x_r)
    dsm = ((x_t @ w - x.detach()) ** 2).mean()
    if form == "per_head":
        gan = torch.stack([F.softplus(l_f[:, k]).mean() + F.softplus(-l_r[:, k]).mean() for k in range(3)]).mean()
    else:
        gan = F.softplus(l_f.mean(1)).mean() + F.softplus(-l_r.mean(1)).mean()
    r1 = (2 * x_r * scale.mean()).pow(2).sum(1).mean()  # d mean_h l_real / d x_r = 2 x_r mean_h scale_h
    torch.testing.assert_close(loss.double(), dsm + 0.5 * gan + 0.5 * 2.0 * r1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats["loss_d"].double(), gan.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats["r1"].double(), r1.detach(), rtol=1e-6, atol=1e-7)
    acc = 0.5 * ((l_r.mean(1) > 0).double().mean() + (l_f.mean(1) < 0).double().mean())
    assert float(stats["disc_acc"]) == pytest.approx(float(acc))


def _one_head_run(form: str, column: bool):
    """Both objectives with one head whose logits are [B, 1] (``column``) or [B]."""
    x, sigma, eps, g = _inputs()
    w_l = torch.randn(2, 1, generator=g, dtype=torch.float64)

    def shaped(logit):
        return logit if column else logit[:, 0]

    def predict(x_t):
        return torch.tanh(x_t), torch.tanh(0.5 * x_t), shaped(x_t @ w_l)

    def predict_critic(x_t, x_r):
        return x_t * 0.9, shaped(x_t @ w_l), shaped(x_r @ w_l)

    loss, stats = generator_objective(x, sigma, eps, predict, FDistillWeighting("js"), gan_weight=0.3,
                                      gan_head_loss=form)
    (grad,) = torch.autograd.grad(loss, x)
    real = torch.randn(6, 2, generator=g, dtype=torch.float64)
    closs, cstats = critic_objective(x, sigma, eps, real, sigma, eps, predict_critic, r1_gamma=1.0,
                                     gan_head_loss=form)
    return loss, grad, stats, closs, cstats


def test_objectives_with_one_head_are_the_same_in_both_forms():
    """One head: logits [B] (the toy) or [B, 1] (the image trainer's discriminator), either form, give bit for bit
    the same losses, statistics and gradients."""
    ref, *others = (_one_head_run(form, column) for form in ("per_head", "mean_logit") for column in (False, True))
    for loss, grad, stats, closs, cstats in others:
        assert torch.equal(loss, ref[0]) and torch.equal(grad, ref[1]) and torch.equal(closs, ref[3])
        assert all(torch.equal(stats[k], ref[2][k]) for k in ref[2])
        assert all(torch.equal(cstats[k], ref[4][k]) for k in ref[4])
