"""The toy trainer: f-distill of an analytic Gaussian-mixture teacher into a one-step MLP (notebooks 02-03).

The same algorithm and vocabulary as the image trainer (:class:`fdistill_lab.train.trainer.FDistillTrainer`): each
of ``steps`` iterations updates the student or the critics (fake score by denoising score matching on detached
student samples, discriminator by the GAN loss on noisy teacher vs student samples) by the schedule of
:func:`~fdistill_lab.method.iteration_updates`, with the objectives of :mod:`fdistill_lab.method`. The toy's
defaults: ``critic_warmup`` = 100 critic iterations, then cycles of K = 3 (``"critic_first"``: two critic updates,
then one generator update), so 1300 iterations make 400 generator updates. The teacher's x0 is its exact denoiser.

``oracle=True`` replaces both learned critics by exact quantities of a model of the student: a Gaussian KDE of a
fresh batch of ``oracle_samples`` student samples (``student_kde``). The fake score is that KDE's exact denoiser at
sigma, the logit is the exact log p_sigma - log q_hat_sigma. No critic is trained then: critic iterations do nothing.

Noise levels: sigma is drawn uniformly over the indices of a 1000-point Karras grid (rho = 7) on
[sigma_min, sigma_max] = [0.01, 8] by default: 8 is 4x the ring radius (p_sigma is then nearly one
Gaussian), 0.01 is a twentieth of a mode's std (0.2); the median draw is about 0.6.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .. import divergences
from ..edm import sample_sigma_grid
from ..losses import FAKE_SCORE_WEIGHTINGS
from ..method import (
    SCHEDULES,
    FDistillWeighting,
    WeightingConfig,
    critic_objective,
    frozen,
    generator_objective,
    iteration_updates,
)
from ..mixtures import GaussianMixture
from .metrics import mode_metrics
from .models import ToyDenoiser, ToyDiscriminator, ToyGenerator, student_kde

EVALUATION_KEYS = ("modes_covered", "mass_tv", "precision")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class ToyConfig(WeightingConfig):
    """Settings of one toy run (defaults: the notebook's classroom run); names as in the image trainer's
    ``DistillConfig``. The weighting settings are inherited; the toy bins its ratios by log sigma (its noise
    levels span three decades) and keeps a running mean per bin (``bin_ema`` 0.5, the ImageNet-64 preset's rate)."""

    bin_ema: float = 0.5
    bin_spacing: str = "log"
    steps: int = 1300  # iterations (each updates the student or the critics)
    schedule: str = "critic_first"
    student_update_freq: int = 3  # K: one generator update per K iterations after the warm-up
    critic_warmup: int = 100  # critic-only iterations first
    batch_size: int = 256
    lr_student: float = 2e-3
    lr_fake: float = 2e-3
    lr_disc: float = 2e-3
    betas: tuple[float, float] = (0.5, 0.999)
    hidden: int = 64
    depth: int = 3
    z_dim: int = 2
    init_center: tuple[float, float] = (2.0, 0.0)
    init_scale: float = 0.1
    sigma_min: float = 0.01
    sigma_max: float = 8.0
    sigma_data: float = 1.4
    gan_weight_gen: float = 0.0
    oracle: bool = False
    oracle_samples: int = 256
    oracle_bandwidth: float = 0.05
    fake_score_weighting: str = "none"
    eval_every: int = 150  # iterations between evaluations of the student, counted after the critic warm-up
    eval_samples: int = 2000
    ema_beta: float = 0.0  # > 0: evaluate and sample an EMA of the student's weights (rate per generator step)
    lr_schedule: str = "constant"  # or "cosine": the student's lr decays to 0 over its generator steps
    seed: int = 0

    def __post_init__(self) -> None:
        self.divergence = divergences.canonical_name(self.divergence)
        for name in ("steps", "batch_size", "hidden", "depth", "z_dim", "eval_every", "eval_samples",
                     "oracle_samples", "student_update_freq"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if int(self.critic_warmup) < 0:
            raise ValueError(f"critic_warmup must be >= 0; got {self.critic_warmup}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {self.schedule!r}")
        if not self.oracle and self.schedule != "dmd2" and self.student_update_freq < 2:
            raise ValueError(f"student_update_freq must be >= 2 with schedule={self.schedule!r} unless oracle=True "
                             "(K-1 critic updates per generator update: the critics must be trained)")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {self.sigma_min}, {self.sigma_max}")
        if self.gan_weight_gen < 0:
            raise ValueError(f"gan_weight_gen must be >= 0; got {self.gan_weight_gen}")
        if not 0.0 <= self.ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1) (0: no EMA); got {self.ema_beta}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}")
        if self.fake_score_weighting not in FAKE_SCORE_WEIGHTINGS:
            raise ValueError(f"fake_score_weighting must be one of {FAKE_SCORE_WEIGHTINGS}; "
                             f"got {self.fake_score_weighting!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> ToyConfig:
        """A copy with some settings changed (validated)."""
        return ToyConfig(**{**self.to_dict(), **changes})


class ToyTrainer:
    """One toy run: the networks ``student``, ``fake_score`` and ``disc``, the ``weighting``, their Adam optimisers
    ``opt_student``, ``opt_fake`` and ``opt_disc``, the training stream ``rng`` and the logs: ``history`` (one row per
    iteration, the image trainer's keys) and ``evaluations`` (mode metrics every ``eval_every`` iterations after
    the critic warm-up, and after the last).

    :meth:`step` runs one iteration, :meth:`fit` the schedule; :meth:`generator_step` and :meth:`critic_step`
    are single updates.
    """

    def __init__(self, teacher: GaussianMixture, config: ToyConfig) -> None:
        self.teacher, self.config = teacher, config
        c = config
        torch.manual_seed(c.seed)
        self.rng = torch.Generator().manual_seed(c.seed + 1)  # training batches only
        self.eval_rng = torch.Generator().manual_seed(c.seed + 2)  # evaluations: they must not shift training
        self.student = ToyGenerator(c.z_dim, c.hidden, c.depth, teacher.dim, c.init_center, c.init_scale)
        self.fake_score = ToyDenoiser(teacher.dim, c.hidden, c.depth, c.sigma_data)
        self.disc = ToyDiscriminator(teacher.dim, c.hidden, c.depth, c.sigma_data)
        self.weighting = FDistillWeighting.from_config(c)
        self.opt_student = torch.optim.Adam(self.student.parameters(), c.lr_student, betas=c.betas, foreach=True)
        self.opt_fake = torch.optim.Adam(self.fake_score.parameters(), c.lr_fake, betas=c.betas, foreach=True)
        self.opt_disc = torch.optim.Adam(self.disc.parameters(), c.lr_disc, betas=c.betas, foreach=True)
        self.history: list[dict[str, float]] = []
        self.evaluations: list[dict[str, float]] = []
        self.step_count = 0
        self.student_ema = copy.deepcopy(self.student).requires_grad_(False) if c.ema_beta > 0 else None
        self.generator_steps_done = 0
        self.generator_steps_total = sum(iteration_updates(i, c.schedule, c.student_update_freq, c.critic_warmup)[0]
                                         for i in range(c.steps))

    # ------------------------------------------------------------------ draws and exact quantities
    def sample_sigma(self, n: int) -> torch.Tensor:
        """Noise levels of the toy (float32): uniform index into a Karras grid on [sigma_min, sigma_max]."""
        return sample_sigma_grid(n, 0, 999, 1000, self.config.sigma_min, self.config.sigma_max,
                                 generator=self.rng).float()

    def randn(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng)

    def teacher_x0(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact teacher denoiser E_p[x0 | x_t] (float64 maths, float32 result)."""
        return self.teacher.denoise(x_t.detach().double(), sigma.double()).float()

    def oracle_model(self, generator: torch.Generator | None = None) -> GaussianMixture:
        """KDE of a fresh batch of student samples (independent of the batch being updated), drawn with
        ``generator`` (default: the run's training stream)."""
        with torch.no_grad():
            z = torch.randn(self.config.oracle_samples, self.student.z_dim,
                            generator=self.rng if generator is None else generator)
            return student_kde(self.student(z), self.config.oracle_bandwidth)

    def oracle_logit(self, kde: GaussianMixture, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact log p_sigma(x_t) - log q_hat_sigma(x_t) (differentiable in x_t)."""
        return self.teacher.log_ratio(kde, x_t.double(), sigma.double()).float()

    # ------------------------------------------------------------------ updates
    def critic_step(self) -> dict[str, float]:
        """One update of the fake score and the discriminator (:func:`~fdistill_lab.method.critic_objective`)."""
        c = self.config
        if c.oracle:
            raise RuntimeError("oracle=True uses exact critics; there is nothing to train")
        b = c.batch_size
        with torch.no_grad():
            x = self.student.sample(b, self.rng)
        sigma = self.sample_sigma(b)
        eps = self.randn(x.shape)
        real = self.teacher.sample(b, generator=self.rng).float()
        sigma_real = self.sample_sigma(b)  # an independent noise level for the real batch
        eps_real = self.randn(real.shape)

        def predict(x_t: torch.Tensor, x_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return self.fake_score(x_t, sigma), self.disc(x_t, sigma), self.disc(x_r, sigma_real)

        loss, stats = critic_objective(x, sigma, eps, real, sigma_real, eps_real, predict, c.fake_score_weighting,
                                       c.sigma_data)
        for opt in (self.opt_fake, self.opt_disc):
            opt.zero_grad(set_to_none=True)
        loss.backward()
        critic_norm = _grad_norm(self.fake_score, self.disc)
        self.opt_fake.step()
        self.opt_disc.step()
        return {**{k: float(v) for k, v in stats.items()}, "grad_norm_critic": critic_norm}

    def generator_step(self) -> dict[str, float]:
        """One update of the student (:func:`~fdistill_lab.method.generator_objective`)."""
        c = self.config
        b = c.batch_size
        x = self.student.sample(b, self.rng)
        sigma = self.sample_sigma(b)
        eps = self.randn(x.shape)

        def predict(x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if c.oracle:
                kde = self.oracle_model()
                x0_fake = kde.denoise(x_t.detach().double(), sigma.double()).float()
                return self.teacher_x0(x_t, sigma), x0_fake, self.oracle_logit(kde, x_t, sigma)
            with torch.no_grad():
                x0_fake = self.fake_score(x_t.detach(), sigma)
            return self.teacher_x0(x_t, sigma), x0_fake, self.disc(x_t, sigma)

        with frozen(self.disc):
            loss, stats = generator_objective(x, sigma, eps, predict, self.weighting, c.gan_weight_gen)
            self.opt_student.zero_grad(set_to_none=True)
            loss.backward()
        student_norm = _grad_norm(self.student)
        lr = self._student_lr()
        for group in self.opt_student.param_groups:
            group["lr"] = lr
        self.opt_student.step()
        self.generator_steps_done += 1
        if self.student_ema is not None:
            with torch.no_grad():
                for p_ema, p in zip(self.student_ema.parameters(), self.student.parameters()):
                    p_ema.lerp_(p, 1.0 - c.ema_beta)
        return {**{k: float(v) for k, v in stats.items()}, "grad_norm_student": student_norm}

    def _student_lr(self) -> float:
        """``lr_student``, or its cosine decay over the run's generator steps (``lr_schedule="cosine"``)."""
        c = self.config
        if c.lr_schedule == "constant":
            return c.lr_student
        frac = min(1.0, self.generator_steps_done / max(1, self.generator_steps_total))
        return c.lr_student * 0.5 * (1.0 + math.cos(math.pi * frac))

    def updates(self, i: int | None = None) -> tuple[bool, bool]:
        """(generator?, critic?) at iteration ``i`` (default: the next); critics are never updated with the oracle."""
        c = self.config
        gen, critic = iteration_updates(self.step_count if i is None else i, c.schedule, c.student_update_freq,
                                        c.critic_warmup)
        return gen, critic and not c.oracle

    def step(self) -> dict[str, float]:
        """One iteration of the schedule; returns (and appends to ``history``) its logs."""
        gen, critic = self.updates()
        logs: dict[str, float] = {"step": float(self.step_count), "generator_step": float(gen)}
        if gen:
            logs.update(self.generator_step())
        if critic:
            logs.update(self.critic_step())
        self.step_count += 1
        self.history.append(logs)
        return logs

    # ------------------------------------------------------------------ schedule and evaluation
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` one-step samples (of the EMA student when ``ema_beta`` > 0), drawn with ``generator`` (default:
        the evaluation stream)."""
        net = self.student_ema if self.student_ema is not None else self.student
        return net.sample(n, self.eval_rng if generator is None else generator)

    @torch.no_grad()
    def evaluate(self, n: int | None = None) -> dict:
        """Mode metrics of ``n`` fresh student samples (see ``metrics.mode_metrics``), drawn with the run's
        evaluation stream, so how often and how much a run is evaluated does not change its training."""
        return mode_metrics(self.sample(n or self.config.eval_samples), self.teacher)

    def fit(self, steps: int | None = None, progress: bool = True, desc: str | None = None) -> ToyTrainer:
        """Run ``steps`` more iterations (default: up to the config's ``steps``), as the image trainer's ``fit``
        does, evaluating the student every ``eval_every`` iterations after the critic warm-up (the warm-up leaves it
        unchanged) and after the config's last iteration."""
        c = self.config
        until = c.steps if steps is None else self.step_count + steps
        if not self.step_count <= until <= c.steps:
            raise ValueError(f"steps must be in [0, {c.steps - self.step_count}] (the config's steps={c.steps}, "
                             f"{self.step_count} done); got {steps}")
        quiet = {} if progress else {"disable": True}  # leave the default so TQDM_DISABLE=1 still works
        bar = tqdm(range(self.step_count, until), desc=desc or f"{c.divergence} seed {c.seed}", leave=False, **quiet)
        for _ in bar:
            self.step()
            after_warmup = self.step_count - c.critic_warmup
            if (after_warmup > 0 and after_warmup % c.eval_every == 0) or self.step_count == c.steps:
                m = self.evaluate()
                self.evaluations.append({"step": float(self.step_count), **{k: m[k] for k in EVALUATION_KEYS}})
                bar.set_postfix(modes=m["modes_covered"], tv=f"{m['mass_tv']:.2f}")
        return self

    def curve(self, key: str) -> tuple[list[float], list[float]]:
        """(iterations, values) of an evaluation metric (``EVALUATION_KEYS``) or of a logged training quantity
        (the iterations that log it: ``loss_f`` on generator steps, ``loss_dsm`` on critic steps, ...)."""
        rows = self.evaluations if key in EVALUATION_KEYS else self.history
        pairs = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _grad_norm(*modules: torch.nn.Module) -> float:
    """L2 norm of the gradients of ``modules`` (the image trainer's ``grad_norm_*`` logs)."""
    norms = [p.grad.detach().float().norm() for m in modules for p in m.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def train_toy(teacher: GaussianMixture, config: ToyConfig | None = None, progress: bool = True,
              **overrides) -> ToyTrainer:
    """Build a :class:`ToyTrainer` from ``config`` (with keyword overrides) and run its schedule."""
    cfg = ToyConfig(**{**(config.to_dict() if config else {}), **overrides})
    return ToyTrainer(teacher, cfg).fit(progress=progress)


@torch.no_grad()
def score_disagreement(run: ToyTrainer, sigma: float, n: int = 2000,
                       divergences_: tuple[str, ...] = ("rkl", "js", "fkl"), seed: int = 0) -> dict[str, torch.Tensor]:
    """Paper Fig. 2 analogue at one noise level, on n noisy student samples x_t.

    Returns x_t [n, 2], ``disagreement`` = ||x0_fake - x0_teacher|| = sigma^2 ||s_p - s_q||, the teacher
    log-density ``log_p``, the log-ratio ``log_r`` used by the run (discriminator logit, or exact for the
    oracle), and for each divergence ``h_<name>``: h(r) normalised to mean 1 over the samples (with the
    run's ratio clipping; no per-bin stage since sigma is fixed).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    g = torch.Generator().manual_seed(seed)
    x = run.student(torch.randn(n, run.student.z_dim, generator=g))
    s = torch.full((n,), float(sigma))
    x_t = x + sigma * torch.randn(x.shape, generator=g)
    x0_t = run.teacher_x0(x_t, s)
    if run.config.oracle:
        kde = run.oracle_model(g)  # seeded like the samples; the run's training stream is left alone
        x0_f = kde.denoise(x_t.double(), s.double()).float()
        log_r = run.oracle_logit(kde, x_t, s)
    else:
        x0_f = run.fake_score(x_t, s)
        log_r = run.disc(x_t, s)
    log_p = run.teacher.log_prob(x_t.double(), s.double()).float()
    out = {"x_t": x_t, "disagreement": (x0_f - x0_t).norm(dim=1), "log_p": log_p, "log_r": log_r}
    c = run.config
    for name in divergences_:  # the run's weighting with this divergence, without the per-bin stage
        weighting = FDistillWeighting(name, c.logit_clip, c.ratio_min, c.ratio_max, normalize_ratio=False)
        out[f"h_{divergences.canonical_name(name)}"] = weighting(log_r, s, update=False)[0]
    return out
