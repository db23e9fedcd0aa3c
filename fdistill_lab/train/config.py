"""Settings of the image trainer (:class:`DistillConfig`), validated with errors that name the setting and its
valid values. The weighting settings are the method's :class:`~fdistill_lab.method.WeightingConfig`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Self

from .. import divergences
from ..edm import SIGMA_MAX
from ..losses import FAKE_SCORE_WEIGHTINGS, GAN_HEAD_LOSSES
from ..method import SCHEDULES, WeightingConfig
from .speed import COMPILE_MODES

DISC_PLACEMENTS = ("teacher", "fake_score")
GENERATOR_LABELS = ("real", "uniform")
PRECISIONS = ("fp32", "bf16")
BIN_SPACINGS = ("linear", "log")
# settings that change speed, not results: a resumed run may change them (and older checkpoints lack them)
# (accum_steps follows per_gpu_batch: the weights are normalised over the whole batch either way, but the random
# draws come in other micro-batches, so a resumed run is statistically, not bitwise, the one it continues)
SPEED_ONLY_SETTINGS = ("compile_norms", "accum_steps", "compile", "cuda_graphs", "channels_last", "fused_optimizer",
                       "fold_biases")
# settings added after runs were recorded without them: the value that reproduces how those runs trained (not the
# default), so that resuming such a run with a new default is refused rather than silently changing the maths
LEGACY_VALUES: dict[str, Any] = {"gan_head_loss": "mean_logit"}


@dataclass
class DistillConfig(WeightingConfig):
    """Every setting of the image trainer (paper Table 5 / FastGen defaults where they exist).

    Schedule (:func:`~fdistill_lab.method.iteration_updates`): ``schedule``, K = ``student_update_freq`` and
    ``critic_warmup`` critic-only iterations first. Optimisers: AdamW with ``betas``, ``weight_decay`` 0.01, one
    per network (student, fake score, discriminator). The student gradient norm is clipped to ``grad_clip``
    (FastGen 10; None disables). ``ema_beta``: constant-rate EMA of the student, updated after each generator
    step. GAN: generator weight ``gan_weight_gen`` (0 = ratio-only mode, the discriminator is still trained),
    discriminator weight ``gan_weight_disc`` (FastGen 1, DMD2 1e-2), R1 weight ``r1_gamma``. Discriminator heads
    on ``disc_features`` of the frozen teacher (``disc_placement="teacher"``) or of the fake score
    (``"fake_score"``, which trains its encoder too). With several heads (the cifar10 preset: 32, 16, 8),
    ``gan_head_loss="per_head"`` applies the GAN losses to each head's logit and averages them (FastGen),
    ``"mean_logit"`` to the heads' mean logit (earlier versions of this project; run records without the setting
    count as ``"mean_logit"``); the ratio and R1 always use the mean logit, and with one head both are the same.
    Noise levels: uniform indices [``min_index``, ``max_index``] of the 1000-point Karras grid for the generator,
    [``fake_min_index``, ``fake_max_index``] for the critic; real GAN images at an independent level unless
    ``real_same_t``. The weight h: the inherited :class:`~fdistill_lab.method.WeightingConfig` settings.
    ``student_sigma``: the student maps ``student_sigma * z`` at that noise level (80, as DMD2). ``accum_steps``
    splits each batch into micro-batches (gradient accumulation). ``compile_norms`` (speed only, the same maths up
    to rounding) runs each U-Net GroupNorm with its scale/shift and SiLU as ``torch.compile``d fused kernels
    (:func:`~fdistill_lab.networks.layers.use_compiled_norms`); the first iterations compile. The other speed
    settings (:mod:`fdistill_lab.train.speed`, the same maths up to rounding): ``compile`` "none" / "networks" /
    "steps" (torch.compile of each network call, or of each micro-batch's whole forward computation),
    ``cuda_graphs`` (the compiled graphs replayed as CUDA graphs), ``channels_last``, ``fused_optimizer`` (AdamW
    ``fused=True``) and ``fold_biases`` (convolution biases added inside the convolution).
    """

    schedule: str = "fastgen"
    student_update_freq: int = 5
    critic_warmup: int = 0
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
    gan_head_loss: str = "per_head"
    min_index: int = 2
    max_index: int = 998
    fake_min_index: int = 2
    fake_max_index: int = 998
    num_grid: int = 1000
    real_same_t: bool = False
    fake_score_weighting: str = "none"
    dmd_normalize: bool = True
    student_sigma: float = SIGMA_MAX
    generator_labels: str = "real"
    precision: str = "fp32"
    compile_norms: bool = False
    compile: str = "none"
    cuda_graphs: bool = False
    channels_last: bool = False
    fused_optimizer: bool = False
    fold_biases: bool = False
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
        _choice("gan_head_loss", self.gan_head_loss, GAN_HEAD_LOSSES)
        _choice("compile", self.compile, COMPILE_MODES)
        self._check_speed_settings()
        _int_at_least("student_update_freq", self.student_update_freq, 1)
        if self.schedule != "dmd2" and self.student_update_freq < 2:
            raise ValueError(f"student_update_freq must be >= 2 with schedule={self.schedule!r} (K-1 critic steps per "
                             "generator step; K=1 would never train the critic); use schedule='dmd2' for 1:1")
        _int_at_least("critic_warmup", self.critic_warmup, 0)
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

    def _check_speed_settings(self) -> None:
        if self.cuda_graphs and self.compile == "none":
            raise ValueError("cuda_graphs=True needs compile='networks' or 'steps' (torch.compile captures the "
                             "graphs); got compile='none'")
        if self.compile != "none" and self.compile_norms:
            raise ValueError(f"compile_norms compiles the norms of eager networks; with compile={self.compile!r} "
                             "they are compiled with the rest: set compile_norms=False")
        if self.compile == "steps" and self.r1_gamma > 0:
            raise ValueError("compile='steps' cannot compile R1's double backward (r1_gamma > 0; torch.compile has "
                             "no double backward): use compile='networks' (the R1 pass then runs eagerly) or "
                             "r1_gamma=0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"], d["disc_features"] = list(self.betas), list(self.disc_features)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Build from a dict; unknown keys raise ValueError listing the valid ones (of this class or a subclass)."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} setting(s) {unknown}; valid: {', '.join(valid)}")
        return cls(**d)

    def replace(self, **changes: Any) -> Self:
        """A copy with some settings changed (validated; unknown names raise ValueError)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def differences(self, recorded: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Settings that change results and differ from ``recorded`` (a :meth:`to_dict` of an earlier run):
        name -> (recorded, mine). A setting that an older run's record lacks counts as the value that older code
        behaved as (:data:`LEGACY_VALUES`), else as its default. ``gan_head_loss`` changes nothing with one
        discriminator head, so it only counts with several (an old several-head run resumes only with
        ``gan_head_loss="mean_logit"``)."""
        old = {**DistillConfig().to_dict(), **LEGACY_VALUES, **recorded}
        ignored = SPEED_ONLY_SETTINGS + (("gan_head_loss",) if len(self.disc_features) == 1 else ())
        return {k: (old[k], v) for k, v in self.to_dict().items() if k not in ignored and old[k] != v}


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
