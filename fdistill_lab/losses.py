"""f-distill losses: the h-weighted distribution-matching surrogate, GAN and fake-score losses.

References: paper sections 6 (generator), 7 (fake score), 8 (GAN); DMD2 for the normaliser. With the reverse KL
(h = 1) the generator update is DMD2's. :mod:`fdistill_lab.method` assembles them into the two objectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .edm import SIGMA_DATA, as_sigma, loss_weight

DMD_EPS = 1e-6  # added to the DMD normaliser's mean |x - x0_teacher| (paper section 6, step 5; FastGen)
GAN_HEAD_LOSSES = ("per_head", "mean_logit")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}")


def dmd_normalizer(x: torch.Tensor, x0_teacher: torch.Tensor, eps: float = DMD_EPS) -> torch.Tensor:
    """Per-sample DMD weight w = 1 / (mean_{C,H,W} |x - x0_teacher| + eps), fp32, detached (paper section 6,
    step 5; FastGen's ``variational_score_distillation_loss``, eps 1e-6 added, not a floor).

    Returned with shape [B, 1, ..., 1] to broadcast against x.
    """
    _check_same_shape(x=x, x0_teacher=x0_teacher)
    diff = (x.detach().float() - x0_teacher.detach().float()).abs()
    m = diff.flatten(1).mean(1) + eps
    return (1.0 / m).reshape(-1, *([1] * (x.ndim - 1)))


def distillation_gradient(
    x: torch.Tensor,
    x0_fake: torch.Tensor,
    x0_teacher: torch.Tensor,
    weights: torch.Tensor | None = None,
    dmd_normalize: bool = True,
) -> torch.Tensor:
    """g = h_norm * (x0_fake - x0_teacher) / (mean|x - x0_teacher| + 1e-6) (paper section 6, steps 5-6).

    In EDM, x0_fake - x0_teacher = -sigma^2 (s_p - s_q), so g is the f-distill gradient direction of
    paper eq. (gradient identity) with the DMD weighting. ``weights`` is h_norm per sample [B].
    """
    _check_same_shape(x=x, x0_fake=x0_fake, x0_teacher=x0_teacher)
    # fold both per-sample factors into one [B, 1, ..] scale: a single pass over the images
    scale = dmd_normalizer(x, x0_teacher) if dmd_normalize else None
    if weights is not None:
        w = weights.detach().float().flatten()
        if w.shape[0] != x.shape[0]:
            raise ValueError(f"weights have {w.shape[0]} entries but the batch has {x.shape[0]}")
        w = w.reshape(-1, *([1] * (x.ndim - 1)))
        scale = w if scale is None else scale * w
    g = x0_fake.detach().float() - x0_teacher.detach().float()
    if scale is not None:
        g = g * scale
    return g


def fdistill_loss(
    x: torch.Tensor,
    x0_fake: torch.Tensor,
    x0_teacher: torch.Tensor,
    weights: torch.Tensor | None = None,
    dmd_normalize: bool = True,
) -> torch.Tensor:
    """Surrogate 0.5 * mean (x - sg(x - g))^2, whose gradient in x is g / x.numel() (section 6, step 7)."""
    g = distillation_gradient(x, x0_fake, x0_teacher, weights, dmd_normalize)
    target = (x.detach().float() - g).detach()
    return 0.5 * F.mse_loss(x.float(), target, reduction="mean")


def dmd2_loss(x: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """DMD2's distribution-matching loss written as in its paper, for equivalence tests with rkl.

    p_real = x - x0_real, p_fake = x - x0_fake, grad = (p_real - p_fake) / mean|p_real| (NaN -> 0),
    loss = 0.5 * mse(x, sg(x - grad)).
    """
    with torch.no_grad():
        p_real = x - x0_real
        p_fake = x - x0_fake
        grad = (p_real - p_fake) / p_real.abs().mean(dim=list(range(1, x.ndim)), keepdim=True)
        grad = torch.nan_to_num(grad)
    return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float(), reduction="mean")


# ----------------------------------------------------------------------------- GAN and critic


def head_logits(logits: torch.Tensor, head_loss: str = "per_head") -> torch.Tensor:
    """Discriminator logits [B] (one head) or [B, H] (one per head) as the GAN losses read them, in fp32.

    ``"per_head"`` keeps [B, H]: each head's logit gets the loss and the losses are averaged with equal weight
    (FastGen's ``gan_loss_generator`` / ``gan_loss_discriminator`` on its [B, H] logits). ``"mean_logit"``
    averages the heads' logits first, one loss on [B]. With one head both are the same.
    """
    if head_loss not in GAN_HEAD_LOSSES:
        raise ValueError(f"head_loss must be one of {GAN_HEAD_LOSSES}; got {head_loss!r}")
    if logits.ndim not in (1, 2):
        raise ValueError(f"logits must be [B] or [B, heads]; got shape {tuple(logits.shape)}")
    l = logits.float()
    return l.mean(1) if head_loss == "mean_logit" and l.ndim == 2 else l


def mean_logit(logits: torch.Tensor) -> torch.Tensor:
    """The heads' mean logit [B] of logits [B] or [B, H]: its exp is the ratio r (section 4; FastGen's
    ``fake_logits.mean(dim=1)``)."""
    return logits.mean(1) if logits.ndim == 2 else logits


def gan_generator_loss(logits_fake: torch.Tensor, head_loss: str = "per_head") -> torch.Tensor:
    """Non-saturating generator loss (section 8): mean_h mean_b softplus(-l_fake[b, h]) per head (default),
    or mean_b softplus(-mean_h l_fake[b, h]) with ``head_loss="mean_logit"``; see :func:`head_logits`."""
    return F.softplus(-head_logits(logits_fake, head_loss)).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor,
                           head_loss: str = "per_head") -> torch.Tensor:
    """Discriminator loss mean softplus(l_fake) + mean softplus(-l_real), per head and averaged over the heads
    (default) or on the mean logit (:func:`head_logits`). Real is positive, so the optimal logit is
    log(p_t / q_t) and r = exp(logit) (section 4)."""
    lr_, lf_ = head_logits(logits_real, head_loss), head_logits(logits_fake, head_loss)
    return F.softplus(lf_).mean() + F.softplus(-lr_).mean()


def r1_penalty(logits_real: torch.Tensor, x_real: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty mean ||d logit / d x_real||^2 (multiply by gamma / 2). x_real needs grad. With
    several heads ([B, H] logits) the logit is the heads' mean (:func:`mean_logit`), whatever the GAN losses'
    ``head_loss``: one double backward, and the penalty of the logit whose exp is the ratio.

    Its backward differentiates a gradient: run the forward pass that gives ``logits_real`` inside
    :func:`fdistill_lab.networks.layers.twice_differentiable` (the trainer does), since the fused bf16 attention
    kernels and compiled norms have no second derivative.
    """
    if not x_real.requires_grad:
        raise ValueError("x_real must require grad for the R1 penalty")
    (grad,) = torch.autograd.grad(mean_logit(logits_real).float().sum(), x_real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


FAKE_SCORE_WEIGHTINGS = ("none", "edm")


def denoising_loss(
    x0_pred: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    weighting: str = "none",
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """Fake-score (denoising score matching) loss in x0 space (section 7).

    ``weighting="none"``: unweighted mean squared error (FastGen); ``"edm"``: EDM's
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM, DMD2).
    """
    _check_same_shape(x0_pred=x0_pred, x0=x0)
    if weighting not in FAKE_SCORE_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {FAKE_SCORE_WEIGHTINGS}; got {weighting!r}")
    err = (x0_pred.float() - x0.detach().float()) ** 2
    if weighting == "edm":
        err = err * loss_weight(as_sigma(sigma, err), sigma_data)
    return err.mean()
