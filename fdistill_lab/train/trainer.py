"""Image-scale f-distill trainer: teacher -> one-step student (fdistill_paper.md sections 6-10).

Network-agnostic: any denoiser with the EDMPrecond interface ``net(x, sigma, class_labels,
return_features=False) -> x0`` or ``(x0, features)`` (attributes ``img_resolution``, ``img_channels``,
``label_dim``). Student and fake score start as copies of the frozen teacher (section 9). One
iteration is a generator step or a critic step (fake-score DSM + discriminator), by ``schedule``:

* ``"fastgen"``: iteration i is a generator step if i % K == 0, else a critic step (K-1 : 1);
* ``"dmd2"``: the critic is updated every iteration, the generator also when i % K == 0 (K : 1).

All randomness (latents, noise levels, noise, uniform labels) comes from the trainer's own CPU
``torch.Generator``, saved in checkpoints, so a resumed run repeats an uninterrupted one exactly.
Under bf16 autocast the networks run in bf16 while ratio, weight and loss maths stay in fp32.
DDP: pass ``wrap`` (e.g. ``lambda m: DistributedDataParallel(m)``) for the trainable networks; the
ratio normaliser and weight mean already all-reduce.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import divergences
from ..edm import SIGMA_MAX, sample_sigma_grid
from ..files import atomic_save, load_file
from ..losses import (
    FAKE_SCORE_WEIGHTINGS,
    FDistillWeighting,
    denoising_loss,
    fdistill_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    r1_penalty,
)
from ..networks import EDMPrecond
from ..networks.discriminator import Discriminator
from ..networks.layers import twice_differentiable, use_compiled_norms

SCHEDULES = ("fastgen", "dmd2")
DISC_PLACEMENTS = ("teacher", "fake_score")
GENERATOR_LABELS = ("real", "uniform")
PRECISIONS = ("fp32", "bf16")
BIN_SPACINGS = ("linear", "log")
CHECKPOINT_FORMAT = "fdistill-trainer-v1"
# settings that change speed, not results: a resumed run may change them (and older checkpoints lack them)
SPEED_ONLY_SETTINGS = ("compile_norms",)
Scalars = dict[str, torch.Tensor]  # logged 0-d tensors on the training device, read back once per step


@dataclass
class DistillConfig:
    """Every setting of the trainer (paper Table 5 / FastGen defaults where they exist).

    Schedule: ``student_update_freq`` K and ``schedule`` (see module docstring). Optimisers: AdamW with
    ``betas``, ``weight_decay`` 0.01, one per network (student, fake score, discriminator). The student
    gradient norm is clipped to ``grad_clip`` (FastGen 10; None disables). ``ema_beta``: constant-rate
    EMA of the student, updated after each generator step. GAN: generator weight ``gan_weight_gen``
    (0 = ratio-only mode, the discriminator is still trained), discriminator weight ``gan_weight_disc``
    (FastGen 1, DMD2 1e-2), R1 weight ``r1_gamma``. Discriminator heads on ``disc_features`` of the
    frozen teacher (``disc_placement="teacher"``) or of the fake score (``"fake_score"``, which trains its
    encoder too). Noise levels: uniform indices [``min_index``, ``max_index``] of the 1000-point Karras
    grid for the generator, [``fake_min_index``, ``fake_max_index``] for the critic; real GAN images at an
    independent level unless ``real_same_t``. Ratio and weights: see :class:`FDistillWeighting`.
    ``student_sigma``: the student maps ``student_sigma * z`` at that noise level (80, as DMD2).
    ``accum_steps`` splits each batch into micro-batches (gradient accumulation). ``compile_norms`` (speed only, the
    same maths up to rounding) runs each U-Net GroupNorm with its scale/shift and SiLU as ``torch.compile``d fused
    kernels (:func:`~fdistill_lab.networks.layers.use_compiled_norms`); the first iterations compile.
    """

    divergence: str = "js"
    schedule: str = "fastgen"
    student_update_freq: int = 5
    lr_student: float = 1e-4
    lr_fake: float = 1e-4
    lr_disc: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    grad_clip: float | None = 10.0
    critic_grad_clip: float | None = None
    ema_beta: float = 0.999
    gan_weight_gen: float = 1e-3
    gan_weight_disc: float = 1.0
    r1_gamma: float = 0.0
    disc_placement: str = "teacher"
    disc_features: tuple[str, ...] = ("bottleneck",)
    disc_hidden: int | None = None
    min_index: int = 2
    max_index: int = 998
    fake_min_index: int = 2
    fake_max_index: int = 998
    num_grid: int = 1000
    real_same_t: bool = False
    fake_score_weighting: str = "none"
    logit_clip: float | None = 10.0
    ratio_min: float | None = 0.1
    ratio_max: float | None = 20.0
    normalize_ratio: bool = True
    normalize_weight: bool = True
    num_bins: int = 10
    bin_ema: float = 0.0
    bin_spacing: str = "linear"
    dmd_normalize: bool = True
    student_sigma: float = SIGMA_MAX
    generator_labels: str = "real"
    precision: str = "fp32"
    compile_norms: bool = False
    accum_steps: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.disc_features = (self.disc_features,) if isinstance(self.disc_features, str) else tuple(
            self.disc_features)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad setting and its valid values."""
        self.divergence = divergences.canonical_name(self.divergence)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("disc_placement", self.disc_placement, DISC_PLACEMENTS)
        _choice("generator_labels", self.generator_labels, GENERATOR_LABELS)
        _choice("precision", self.precision, PRECISIONS)
        for f in dataclasses.fields(self):  # every switch (annotated bool) is a real bool
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be True or False; got {getattr(self, f.name)!r}")
        _choice("bin_spacing", self.bin_spacing, BIN_SPACINGS)
        _choice("fake_score_weighting", self.fake_score_weighting, FAKE_SCORE_WEIGHTINGS)
        _int_at_least("student_update_freq", self.student_update_freq, 1)
        if self.schedule == "fastgen" and self.student_update_freq < 2:
            raise ValueError("student_update_freq must be >= 2 with schedule='fastgen' (K-1 critic steps per "
                             "generator step; K=1 would never train the critic); use schedule='dmd2' for 1:1")
        _int_at_least("accum_steps", self.accum_steps, 1)
        _int_at_least("num_bins", self.num_bins, 1)
        _int_at_least("num_grid", self.num_grid, 2)
        _int_at_least("seed", self.seed, 0)
        for lo, hi in (("min_index", "max_index"), ("fake_min_index", "fake_max_index")):
            a, b = getattr(self, lo), getattr(self, hi)
            if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b < self.num_grid):
                raise ValueError(f"need integers 0 <= {lo} <= {hi} < num_grid={self.num_grid}; got {a}, {b}")
        for name in ("lr_student", "lr_fake", "lr_disc", "student_sigma", "gan_weight_disc"):
            _positive(name, getattr(self, name))
        for name in ("weight_decay", "gan_weight_gen", "r1_gamma"):
            _non_negative(name, getattr(self, name))
        _positive("adam_eps", self.adam_eps)
        for name in ("grad_clip", "critic_grad_clip", "logit_clip"):
            v = getattr(self, name)
            if v is not None:
                _positive(name, v)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {self.betas}")
        if not 0.0 <= self.ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1); got {self.ema_beta}")
        if not 0.0 <= self.bin_ema < 1.0:
            raise ValueError(f"bin_ema must be in [0, 1); got {self.bin_ema}")
        if (self.ratio_min is not None and self.ratio_max is not None
                and not 0.0 < self.ratio_min < self.ratio_max):
            raise ValueError(f"need 0 < ratio_min < ratio_max; got {self.ratio_min}, {self.ratio_max}")
        if not self.disc_features or not all(isinstance(k, str) and k for k in self.disc_features):
            raise ValueError(f"disc_features must be a non-empty list of feature names such as 'bottleneck' "
                             f"or '8x8'; got {self.disc_features!r}")
        if self.disc_hidden is not None:
            _int_at_least("disc_hidden", self.disc_hidden, 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"], d["disc_features"] = list(self.betas), list(self.disc_features)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        """Build from a dict; unknown keys raise ValueError listing the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown DistillConfig setting(s) {unknown}; valid: {', '.join(valid)}")
        return cls(**d)

    def replace(self, **changes: Any) -> DistillConfig:
        """A copy with some settings changed (validated; unknown names raise ValueError)."""
        return DistillConfig.from_dict({**self.to_dict(), **changes})


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {valid}; got {value!r}")


def _int_at_least(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


@contextlib.contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients into the parameters of ``modules`` (inputs can still get gradients)."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _freeze_unfed_inputs(net: nn.Module) -> None:
    """Freeze the augment-label mapping of EDM's networks (CIFAR-10's have ``augment_dim`` 9): distillation
    never passes augment labels, so no gradient reaches it, and DDP stops a run over a parameter that gets
    none ("Expected to have finished reduction in the prior iteration")."""
    mapping = getattr(getattr(net, "model", None), "map_augment", None)
    if mapping is not None:
        mapping.requires_grad_(False)


def _local_grads_unless(last: bool, *wrapped: nn.Module) -> contextlib.ExitStack:
    """Gradient accumulation under DDP: keep the gradients of all but the last micro-batch local
    (``no_sync``), so each step all-reduces them once instead of once per micro-batch."""
    stack = contextlib.ExitStack()
    if not last:
        for net in wrapped:
            if hasattr(net, "no_sync"):
                stack.enter_context(net.no_sync())
    return stack


def _grad_norm(params: Iterable[nn.Parameter], device: torch.device) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros((), device=device)


class FDistillTrainer:
    """f-distill training of a one-step student from a frozen teacher (sections 6-9).

    ``teacher``: EDMPrecond-like denoiser (frozen here). ``student`` / ``fake_score`` default to copies
    of it. ``wrap`` (optional) wraps the trainable networks for the forward passes (DDP). Use
    :meth:`step` with one real batch per iteration, :meth:`sample` for images, and
    :meth:`save_checkpoint` / :meth:`load_checkpoint` (atomic) to resume exactly.
    """

    noise_generator: torch.Generator | None = None  # a device generator for latents and noise (data-parallel)

    def __init__(
        self,
        teacher: nn.Module,
        config: DistillConfig | None = None,
        device: torch.device | str | None = None,
        student: nn.Module | None = None,
        fake_score: nn.Module | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        rng_offset: int = 0,
    ) -> None:
        self.config = cfg = config if config is not None else DistillConfig()
        if not isinstance(cfg, DistillConfig):
            raise TypeError(f"config must be a DistillConfig; got {type(cfg).__name__}")
        for attr in ("img_resolution", "img_channels", "label_dim"):
            if not hasattr(teacher, attr):
                raise TypeError(f"teacher lacks attribute {attr!r}: it must follow the EDMPrecond interface")
        self.device = torch.device(device) if device is not None else next(teacher.parameters()).device
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.student = (student if student is not None else copy.deepcopy(teacher)).to(self.device).train()
        self.fake_score = (fake_score if fake_score is not None else copy.deepcopy(teacher)).to(self.device).train()
        for net in (self.student, self.fake_score):
            net.requires_grad_(True)
            _freeze_unfed_inputs(net)
        self.student_ema = copy.deepcopy(self.student).eval().requires_grad_(False)
        for net in (self.teacher, self.student, self.fake_score, self.student_ema):
            use_compiled_norms(net, cfg.compile_norms)
        feat_net = self.teacher if cfg.disc_placement == "teacher" else self.fake_score
        with torch.random.fork_rng(devices=[]):  # heads initialised from config.seed, not the global RNG state
            torch.default_generator.manual_seed(cfg.seed)  # the CPU stream only: CUDA RNGs are not forked here
            self.disc = Discriminator.for_network(feat_net, cfg.disc_features, cfg.disc_hidden).to(self.device).train()
        self.weighting = FDistillWeighting.from_config(cfg).to(self.device)
        wrap = wrap or (lambda m: m)
        self._student_fwd, self._fake_fwd, self._disc_fwd = wrap(self.student), wrap(self.fake_score), wrap(self.disc)
        adam = dict(betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        self.opt_student = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr_student, **adam)
        self.opt_fake = torch.optim.AdamW(self.fake_score.parameters(), lr=cfg.lr_fake, **adam)
        self.opt_disc = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr_disc, **adam)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rng_offset)
        self.label_dim = int(getattr(teacher, "label_dim", 0))
        self.step_count = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ helpers

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator).to(self.device)

    def _sigma(self, n: int, lo: int, hi: int) -> torch.Tensor:
        s = sample_sigma_grid(n, lo, hi, self.config.num_grid, generator=self.generator)
        return s.to(device=self.device, dtype=torch.float32)

    def _shape(self, n: int) -> tuple[int, int, int, int]:
        return (n, self.teacher.img_channels, self.teacher.img_resolution, self.teacher.img_resolution)

    def _labels(self, real_labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Generator labels: the real batch's (FastGen) or uniform random (DMD2); None if unconditional."""
        if self.label_dim == 0:
            return None
        if self.config.generator_labels == "uniform" or real_labels is None:
            return torch.randint(0, self.label_dim, (n,), generator=self.generator).to(self.device)
        return real_labels.to(self.device)

    def _generate(self, n: int, labels: torch.Tensor | None, net: nn.Module | None = None) -> torch.Tensor:
        z = self._randn(*self._shape(n))
        s = self.config.student_sigma
        with self._autocast():
            x = (net or self._student_fwd)(z * s, torch.full((n,), s, device=self.device), labels)
        return x.float()

    def _features(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                  decoder: str = "grad") -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(x0, features) of ``net``. ``decoder`` "no_grad" (x0 is only used detached) or "skip" (x0 unused)
        saves the decoder's memory or work on EDM networks; other networks run whole (same results)."""
        kwargs = {"decoder": decoder} if decoder != "grad" and isinstance(net, EDMPrecond) else {}
        with self._autocast():
            x0, feats = net(x, sigma, labels, return_features=True, **kwargs)
        return (x0.float() if x0 is not None else None), feats

    def _denoise(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None
                 ) -> torch.Tensor:
        with self._autocast():
            return net(x, sigma, labels).float()

    def _logits(self, feats: dict[str, torch.Tensor], disc: nn.Module | None = None) -> torch.Tensor:
        with self._autocast():
            return (disc or self._disc_fwd)(feats).float()

    def _micro_batches(self, images: torch.Tensor, labels: torch.Tensor | None
                       ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        k = self.config.accum_steps
        if images.shape[0] % k:
            raise ValueError(f"batch size {images.shape[0]} is not divisible by accum_steps={k}")
        if labels is not None and labels.shape[0] != images.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
        if self.label_dim and labels is None:
            raise ValueError("the teacher is class-conditional: pass labels with the real batch")
        imgs = images.to(self.device, torch.float32).chunk(k)
        labs = labels.to(self.device).chunk(k) if labels is not None else (None,) * k
        return list(zip(imgs, labs))

    # ------------------------------------------------------------------ losses

    def _generator_loss(self, real_labels: torch.Tensor | None, n: int,
                        weights: tuple[torch.Tensor, Scalars] | None = None) -> tuple[torch.Tensor, Scalars]:
        """Section 6: x = G(80 z); x_t = x + sigma eps; g = h_norm (x0_fake - x0_teacher) / mean|x - x0_teacher|.

        ``weights``: (h_norm of these n samples, weight statistics) computed beforehand over the whole batch
        (:meth:`_batch_weights`); None computes them here from this batch's logits."""
        cfg = self.config
        labels, x, sigma, x_t = self._generator_inputs(real_labels, n)
        use_gan = cfg.gan_weight_gen > 0
        # fake score and heads are frozen here and called unwrapped: no parameter gradients (DDP-safe)
        if cfg.disc_placement == "teacher":
            with torch.no_grad():
                x0_fake = self._denoise(self.fake_score, x_t, sigma, labels)
            with torch.set_grad_enabled(use_gan):
                x0_teacher, feats = self._features(self.teacher, x_t if use_gan else x_t.detach(), sigma, labels,
                                                   decoder="no_grad")
                logits = self._logits(feats, self.disc)
        else:
            with torch.no_grad():
                x0_teacher = self._denoise(self.teacher, x_t, sigma, labels)
            with torch.set_grad_enabled(use_gan):
                x0_fake, feats = self._features(self.fake_score, x_t if use_gan else x_t.detach(), sigma, labels,
                                                decoder="no_grad")
                logits = self._logits(feats, self.disc)
        if weights is None:
            h, wstats = self.weighting(logits.detach(), sigma, update=True)
            weight_stats = wstats.summary_tensors()
        else:
            h, weight_stats = weights
        loss_f = fdistill_loss(x, x0_fake.detach(), x0_teacher.detach(), h, cfg.dmd_normalize)
        loss_gan = gan_generator_loss(logits) if use_gan else torch.zeros((), device=self.device)
        loss = loss_f + cfg.gan_weight_gen * loss_gan
        stats = {**weight_stats, "loss_f": loss_f.detach(), "loss_gan_g": loss_gan.detach(),
                 "loss_g": loss.detach(), "logit_gen_mean": logits.detach().mean()}
        return loss, stats

    def _generator_inputs(self, real_labels: torch.Tensor | None, n: int
                          ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels, x = G(80 z), sigma, x_t = x + sigma eps) of a generator micro-batch, in this order of draws."""
        labels = self._labels(real_labels, n)
        x = self._generate(n, labels)
        sigma = self._sigma(n, self.config.min_index, self.config.max_index)
        return labels, x, sigma, x + sigma.view(-1, 1, 1, 1) * self._randn(*x.shape)

    @torch.no_grad()
    def _generator_logits(self, real_labels: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and noise levels of one generator micro-batch, with the same draws as :meth:`_generator_loss`
        makes from the same random states (the networks drawing nothing in between: the teacher is in eval mode,
        and the fake score's no-grad denoising comes after the draws that reach the logits)."""
        labels, _, sigma, x_t = self._generator_inputs(real_labels, n)
        net = self.teacher if self.config.disc_placement == "teacher" else self.fake_score
        _, feats = self._features(net, x_t, sigma, labels, decoder="skip")
        return self._logits(feats, self.disc), sigma

    def _rng_states(self) -> list[Any]:
        """States of every random stream a generator micro-batch draws from: the trainer's generator, the
        device noise generator (if any) and the global streams that dropout uses."""
        noise = self.noise_generator
        return [self.generator.get_state(), noise.get_state() if noise is not None else None, torch.get_rng_state(),
                torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None]

    def _set_rng_states(self, states: list[Any]) -> None:
        gen, noise, cpu, cuda = states
        self.generator.set_state(gen)
        if noise is not None:
            self.noise_generator.set_state(noise)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def _batch_weights(self, chunks: list[tuple[torch.Tensor, torch.Tensor | None]]
                       ) -> tuple[list[list[Any]], list[tuple[torch.Tensor, Scalars]]]:
        """Both normalisation stages over the whole batch when it is split into micro-batches (section 5): a
        first, gradient-free pass gives every micro-batch's logits, the weighting runs once on all of them (one
        bin update, one batch mean), and the random states are kept so the gradient pass replays the same draws.
        Returns (random states before each micro-batch, (h, statistics) of each micro-batch)."""
        states, logits, sigmas = [], [], []
        for imgs, labs in chunks:
            states.append(self._rng_states())
            lg, sg = self._generator_logits(labs, imgs.shape[0])
            logits.append(lg)
            sigmas.append(sg)
        h, wstats = self.weighting(torch.cat(logits), torch.cat(sigmas), update=True)
        summary = wstats.summary_tensors()
        return states, [(part, summary) for part in h.split([lg.shape[0] for lg in logits])]

    def _critic_loss(self, real: torch.Tensor, real_labels: torch.Tensor | None) -> tuple[torch.Tensor, Scalars]:
        """Sections 7-8: fake-score DSM on detached student samples + discriminator loss (real positive)."""
        cfg = self.config
        n = real.shape[0]
        labels = self._labels(real_labels, n)
        with torch.no_grad():
            x_fake = self._generate(n, labels, self.student)
        sigma = self._sigma(n, cfg.fake_min_index, cfg.fake_max_index)
        eps = self._randn(*x_fake.shape)
        x_t = x_fake + sigma.view(-1, 1, 1, 1) * eps
        if cfg.real_same_t:
            sigma_r, eps_r = sigma, eps
        else:
            sigma_r = self._sigma(n, cfg.fake_min_index, cfg.fake_max_index)
            eps_r = self._randn(*real.shape)
        x_r = real + sigma_r.view(-1, 1, 1, 1) * eps_r
        use_r1 = cfg.r1_gamma > 0
        if use_r1:
            x_r = x_r.detach().requires_grad_(True)
        # fake and real go through each network in one batched call (one forward per backward: DDP-safe)
        both_x, both_sigma = torch.cat([x_t, x_r]), torch.cat([sigma, sigma_r])
        both_labels = torch.cat([labels, real_labels.to(self.device)]) if labels is not None else None
        # R1 differentiates the discriminator's input gradient: attention without the fused kernels
        twice = twice_differentiable() if use_r1 else contextlib.nullcontext()
        if cfg.disc_placement == "teacher":
            x0_pred = self._denoise(self._fake_fwd, x_t, sigma, labels)
            with torch.set_grad_enabled(use_r1), twice:
                _, feats = self._features(self.teacher, both_x, both_sigma, both_labels, decoder="skip")
            if not use_r1:
                feats = {k: v.detach() for k, v in feats.items()}
        else:
            with twice:
                x0_both, feats = self._features(self._fake_fwd, both_x, both_sigma, both_labels)
            x0_pred = x0_both[:n]
        loss_dsm = denoising_loss(x0_pred, x_fake, sigma, cfg.fake_score_weighting)
        logits_fake, logits_real = self._logits(feats).split([n, n])
        loss_d = gan_discriminator_loss(logits_real, logits_fake)
        loss = loss_dsm + cfg.gan_weight_disc * loss_d
        r1 = r1_penalty(logits_real, x_r) if use_r1 else None
        if r1 is not None:
            loss = loss + 0.5 * cfg.r1_gamma * r1
        lr_, lf_ = logits_real.detach(), logits_fake.detach()
        stats = {"loss_dsm": loss_dsm.detach(), "loss_d": loss_d.detach(), "logit_real_mean": lr_.mean(),
                 "logit_fake_mean": lf_.mean(), "disc_acc": 0.5 * ((lr_ > 0).float().mean() + (lf_ < 0).float().mean())}
        if r1 is not None:
            stats["r1"] = r1.detach()
        stats["loss_critic"] = loss.detach()
        return loss, stats

    # ------------------------------------------------------------------ steps

    def generator_step(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """One student update (accumulated over micro-batches), gradient clip, AdamW step, EMA update.
        ``images`` only sets the batch size; ``labels`` are the generator's labels when
        ``generator_labels="real"``."""
        cfg = self.config
        self.opt_student.zero_grad(set_to_none=True)
        logs: list[Scalars] = []
        chunks = self._micro_batches(images, labels)
        with _frozen(self.fake_score, self.disc):
            # with micro-batches, the weights are normalised over the whole batch first (not per micro-batch)
            states, weights = self._batch_weights(chunks) if len(chunks) > 1 else ([], [])
            for i, (imgs, labs) in enumerate(chunks):
                if states:
                    self._set_rng_states(states[i])
                with _local_grads_unless(i == len(chunks) - 1, self._student_fwd):
                    loss, stats = self._generator_loss(labs, imgs.shape[0], weights[i] if weights else None)
                    (loss / cfg.accum_steps).backward()
                logs.append(stats)
        params = list(self.student.parameters())
        if cfg.grad_clip is not None:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = _grad_norm(params, self.device)
        self.opt_student.step()
        self._update_ema()
        return _read_logs(logs, grad_norm_student=gnorm)

    def critic_step(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """One update of the fake score (DSM) and the discriminator heads (GAN D loss) on a real batch."""
        cfg = self.config
        self.opt_fake.zero_grad(set_to_none=True)
        self.opt_disc.zero_grad(set_to_none=True)
        logs: list[Scalars] = []
        chunks = self._micro_batches(images, labels)
        for i, (imgs, labs) in enumerate(chunks):
            with _local_grads_unless(i == len(chunks) - 1, self._fake_fwd, self._disc_fwd):
                loss, stats = self._critic_loss(imgs, labs)
                (loss / cfg.accum_steps).backward()
            logs.append(stats)
        params = list(self.fake_score.parameters()) + list(self.disc.parameters())
        if cfg.critic_grad_clip is not None:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.critic_grad_clip)
        else:
            gnorm = _grad_norm(params, self.device)
        self.opt_fake.step()
        self.opt_disc.step()
        return _read_logs(logs, grad_norm_critic=gnorm)

    def is_generator_iteration(self, i: int | None = None) -> bool:
        """Whether iteration ``i`` (default: the next) updates the student: i % K == 0."""
        i = self.step_count if i is None else i
        return i % self.config.student_update_freq == 0

    def step(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """One iteration of the schedule on one real batch; returns (and appends to ``history``) its logs."""
        t0 = time.perf_counter()
        gen = self.is_generator_iteration()
        logs: dict[str, float] = {"step": float(self.step_count), "generator_step": float(gen)}
        if gen:
            logs.update(self.generator_step(images, labels))
        if not gen or self.config.schedule == "dmd2":
            logs.update(self.critic_step(images, labels))
        self.step_count += 1
        dt = time.perf_counter() - t0
        logs["time_s"] = dt
        logs["images_per_s"] = images.shape[0] / max(dt, 1e-9)
        self.history.append(logs)
        return logs

    @torch.no_grad()
    def _update_ema(self) -> None:
        beta = self.config.ema_beta
        for p_ema, p in zip(self.student_ema.parameters(), self.student.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.student_ema.buffers(), self.student.buffers()):
            b_ema.copy_(b)

    @torch.no_grad()
    def sample(self, n: int | None = None, labels: torch.Tensor | None = None, z: torch.Tensor | None = None,
               use_ema: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """One-step samples G(80 z; 80, y). Uses its own ``generator`` (not the training stream); latents and
        labels are drawn on its device."""
        on = generator.device if generator is not None else torch.device("cpu")
        if z is None:
            if n is None:
                n = labels.shape[0] if labels is not None else None
            if n is None:
                raise ValueError("pass n, labels or z")
            z = torch.randn(*self._shape(n), generator=generator, device=on)
        n = z.shape[0]
        if labels is None and self.label_dim:
            labels = torch.randint(0, self.label_dim, (n,), generator=generator, device=on)
        net = self.student_ema if use_ema else self.student
        s = self.config.student_sigma
        z = z.to(self.device)
        with self._autocast():
            x = net(z * s, torch.full((n,), s, device=self.device), labels.to(self.device) if labels is not None
                    else None)
        return x.float()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume (the teacher is not included: it is frozen)."""
        return {
            "format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "step": self.step_count,
            "student": self.student.state_dict(), "student_ema": self.student_ema.state_dict(),
            "fake_score": self.fake_score.state_dict(), "disc": self.disc.state_dict(),
            "weighting": self.weighting.state_dict(), "opt_student": self.opt_student.state_dict(),
            "opt_fake": self.opt_fake.state_dict(), "opt_disc": self.opt_disc.state_dict(),
            "rng": self.generator.get_state(), "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a checkpoint of another configuration raises ValueError."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not an f-distill trainer state (format {state.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT!r})")
        mine = self.config.to_dict()
        diff = {k: (state["config"].get(k), v) for k, v in mine.items()
                if k not in SPEED_ONLY_SETTINGS and state["config"].get(k) != v}
        if diff:
            raise ValueError("checkpoint was written with another configuration (setting: (checkpoint, "
                             f"current)): {diff}")
        self.student.load_state_dict(state["student"])
        self.student_ema.load_state_dict(state["student_ema"])
        self.fake_score.load_state_dict(state["fake_score"])
        self.disc.load_state_dict(state["disc"])
        self.weighting.load_state_dict(state["weighting"])
        self.opt_student.load_state_dict(state["opt_student"])
        self.opt_fake.load_state_dict(state["opt_fake"])
        self.opt_disc.load_state_dict(state["opt_disc"])
        self.generator.set_state(state["rng"])
        self.step_count = int(state["step"])
        self.history = [dict(h) for h in state.get("history", [])]

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Atomic save (temporary file + os.replace) of :meth:`state_dict` plus ``extra`` (e.g. a data
        sampler's state)."""
        state = self.state_dict()
        if extra:
            state["extra"] = extra
        return atomic_save(state, path)

    def load_checkpoint(self, path: str | Path, fix: str = "delete it to start afresh") -> dict[str, Any]:
        """Load a checkpoint written by :meth:`save_checkpoint`; returns its ``extra`` dict. ``fix``: what the
        error for an unreadable file tells the user to do."""
        state = load_file(path, "f-distill trainer checkpoint", fix,
                          required_keys=("format", "config", "step", "student"),
                          mmap=self.device.type == "cuda")  # GPU ranks share one mapped copy in host memory
        self.load_state_dict(state)
        return state.get("extra", {})

    WEIGHT_KEYS = ("student", "student_ema", "fake_score", "disc", "weighting")

    def load_weights(self, path: str | Path) -> dict[str, Any]:
        """Start from another run's networks: load the student, its EMA, the fake score, the discriminator and
        the ratio-bin state of a checkpoint written by :meth:`save_checkpoint`, whatever settings wrote it.
        Optimiser states, the step counter and the RNG stay fresh. This is a fine-tuning stage, such as the
        paper's ImageNet-64 stage at lr 5e-7 (Table 5), or DMD2's restart of its best no-GAN run with the GAN
        on. Returns the checkpoint (its ``config``, ``step`` and ``extra``). The networks must have the same
        shapes (the same teacher, discriminator and bin settings); if not, ValueError names the part that differs.
        """
        state = load_file(path, "f-distill trainer checkpoint", "init_from takes a trainer checkpoint "
                          "(<run>/checkpoints/ckpt_*.pt) or a run folder, not an exported student",
                          required_keys=("format", "config", "step", *self.WEIGHT_KEYS),
                          mmap=self.device.type == "cuda")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an f-distill trainer checkpoint (format {state.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT!r})")
        for key in self.WEIGHT_KEYS:
            try:
                getattr(self, key).load_state_dict(state[key])
            except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
                raise ValueError(
                    f"{path}: its {key} does not fit this run ({str(exc).splitlines()[0][:300]}...); the "
                    "teacher and the discriminator and bin settings must be those of the run that wrote it") from None
        return state


def _read_logs(logs: list[Scalars], **extra: torch.Tensor) -> dict[str, float]:
    """Micro-batch means of the logged scalars, plus ``extra``, as floats read back from the device in one
    transfer (a float() per value would make the host wait for a GPU a dozen times per iteration)."""
    keys = list(logs[0])
    values = [d[k] for d in logs for k in keys] + list(extra.values())
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in values))
    flat = torch.stack([v.detach().to(dtype) for v in values]).tolist()
    n = len(keys)
    out = {k: sum(flat[j * n + i] for j in range(len(logs))) / len(logs) for i, k in enumerate(keys)}
    return {**out, **dict(zip(extra, flat[n * len(logs):]))}


def fit(
    trainer: FDistillTrainer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    steps: int,
    progress: bool = True,
    desc: str = "f-distill",
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Run ``steps`` iterations from ``batches`` with a tqdm.auto progress bar; returns their logs."""
    from tqdm.auto import tqdm

    _int_at_least("steps", steps, 0)
    it = iter(batches)
    logs = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=True)
    for _ in bar:
        images, labels = next(it)
        out = trainer.step(images, labels)
        logs.append(out)
        if callback is not None:
            callback(trainer.step_count, out)
        if "loss_f" in out:
            bar.set_postfix(loss_f=f"{out['loss_f']:.3g}", ratio=f"{out['ratio_mean']:.2f}", refresh=False)
    return logs
