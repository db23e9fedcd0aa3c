"""Ratio estimation, two-stage normalisation and the f-distill surrogate losses."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdistill_lab import divergences as D
from fdistill_lab.losses import (
    denoising_loss,
    distillation_gradient,
    dmd2_loss,
    dmd_normalizer,
    fdistill_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    head_logits,
    mean_logit,
    r1_penalty,
)
from fdistill_lab.method import FDistillWeighting
from fdistill_lab.ratio import RatioNormalizer, normalize_weights, ratio_from_logits


def _batch(seed=0, b=6, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    x0_t = x + 0.3 * torch.randn(b, *shape, generator=g, dtype=torch.float64)
    x0_f = x + 0.3 * torch.randn(b, *shape, generator=g, dtype=torch.float64)
    return x, x0_f, x0_t


def test_ratio_from_logits_clips_and_detaches():
    l = torch.tensor([-100.0, -3.0, 0.0, 2.0, 100.0], requires_grad=True)
    r = ratio_from_logits(l)
    assert r.dtype == torch.float32 and not r.requires_grad
    torch.testing.assert_close(r, torch.tensor([0.1, 0.1, 1.0, 2.0**0 * torch.e**2, 20.0]))
    # no range: only the logit clip applies
    r2 = ratio_from_logits(l, ratio_min=None, ratio_max=None)
    assert float(r2[0]) == pytest.approx(torch.exp(torch.tensor(-10.0)).item())
    # multi-head logits are averaged first; bf16 logits come back in fp32
    heads = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=torch.bfloat16)
    torch.testing.assert_close(ratio_from_logits(heads), torch.tensor([1.0, 1.0]).exp())
    with pytest.raises(ValueError, match="ratio_min < ratio_max"):
        ratio_from_logits(l, ratio_min=5, ratio_max=1)


def test_stage2_mean_is_one():
    h = torch.rand(37) * 5
    hn = normalize_weights(h)
    assert float(hn.mean()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(normalize_weights(h, enabled=False), h)
    ones = normalize_weights(torch.ones(9))
    assert torch.equal(ones, torch.ones(9))  # reverse KL stays exactly 1


def test_stage1_per_bin_mean_is_one_with_ema_zero():
    g = torch.Generator().manual_seed(1)
    norm = RatioNormalizer(num_bins=10, ema_rate=0.0)
    sigma = torch.rand(400, generator=g) * 80
    r = torch.rand(400, generator=g) * 3 + 0.1
    rt = norm(r, sigma)
    idx = norm.bin_index(sigma)
    for k in idx.unique():
        assert float(rt[idx == k].mean()) == pytest.approx(1.0, rel=1e-5)
    # bins absent from a batch keep their state
    before = norm.bins.clone()
    norm(torch.full((4,), 7.0), torch.full((4,), 0.01))
    assert float(norm.bins[0]) == pytest.approx(7.0) and torch.equal(norm.bins[1:], before[1:])


def test_stage1_ema_and_state_dict_roundtrip():
    norm = RatioNormalizer(num_bins=4, sigma_min=0.002, sigma_max=80, ema_rate=0.5, spacing="log")
    sig = torch.tensor([0.005, 0.1, 2.0, 70.0])  # one per log-spaced bin
    norm.update(torch.tensor([3.0, 3.0, 3.0, 3.0]), sig)
    torch.testing.assert_close(norm.bins, torch.full((4,), 2.0))  # 0.5 * 1 + 0.5 * 3
    sd = norm.state_dict()
    assert "bins" in sd
    fresh = RatioNormalizer(num_bins=4, spacing="log", ema_rate=0.5)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.bins, norm.bins)
    with pytest.raises(ValueError, match="spacing must be one of"):
        RatioNormalizer(spacing="cubic")
    with pytest.raises(ValueError, match="ema_rate"):
        RatioNormalizer(ema_rate=1.0)
    with pytest.raises(ValueError, match="entries"):
        norm.update(torch.ones(3), sig)


def test_stage1_update_is_exactly_the_float32_reference():
    """Per-bin sums accumulate sequentially in float32 and the state is rounded as bins * rho, then
    + (1 - rho) * sum / count, each step in float32.

    Bit for bit: the seeded toy results that notebooks 02 and 03 quote move with the last bit of this state.
    """
    f32 = np.float32
    g = torch.Generator().manual_seed(3)
    norm = RatioNormalizer(num_bins=10, ema_rate=0.3)
    rho = f32(0.3)
    for _ in range(50):
        n = int(torch.randint(1, 80, (1,), generator=g))
        r, sigma = torch.rand(n, generator=g) * 19.9 + 0.1, torch.rand(n, generator=g) * 80
        idx = norm.bin_index(sigma).tolist()
        expected = norm.bins.numpy().copy()
        for k in set(idx):
            total = f32(0)
            for i in (i for i, j in enumerate(idx) if j == k):  # sequential, in batch order
                total = f32(total + f32(r[i]))
            expected[k] = f32(f32(expected[k] * rho) + f32(f32(f32(1) - rho) * total) / f32(idx.count(k)))
        norm.update(r, sigma)
        assert np.array_equal(norm.bins.numpy(), expected)


@pytest.mark.parametrize("logit_clip", [10.0, None])
def test_weighting_ignores_the_input_tensor_and_keeps_the_bins_buffer(logit_clip):
    """The in-place steps work on fresh tensors only: the caller's logits are untouched and ``bins`` stays the
    registered buffer (optimisers, DDP broadcasts and checkpoints hold that object)."""
    w = FDistillWeighting("js", logit_clip=logit_clip, bin_ema=0.5, ratio_max=50.0)
    buf = w.normalizer.bins
    logits = torch.tensor([-30.0, 0.5, 2.0, 30.0])
    before = logits.clone()
    w(logits, torch.tensor([0.01, 1.0, 10.0, 70.0]))
    assert torch.equal(logits, before)
    assert w.normalizer.bins is buf and w.normalizer.bins.data_ptr() == buf.data_ptr()
    assert not torch.equal(buf, torch.ones_like(buf))


@pytest.mark.gpu
def test_weighting_does_not_sync_the_gpu_with_the_host():
    """No host sync in a training step's weighting (torch.bincount on CUDA reads its maximum back)."""
    w = FDistillWeighting("js", bin_ema=0.5).cuda()
    logits, sigma = torch.randn(64, device="cuda"), torch.rand(64, device="cuda") * 80
    torch.cuda.set_sync_debug_mode("error")
    try:
        h, _ = w(logits, sigma)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert h.device.type == "cuda" and torch.isclose(h.mean().cpu(), torch.tensor(1.0))


def test_bin_index_edges():
    norm = RatioNormalizer(num_bins=10, sigma_min=0.0 + 1e-3, sigma_max=80.0)
    idx = norm.bin_index(torch.tensor([1e-3, 7.99, 8.01, 79.9, 80.0, 500.0]))
    assert idx.tolist() == [0, 0, 1, 9, 9, 9]


def test_surrogate_gradient_equals_g():
    x, x0_f, x0_t = _batch()
    w = torch.rand(x.shape[0], dtype=torch.float64) + 0.5
    xg = x.clone().requires_grad_(True)
    loss = fdistill_loss(xg, x0_f, x0_t, weights=w)
    (grad,) = torch.autograd.grad(loss, xg)
    g = distillation_gradient(x, x0_f, x0_t, weights=w)
    torch.testing.assert_close(grad * x.numel(), g.to(grad.dtype), rtol=1e-5, atol=1e-7)
    # and the DMD normaliser is 1 / (mean |x - x0_teacher| + 1e-6) per sample
    m = (x - x0_t).abs().flatten(1).mean(1)
    torch.testing.assert_close(dmd_normalizer(x, x0_t).flatten().double(), 1 / (m + 1e-6), rtol=1e-6, atol=0)


def test_rkl_equals_dmd2_update():
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 3 * 8 * 8)
    z = torch.randn(6, 16)
    x0_f, x0_t = (torch.randn(6, 3, 8, 8) for _ in range(2))
    weighting = FDistillWeighting("rkl")
    h, _ = weighting(torch.randn(6) * 3, torch.rand(6) * 80)
    assert torch.equal(h, torch.ones(6))

    def grads(loss_fn):
        net.zero_grad()
        x = net(z).reshape(6, 3, 8, 8)
        loss_fn(x).backward()
        return [p.grad.clone() for p in net.parameters()]

    ours = grads(lambda x: fdistill_loss(x, x0_f, x0_t, weights=h))
    ref = grads(lambda x: dmd2_loss(x, x0_f, x0_t))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", D.names())
def test_weighting_pipeline(name):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, generator=g) * 2
    sigma = torch.rand(64, generator=g) * 80
    wt = FDistillWeighting(name)
    h, stats = wt(logits, sigma)
    assert h.shape == (64,) and float(h.mean()) == pytest.approx(1.0, abs=1e-5)
    assert "normalizer.bins" in wt.state_dict()
    # without any normalisation the weight is h(clipped exp(logit))
    raw = FDistillWeighting(name, normalize_ratio=False, normalize_weight=False)
    h_raw, _ = raw(logits, sigma)
    r = ratio_from_logits(logits)
    torch.testing.assert_close(h_raw, D.get(name).h(r))
    summary = stats.summary()
    assert summary["ratio_min"] >= 0.1 and summary["ratio_max"] <= 20
    assert summary["ratio_min"] <= summary["ratio_mean"] <= summary["ratio_max"]


def test_js_downweights_low_ratio_samples():
    wt = FDistillWeighting("js", normalize_ratio=False)
    h, _ = wt(torch.tensor([-5.0, 0.0, 5.0]), torch.ones(3))
    assert h[0] < h[1] < h[2]


def test_gan_losses():
    l = torch.tensor([0.0, 0.0])
    assert float(gan_generator_loss(l)) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert float(gan_discriminator_loss(l, l)) == pytest.approx(2 * torch.log(torch.tensor(2.0)).item())
    # a perfect discriminator has near-zero loss; a fooled one a large loss
    assert float(gan_discriminator_loss(torch.tensor([20.0]), torch.tensor([-20.0]))) < 1e-6
    assert float(gan_discriminator_loss(torch.tensor([-20.0]), torch.tensor([20.0]))) > 39
    x = torch.randn(4, 2, requires_grad=True)
    assert float(r1_penalty((x * 3).sum(1), x)) == pytest.approx(18.0)
    with pytest.raises(ValueError, match="require grad"):
        r1_penalty(torch.zeros(2), torch.zeros(2, 2))


def test_denoising_loss_weightings():
    x0 = torch.zeros(2, 1, 2, 2)
    pred = torch.ones(2, 1, 2, 2)
    sigma = torch.tensor([0.5, 1.0])
    assert float(denoising_loss(pred, x0, sigma)) == pytest.approx(1.0)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert float(denoising_loss(pred, x0, sigma, weighting="edm")) == pytest.approx(float(lam.mean()))
    with pytest.raises(ValueError, match="weighting must be one of"):
        denoising_loss(pred, x0, sigma, weighting="snr")
    with pytest.raises(ValueError, match="shape mismatch"):
        denoising_loss(pred, torch.zeros(2, 1, 2, 3), sigma)


def test_mismatched_shapes_raise():
    x, x0_f, x0_t = _batch()
    with pytest.raises(ValueError, match="shape mismatch"):
        fdistill_loss(x, x0_f[:, :2], x0_t)
    with pytest.raises(ValueError, match="entries"):
        fdistill_loss(x, x0_f, x0_t, weights=torch.ones(3))


@pytest.mark.parametrize("m", [0.0, 1e-6, 1e-5, 1e-4, 0.3])
def test_dmd_normalizer_adds_fastgen_epsilon(m):
    """w = 1 / (mean|x - x0_teacher| + 1e-6) (paper section 6, step 5; FastGen's variational_score_distillation_loss
    adds 1e-6): at mean 1e-6 the weight is 1 / 2e-6, at 1e-4 1 / 1.01e-4, and a zero difference gives 1e6."""
    x0_t = torch.zeros(2, 3, 4, 4)
    x = torch.full_like(x0_t, m)
    x[1] = -m  # the absolute difference counts
    w = dmd_normalizer(x, x0_t)
    assert w.shape == (2, 1, 1, 1) and w.dtype == torch.float32
    torch.testing.assert_close(w.flatten().double(), torch.full((2,), 1 / (m + 1e-6), dtype=torch.float64),
                               rtol=1e-6, atol=0)


# three heads (the cifar10 preset's 32, 16, 8), two samples: fixed logits and hand-computed losses
L_FAKE = [[0.5, -1.0, 2.0], [1.5, 0.0, -3.0]]
L_REAL = [[1.0, 2.5, -1.5], [0.2, -0.4, 3.0]]


def _sp(v: float) -> float:
    return math.log1p(math.exp(v))


def _hand_losses(form: str) -> tuple[float, float]:
    """(generator, discriminator) loss by hand: per head, mean over heads of the per-head mean softplus; on the
    mean logit, one softplus of each sample's mean logit."""
    if form == "per_head":
        heads = range(3)
        gen = sum(sum(_sp(-row[h]) for row in L_FAKE) / 2 for h in heads) / 3
        disc = sum(sum(_sp(row[h]) for row in L_FAKE) / 2 + sum(_sp(-row[h]) for row in L_REAL) / 2
                   for h in heads) / 3
        return gen, disc
    mf, mr = [sum(row) / 3 for row in L_FAKE], [sum(row) / 3 for row in L_REAL]
    return sum(_sp(-v) for v in mf) / 2, sum(_sp(v) for v in mf) / 2 + sum(_sp(-v) for v in mr) / 2


@pytest.mark.parametrize("form", ["per_head", "mean_logit"])
def test_gan_losses_with_several_heads_by_hand(form):
    """Logits [B, H]: FastGen's per-head losses averaged over the heads (the default), or the losses of the mean
    logit (``head_loss="mean_logit"``), against values computed by hand; the two differ."""
    lf, lr_ = torch.tensor(L_FAKE), torch.tensor(L_REAL)
    gen, disc = _hand_losses(form)
    assert float(gan_generator_loss(lf, form)) == pytest.approx(gen, rel=1e-6)
    assert float(gan_discriminator_loss(lr_, lf, form)) == pytest.approx(disc, rel=1e-6)
    other = _hand_losses("mean_logit" if form == "per_head" else "per_head")
    assert abs(gen - other[0]) > 0.05 and abs(disc - other[1]) > 0.05
    if form == "per_head":  # the default
        assert float(gan_generator_loss(lf)) == pytest.approx(gen, rel=1e-6)
        assert float(gan_discriminator_loss(lr_, lf)) == pytest.approx(disc, rel=1e-6)
    # the gradient reaches each head's logit: d/dl[b, h] of mean softplus(-l) over the 6 entries, or through the mean
    lg = lf.clone().requires_grad_(True)
    gan_generator_loss(lg, form).backward()
    m = lf if form == "per_head" else lf.mean(1, keepdim=True).expand(2, 3)
    want = -torch.sigmoid(-m) / 6  # B * H = 6 entries, or B = 2 samples times 1/H = 1/3 from the mean
    torch.testing.assert_close(lg.grad, want)


def test_gan_losses_with_one_head_are_the_same_in_both_forms():
    """One head ([B] or [B, 1]): both forms give bit for bit the loss and gradient of the single-logit formulas."""
    g = torch.Generator().manual_seed(0)
    l, l_real = torch.randn(7, generator=g) * 3, torch.randn(7, generator=g) * 3
    ref_g, ref_d = F.softplus(-l).mean(), F.softplus(l).mean() + F.softplus(-l_real).mean()
    for form in ("per_head", "mean_logit"):
        for a, b in ((l, l_real), (l[:, None], l_real[:, None])):
            assert torch.equal(gan_generator_loss(a, form), ref_g)
            assert torch.equal(gan_discriminator_loss(b, a, form), ref_d)
        lg = l[:, None].clone().requires_grad_(True)
        gan_generator_loss(lg, form).backward()
        l1 = l.clone().requires_grad_(True)
        F.softplus(-l1).mean().backward()
        assert torch.equal(lg.grad[:, 0], l1.grad)
    assert torch.equal(mean_logit(l[:, None]), l) and torch.equal(head_logits(l[:, None], "mean_logit"), l)


def test_gan_head_loss_errors():
    with pytest.raises(ValueError, match=r"head_loss must be one of \('per_head', 'mean_logit'\); got 'sum'"):
        gan_generator_loss(torch.zeros(2, 3), "sum")
    with pytest.raises(ValueError, match=r"logits must be \[B\] or \[B, heads\]"):
        gan_discriminator_loss(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))


def test_r1_penalty_with_several_heads_uses_the_mean_logit():
    """R1 of logits [B, H] is R1 of the heads' mean logit: l_h = a_h sum(x) with a = (1, 3, 8) has mean 4 sum(x),
    gradient 4 per coordinate, so ||.||^2 = 16 * 2 (summing the heads instead would give 12^2 * 2)."""
    x = torch.randn(4, 2, requires_grad=True)
    logits = torch.stack([a * x.sum(1) for a in (1.0, 3.0, 8.0)], 1)
    assert float(r1_penalty(logits, x)) == pytest.approx(32.0)
    assert torch.equal(r1_penalty(logits[:, :1], x), r1_penalty(logits[:, 0], x))
