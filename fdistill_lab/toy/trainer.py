"""Training loop of the 2-D toy lab: f-distill of an analytic Gaussian-mixture teacher into a one-step MLP.

One iteration = ``critic_steps`` critic updates (fake score by denoising score matching on detached
student samples + discriminator by the GAN loss on noisy teacher vs student samples), then one
generator update with the f-distill surrogate (paper section 6):
    g = h_norm(r) * (x0_fake - x0_teacher) / mean|x - x0_teacher|,  L = 0.5 mean(x - sg(x - g))^2
      + gan_weight * mean softplus(-l_fake),
with x0_teacher the exact mixture denoiser, r = exp(logit) from the discriminator and h_norm the
two-stage normalised weight (``FDistillWeighting``).

``oracle=True`` replaces both learned critics by exact quantities of a model of the student: a
Gaussian KDE of a fresh batch of ``oracle_samples`` student samples (``student_kde``). The fake score
is that KDE's exact denoiser at sigma, the logit is the exact log p_sigma - log q_hat_sigma. The
teacher score is always exact. No critic is trained then.

Noise levels: sigma is drawn uniformly over the indices of a 1000-point Karras grid (rho = 7) on
[sigma_min, sigma_max] = [0.01, 8] by default: 8 is 4x the ring radius (p_sigma is then nearly one
Gaussian), 0.01 is a twentieth of a mode's std (0.2); the median draw is about 0.6.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .. import divergences
from ..edm import sample_sigma_grid
from ..losses import (
    FAKE_SCORE_WEIGHTINGS,
    FDistillWeighting,
    denoising_loss,
    fdistill_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from ..mixtures import GaussianMixture
from ..ratio import ratio_from_logits
from .metrics import mode_metrics
from .models import Generator, ToyDenoiser, ToyDiscriminator, student_kde


@dataclass
class ToyConfig:
    """Settings of one toy run (defaults: the notebook's classroom run)."""

    divergence: str = "js"
    steps: int = 400  # generator updates
    critic_steps: int = 2  # critic (fake score + discriminator) updates per generator update
    critic_warmup: int = 100  # critic updates before the first generator update
    batch: int = 256
    lr_gen: float = 2e-3
    lr_critic: float = 2e-3
    betas: tuple[float, float] = (0.5, 0.999)
    hidden: int = 64
    depth: int = 3
    z_dim: int = 2
    init_center: tuple[float, float] = (2.0, 0.0)
    init_scale: float = 0.1
    sigma_min: float = 0.01
    sigma_max: float = 8.0
    sigma_data: float = 1.4
    gan_weight: float = 0.0
    oracle: bool = False
    oracle_samples: int = 256
    oracle_bandwidth: float = 0.05
    fake_score_weighting: str = "none"
    logit_clip: float = 10.0
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    normalize_ratio: bool = True
    normalize_weight: bool = True
    num_bins: int = 10
    bin_ema: float = 0.5
    bin_spacing: str = "log"
    eval_every: int = 50
    eval_samples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        self.divergence = divergences.canonical_name(self.divergence)
        for name in ("steps", "batch", "hidden", "depth", "z_dim", "eval_every", "eval_samples", "oracle_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("critic_steps", "critic_warmup"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {self.sigma_min}, {self.sigma_max}")
        if self.gan_weight < 0:
            raise ValueError(f"gan_weight must be >= 0; got {self.gan_weight}")
        if self.fake_score_weighting not in FAKE_SCORE_WEIGHTINGS:
            raise ValueError(f"fake_score_weighting must be one of {FAKE_SCORE_WEIGHTINGS}; "
                             f"got {self.fake_score_weighting!r}")
        if not self.oracle and self.critic_steps == 0:
            raise ValueError("critic_steps must be >= 1 unless oracle=True (the critics must be trained)")

    def to_dict(self) -> dict:
        return asdict(self)


class ToyDistiller:
    """State of one toy run: generator, critics, weighting, optimisers and history.

    Use ``critic_step()`` / ``generator_step()`` for single updates, ``train()`` for the full schedule.
    """

    def __init__(self, teacher: GaussianMixture, config: ToyConfig) -> None:
        self.teacher, self.cfg = teacher, config
        c = config
        torch.manual_seed(c.seed)
        self.rng = torch.Generator().manual_seed(c.seed + 1)  # training batches only
        self.eval_rng = torch.Generator().manual_seed(c.seed + 2)  # evaluations: they must not shift training
        self.generator = Generator(c.z_dim, c.hidden, c.depth, teacher.dim, c.init_center, c.init_scale)
        self.fake_score = ToyDenoiser(teacher.dim, c.hidden, c.depth, c.sigma_data)
        self.discriminator = ToyDiscriminator(teacher.dim, c.hidden, c.depth, c.sigma_data)
        self.weighting = FDistillWeighting.from_config(c)
        self.opt_gen = torch.optim.Adam(self.generator.parameters(), c.lr_gen, betas=c.betas, foreach=True)
        critic_params = list(self.fake_score.parameters()) + list(self.discriminator.parameters())
        self.opt_critic = torch.optim.Adam(critic_params, c.lr_critic, betas=c.betas, foreach=True)
        self.history: dict[str, list[float]] = {}
        self.num_generator_steps = 0

    # ------------------------------------------------------------------ pieces
    def sample_sigma(self, n: int) -> torch.Tensor:
        """Noise levels of the toy (float32): uniform index into a Karras grid on [sigma_min, sigma_max]."""
        return sample_sigma_grid(n, 0, 999, 1000, self.cfg.sigma_min, self.cfg.sigma_max,
                                 generator=self.rng).float()

    def noise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x + sigma.reshape(-1, 1) * torch.randn(x.shape, generator=self.rng)

    def teacher_x0(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact teacher denoiser E_p[x0 | x_t] (float64 maths, float32 result)."""
        return self.teacher.denoise(x_t.detach().double(), sigma.double()).float()

    def oracle_model(self, generator: torch.Generator | None = None) -> GaussianMixture:
        """KDE of a fresh batch of student samples (independent of the batch being updated), drawn with
        ``generator`` (default: the run's training generator)."""
        with torch.no_grad():
            z = torch.randn(self.cfg.oracle_samples, self.generator.z_dim,
                            generator=self.rng if generator is None else generator)
            return student_kde(self.generator(z), self.cfg.oracle_bandwidth)

    def oracle_logit(self, kde: GaussianMixture, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact log p_sigma(x_t) - log q_hat_sigma(x_t) (differentiable in x_t)."""
        return self.teacher.log_ratio(kde, x_t.double(), sigma.double()).float()

    def _log(self, **values: float) -> None:
        for k, v in values.items():
            self.history.setdefault(k, []).append(float(v))

    # ------------------------------------------------------------------ updates
    def critic_step(self) -> dict[str, float]:
        """One update of the fake score (DSM on detached student samples) and the discriminator."""
        if self.cfg.oracle:
            raise RuntimeError("oracle=True uses exact critics; there is nothing to train")
        b = self.cfg.batch
        with torch.no_grad():
            x = self.generator.sample(b, self.rng)
        sigma = self.sample_sigma(b)
        x_t = self.noise(x, sigma)
        dsm = denoising_loss(self.fake_score(x_t, sigma), x, sigma.reshape(-1, 1), self.cfg.fake_score_weighting,
                             self.cfg.sigma_data)
        real = self.teacher.sample(b, generator=self.rng).float()
        sigma_real = self.sample_sigma(b)  # independent noise level for the real batch
        real_t = self.noise(real, sigma_real)
        disc = gan_discriminator_loss(self.discriminator(real_t, sigma_real), self.discriminator(x_t, sigma))
        self.opt_critic.zero_grad(set_to_none=True)
        (dsm + disc).backward()
        self.opt_critic.step()
        return {"dsm_loss": float(dsm.detach()), "disc_loss": float(disc.detach())}

    def generator_step(self) -> dict[str, float]:
        """One f-distill update of the generator (paper section 6)."""
        b = self.cfg.batch
        x = self.generator.sample(b, self.rng)
        sigma = self.sample_sigma(b)
        x_t = self.noise(x, sigma)  # keeps the graph to x for the GAN term
        x0_teacher = self.teacher_x0(x_t, sigma)
        if self.cfg.oracle:
            kde = self.oracle_model()
            x0_fake = kde.denoise(x_t.detach().double(), sigma.double()).float()
            with torch.set_grad_enabled(self.cfg.gan_weight > 0):  # gradient only for the GAN term
                logits = self.oracle_logit(kde, x_t, sigma)
        else:
            with torch.no_grad():
                x0_fake = self.fake_score(x_t.detach(), sigma)
            logits = self.discriminator(x_t, sigma)
        h_norm, stats = self.weighting(logits.detach(), sigma)
        loss_f = fdistill_loss(x, x0_fake, x0_teacher, h_norm)
        loss = loss_f
        loss_gan = torch.zeros(())
        if self.cfg.gan_weight > 0:
            loss_gan = gan_generator_loss(logits)
            loss = loss + self.cfg.gan_weight * loss_gan
        self.opt_gen.zero_grad(set_to_none=True)
        if not self.cfg.oracle:
            self.discriminator.requires_grad_(False)
        loss.backward()
        self.discriminator.requires_grad_(True)
        self.opt_gen.step()
        self.num_generator_steps += 1
        return {"gen_loss": float(loss_f.detach()), "gan_gen_loss": float(loss_gan.detach()), **stats.summary()}

    # ------------------------------------------------------------------ schedule
    @torch.no_grad()
    def evaluate(self, n: int | None = None) -> dict:
        """Mode metrics of ``n`` fresh student samples (see ``metrics.mode_metrics``), drawn with the run's
        evaluation generator, so how often and how much a run is evaluated does not change its training."""
        x = self.generator.sample(n or self.cfg.eval_samples, self.eval_rng)
        return mode_metrics(x, self.teacher)

    def train(self, progress: bool = True, desc: str | None = None) -> dict[str, list[float]]:
        """Warm up the critics, then ``steps`` x (``critic_steps`` critic updates + 1 generator update)."""
        c = self.cfg
        if not c.oracle:
            for _ in range(c.critic_warmup):
                self.critic_step()
        quiet = {} if progress else {"disable": True}  # leave the default so TQDM_DISABLE=1 still works
        bar = tqdm(range(c.steps), desc=desc or f"{c.divergence} seed {c.seed}", leave=False, **quiet)
        for i in bar:
            logs: dict[str, float] = {}
            if not c.oracle:
                for _ in range(c.critic_steps):
                    logs = self.critic_step()
            logs.update(self.generator_step())
            self._log(step=self.num_generator_steps, **logs)
            if (i + 1) % c.eval_every == 0 or i + 1 == c.steps:
                m = self.evaluate()
                self._log(eval_step=self.num_generator_steps, eval_modes_covered=m["modes_covered"],
                          eval_mass_tv=m["mass_tv"], eval_precision=m["precision"])
                bar.set_postfix(modes=m["modes_covered"], tv=f"{m['mass_tv']:.2f}")
        return self.history


def train_toy(teacher: GaussianMixture, config: ToyConfig | None = None, progress: bool = True,
              **overrides) -> ToyDistiller:
    """Build a ``ToyDistiller`` from ``config`` (with keyword overrides) and run its schedule."""
    cfg = ToyConfig(**{**(config.to_dict() if config else {}), **overrides})
    run = ToyDistiller(teacher, cfg)
    run.train(progress=progress)
    return run


@torch.no_grad()
def score_disagreement(run: ToyDistiller, sigma: float, n: int = 2000,
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
    x = run.generator(torch.randn(n, run.generator.z_dim, generator=g))
    s = torch.full((n,), float(sigma))
    x_t = x + sigma * torch.randn(x.shape, generator=g)
    x0_t = run.teacher_x0(x_t, s)
    if run.cfg.oracle:
        kde = run.oracle_model(g)  # seeded like the samples; the run's training generator is left alone
        x0_f = kde.denoise(x_t.double(), s.double()).float()
        log_r = run.oracle_logit(kde, x_t, s)
    else:
        x0_f = run.fake_score(x_t, s)
        log_r = run.discriminator(x_t, s)
    log_p = run.teacher.log_prob(x_t.double(), s.double()).float()
    out = {"x_t": x_t, "disagreement": (x0_f - x0_t).norm(dim=1), "log_p": log_p, "log_r": log_r}
    c = run.cfg
    r = ratio_from_logits(log_r, c.logit_clip, c.ratio_min, c.ratio_max)
    for name in divergences_:
        h = divergences.get(name).h(r)
        out[f"h_{divergences.canonical_name(name)}"] = h / h.mean().clamp_min(1e-12)
    return out
