"""The f-distill update in one place (paper sections 4-9), called by the toy trainer and the image trainer.

The trainers draw the random numbers and call the networks (``predict``); these functions do the rest:

* :class:`FDistillWeighting`: the weight of each sample, ratio -> normalised ratio -> h -> normalised h;
* :func:`generator_objective`: the student's loss, the h-weighted score difference plus the GAN term;
* :func:`critic_objective`: the fake score's denoising loss plus the discriminator's GAN loss (and R1);
* :func:`iteration_updates`: which of the two an iteration of the schedule updates; :func:`frozen` keeps the
  critics' weights out of the generator's backward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import divergences
from .edm import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from .losses import (
    denoising_loss,
    fdistill_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    mean_logit,
    r1_penalty,
)
from .ratio import EPS, RatioNormalizer, normalize_weights, ratio_from_logits

Tensor = torch.Tensor
SCHEDULES = ("fastgen", "dmd2", "critic_first")


@dataclass
class WeightingConfig:
    """Settings of the weight h (sections 4-5), shared by both trainers' configs: the ``divergence`` gives h;
    logits are clipped to +-``logit_clip`` and r = exp(logit) to [``ratio_min``, ``ratio_max``]; stage 1
    (``normalize_ratio``) divides r by a running mean (EMA ``bin_ema``) in each of ``num_bins`` noise-level bins
    (``bin_spacing`` linear or log in sigma); stage 2 (``normalize_weight``) divides h by its batch mean."""

    divergence: str = "js"
    logit_clip: float | None = 10.0
    ratio_min: float | None = 0.1
    ratio_max: float | None = 20.0
    normalize_ratio: bool = True
    normalize_weight: bool = True
    num_bins: int = 10
    bin_ema: float = 0.0
    bin_spacing: str = "linear"


class FDistillWeighting(nn.Module):
    """Logits and noise levels -> normalised weights h_norm [B] (sections 4-5):

        r = clip(exp(clip(logit)))          ratio p_t / q_t from the discriminator
        r~ = r / bins[k(sigma)]             stage 1: per-noise-bin running mean (a buffer: checkpoints carry it)
        h_norm = h(r~) / mean_batch h(r~)   stage 2: mean weight 1, so rkl (h = 1) is DMD2's update
    """

    def __init__(self, divergence: str | divergences.Divergence = "js", logit_clip: float | None = 10.0,
                 ratio_min: float | None = 0.1, ratio_max: float | None = 20.0, normalize_ratio: bool = True,
                 normalize_weight: bool = True, num_bins: int = 10, bin_ema: float = 0.0, bin_spacing: str = "linear",
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> None:
        super().__init__()
        self.divergence = divergences.get(divergence)
        self.logit_clip, self.ratio_min, self.ratio_max = logit_clip, ratio_min, ratio_max
        self.normalize_weight = normalize_weight
        self.normalizer = RatioNormalizer(num_bins, sigma_min, sigma_max, bin_ema, bin_spacing,
                                          enabled=normalize_ratio)

    @classmethod
    def from_config(cls, cfg: WeightingConfig, divergence: str | None = None) -> FDistillWeighting:
        """From a :class:`WeightingConfig` (``divergence`` overrides its own); the sigma range is the config's
        ``sigma_min`` / ``sigma_max`` if it has them (the toy), else EDM's."""
        return cls(divergence or cfg.divergence, cfg.logit_clip, cfg.ratio_min, cfg.ratio_max, cfg.normalize_ratio,
                   cfg.normalize_weight, cfg.num_bins, cfg.bin_ema, cfg.bin_spacing,
                   getattr(cfg, "sigma_min", SIGMA_MIN), getattr(cfg, "sigma_max", SIGMA_MAX))

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence.name}, logit_clip={self.logit_clip}, "
                f"ratio=[{self.ratio_min}, {self.ratio_max}], normalize_weight={self.normalize_weight}")

    @torch.no_grad()
    def forward(self, logits: Tensor, sigma: Tensor, update: bool = True) -> tuple[Tensor, WeightStats]:
        """(h_norm [B], :class:`WeightStats`); ``update`` folds this batch into the stage-1 bins first."""
        r = ratio_from_logits(logits, self.logit_clip, self.ratio_min, self.ratio_max)
        r_tilde = self.normalizer(r, sigma, update=update)
        h_norm = normalize_weights(self.divergence.h(r_tilde), enabled=self.normalize_weight, eps=EPS)
        return h_norm, WeightStats(r, r_tilde, h_norm)


@dataclass(frozen=True)
class WeightStats:
    """Ratio and weight tensors of one batch; ``summary()`` reduces them for logging (one device sync)."""

    ratio: Tensor
    ratio_normalized: Tensor
    weight: Tensor

    KEYS = ("ratio_mean", "ratio_min", "ratio_max", "ratio_norm_mean", "weight_std", "weight_max")

    def summary_tensors(self) -> dict[str, Tensor]:
        """The statistics as 0-d float32 tensors on the batch's device (no device sync)."""
        r, w = self.ratio.float(), self.weight.float()
        vals = (r.mean(), r.min(), r.max(), self.ratio_normalized.float().mean(), w.std(correction=0), w.max())
        return dict(zip(self.KEYS, vals))

    def summary(self) -> dict[str, float]:
        """The statistics as floats (one device sync)."""
        return dict(zip(self.KEYS, torch.stack(list(self.summary_tensors().values())).tolist()))


def noisy(x: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """x_t = x + sigma eps (EDM's forward process), sigma one value per sample."""
    return x + sigma.reshape(-1, *[1] * (x.ndim - 1)) * eps


def generator_objective(x: Tensor, sigma: Tensor, eps: Tensor, predict: Callable[[Tensor], tuple[Tensor, ...]],
                        weighting: FDistillWeighting, gan_weight: float = 0.0, dmd_normalize: bool = True,
                        weights: tuple[Tensor, dict[str, Tensor]] | None = None, gan_head_loss: str = "per_head",
                        ) -> tuple[Tensor, dict[str, Tensor]]:
    """The student's loss for samples ``x`` = G(z) (section 6):

        x_t = x + sigma eps;  (x0_teacher, x0_fake, logit) = predict(x_t)
        h_norm = weighting(mean_h logit_h, sigma)
        g = h_norm (x0_fake - x0_teacher) / (mean|x - x0_teacher| + 1e-6)   = -sigma^2 h (s_p - s_q) / mean|.|
        L = 1/2 mean (x - sg(x - g))^2 + gan_weight mean_h mean softplus(-logit_h)

    so dL/dx = g / x.numel(), the f-distill gradient E[h(r) (s_q - s_p)] with DMD's weighting. ``predict`` runs
    the networks; x_t reaches it with a graph only when ``gan_weight`` > 0 (then the logit's gradient flows to
    the student through the frozen critic). ``weights``: (h_norm, statistics) computed beforehand over a larger
    batch (gradient accumulation). The logit is [B] (one head) or [B, H] (one per discriminator head): the ratio
    always comes from the heads' mean logit (FastGen), the GAN loss per head and averaged (``gan_head_loss=
    "per_head"``, FastGen) or on the mean logit (``"mean_logit"``); see :func:`~fdistill_lab.losses.head_logits`.
    Returns (loss, detached statistics).
    """
    use_gan = gan_weight > 0
    x_t = noisy(x, sigma, eps)
    with torch.set_grad_enabled(use_gan and torch.is_grad_enabled()):
        x0_teacher, x0_fake, logits = predict(x_t if use_gan else x_t.detach())
    if weights is None:
        h, wstats = weighting(mean_logit(logits.detach()), sigma, update=True)
        stats = wstats.summary_tensors()
    else:
        h, stats = weights
    loss_f = fdistill_loss(x, x0_fake.detach(), x0_teacher.detach(), h, dmd_normalize)
    loss_gan = gan_generator_loss(logits, gan_head_loss) if use_gan else torch.zeros((), device=x.device)
    loss = loss_f + gan_weight * loss_gan
    return loss, {**stats, "loss_f": loss_f.detach(), "loss_gan_g": loss_gan.detach(), "loss_g": loss.detach(),
                  "logit_gen_mean": mean_logit(logits.detach()).mean()}


def critic_objective(x: Tensor, sigma: Tensor, eps: Tensor, real: Tensor, sigma_real: Tensor, eps_real: Tensor,
                     predict: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
                     fake_score_weighting: str = "none", sigma_data: float = SIGMA_DATA, gan_weight: float = 1.0,
                     r1_gamma: float = 0.0, gan_head_loss: str = "per_head") -> tuple[Tensor, dict[str, Tensor]]:
    """The critics' loss on student samples ``x`` (detached) and real samples ``real`` (sections 7-8):

        x_t = sg(x) + sigma eps;  x_r = real + sigma_r eps_r;  (x0_fake, l_fake, l_real) = predict(x_t, x_r)
        L = mean w(sigma) (x0_fake - x)^2                          fake score: denoising score matching
          + gan_weight mean_h [mean softplus(l_fake_h) + mean softplus(-l_real_h)]   discriminator, real positive
          + r1_gamma / 2 mean ||d mean_h l_real_h / d x_r||^2     R1 (only if r1_gamma > 0)

    At the optimum l = log p_t / q_t, so r = exp(l) is the ratio the generator's weight needs. ``w`` is 1 or EDM's
    lambda(sigma) (``fake_score_weighting``). Logits are [B] or [B, H] (one per head); ``gan_head_loss`` as in
    :func:`generator_objective`; R1 and ``disc_acc`` use the heads' mean logit. Returns (loss, detached
    statistics).
    """
    x = x.detach()
    x_t, x_r = noisy(x, sigma, eps), noisy(real, sigma_real, eps_real)
    if r1_gamma > 0:
        x_r = x_r.detach().requires_grad_(True)
    x0_fake, logits_fake, logits_real = predict(x_t, x_r)
    loss_dsm = denoising_loss(x0_fake, x, sigma, fake_score_weighting, sigma_data)
    loss_d = gan_discriminator_loss(logits_real, logits_fake, gan_head_loss)
    loss = loss_dsm + gan_weight * loss_d
    lr_, lf_ = mean_logit(logits_real.detach()), mean_logit(logits_fake.detach())
    stats = {"loss_dsm": loss_dsm.detach(), "loss_d": loss_d.detach(), "logit_real_mean": lr_.mean(),
             "logit_fake_mean": lf_.mean(), "disc_acc": 0.5 * ((lr_ > 0).float().mean() + (lf_ < 0).float().mean())}
    if r1_gamma > 0:
        r1 = r1_penalty(logits_real, x_r)
        loss = loss + 0.5 * r1_gamma * r1
        stats["r1"] = r1.detach()
    stats["loss_critic"] = loss.detach()
    return loss, stats


def iteration_updates(i: int, schedule: str, student_update_freq: int, critic_warmup: int = 0) -> tuple[bool, bool]:
    """(update the generator?, update the critic?) at iteration ``i`` (section 9). The first ``critic_warmup``
    iterations train the critic only; then, with K = ``student_update_freq`` and j = i - critic_warmup:

    * ``"fastgen"``: the generator if j % K == 0, else the critic (K-1 critic steps per generator step, FastGen);
    * ``"critic_first"``: the generator if j % K == K-1, else the critic (the critic steps come first, as in GANs);
    * ``"dmd2"``: the critic every iteration, the generator too (before it) if j % K == 0 (DMD2).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    if i < critic_warmup:
        return False, True
    j = (i - critic_warmup) % student_update_freq
    if schedule == "dmd2":
        return j == 0, True
    generator = j == (0 if schedule == "fastgen" else student_update_freq - 1)
    return generator, not generator


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Stop gradients into the parameters of ``modules`` for the block (inputs can still get gradients): the
    critics during the generator update."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
