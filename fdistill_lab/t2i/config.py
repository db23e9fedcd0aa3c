"""Settings of the text-to-image trainer and the ``sd15`` preset (paper Table 5, COYO-700M / SD v1.5 column).

:class:`T2IConfig` is the image trainer's :class:`~fdistill_lab.train.config.DistillConfig` (divergence, ratio
and weight normalisation, schedule, optimisers, GAN) plus what changes for a latent text-to-image teacher: the CFG
weight of the distillation target, the noise-time ranges t in [0, 1] of SD's discrete VP schedule (FastGen draws
t ~ U[0.001, 0.999]), the schedule itself (checked against the pipeline) and gradient checkpointing.
:class:`T2IRunConfig` holds the run's batch, steps, intervals and data settings. Presets: ``sd15`` (Table 5) and
``tiny`` (CPU tests and notebook 06's smoke run); every value can be overridden by name.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from ..edm import SIGMA_MAX
from ..train.config import DistillConfig, _choice, _int_at_least, _positive
from ..train.presets import parse_value
from ..train.rng import RNG_MODES
from .denoiser import PREDICTION_TYPES
from .schedule import BETA_SCHEDULES, VPSchedule

# the EDM trainer's Karras-grid settings: noise levels here come from t_min..t_max instead
_EDM_ONLY = {"min_index": 2, "max_index": 998, "fake_min_index": 2, "fake_max_index": 998, "num_grid": 1000}
T2I_SPEED_ONLY = ("compile_norms", "accum_steps", "gradient_checkpointing")


@dataclass
class T2IConfig(DistillConfig):
    """Every setting of the text-to-image trainer. Inherited ones as in DistillConfig (defaults here: Table 5's
    SD1.5 column); new ones:

    ``guidance_scale``: CFG weight w of the teacher's target x0_u + w (x0_c - x0_u) (Table 5: 1.75; 1 = none).
    ``t_min``/``t_max``: generator (distribution-matching) times, ``fake_t_min``/``fake_t_max``: critic times,
    all uniform in [0, 1] (timestep t (N-1) of the teacher's schedule); ``student_t``: the time the one-step
    student starts from (1: pure noise at SD's last timestep, as DMD2); ``student_sigma`` follows from it.
    ``beta_start``, ``beta_end``, ``beta_schedule``, ``num_train_timesteps``, ``prediction_type``: the teacher's
    schedule (must match the pipeline). ``gradient_checkpointing``: recompute U-Net activations in the backward
    (memory for time; speed only). The ratio bins span the generator's sigma range (``sigma_min``/``sigma_max``).
    """

    divergence: str = "js"
    student_update_freq: int = 10
    lr_student: float = 1e-5
    lr_fake: float = 1e-5
    lr_disc: float = 1e-5
    gan_weight_gen: float = 1e-3
    r1_gamma: float = 1.0
    disc_features: tuple[str, ...] = ("mid",)
    bin_spacing: str = "log"
    precision: str = "bf16"
    guidance_scale: float = 1.75
    t_min: float = 0.001
    t_max: float = 0.999
    fake_t_min: float = 0.001
    fake_t_max: float = 0.999
    student_t: float = 1.0
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)) \
                or not self.guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be a number >= 1 (1 = no guidance); got {self.guidance_scale!r}")
        for lo, hi in (("t_min", "t_max"), ("fake_t_min", "fake_t_max")):
            a, b = getattr(self, lo), getattr(self, hi)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)) \
                    or not 0.0 <= a < b <= 1.0:
                raise ValueError(f"need 0 <= {lo} < {hi} <= 1; got {a!r}, {b!r}")
        if isinstance(self.student_t, bool) or not isinstance(self.student_t, (int, float)) \
                or not 0.0 < self.student_t <= 1.0:
            raise ValueError(f"student_t must be in (0, 1]; got {self.student_t!r}")
        _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _int_at_least("num_train_timesteps", self.num_train_timesteps, 2)
        for name in ("beta_start", "beta_end"):
            _positive(name, getattr(self, name))
        derived = float(self.noise_schedule.sigma_at(self.student_t))
        if self.student_sigma != SIGMA_MAX and not math.isclose(self.student_sigma, derived, rel_tol=1e-9):
            raise ValueError(f"student_sigma follows from student_t here (sigma({self.student_t}) = {derived:.6g}); "
                             f"set student_t in (0, 1] instead of student_sigma={self.student_sigma!r}")
        self.student_sigma = derived
        if self.generator_labels != "real":
            raise ValueError("generator_labels must be 'real' for text-to-image (the generator uses the batch's "
                             f"captions; there are no classes to draw); got {self.generator_labels!r}")
        if self.compile_norms:
            raise ValueError("compile_norms fuses the GroupNorms of this package's EDM networks; the diffusers U-Net "
                             "has none of them, so it would change nothing here: leave it False")
        changed = {k: getattr(self, k) for k, v in _EDM_ONLY.items() if getattr(self, k) != v}
        if changed:
            raise ValueError(f"{sorted(changed)} are the EDM trainer's Karras-grid settings; the text-to-image "
                             "trainer draws noise times from t_min..t_max and fake_t_min..fake_t_max instead")
        super().validate()

    @property
    def noise_schedule(self) -> VPSchedule:
        return VPSchedule(self.beta_start, self.beta_end, self.beta_schedule, self.num_train_timesteps)

    @property
    def sigma_min(self) -> float:  # read by FDistillWeighting.from_config: the range of the ratio bins
        return float(self.noise_schedule.sigma_at(self.t_min))

    @property
    def sigma_max(self) -> float:
        return float(self.noise_schedule.sigma_at(self.t_max))

    def differences(self, recorded: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        old = {**T2IConfig().to_dict(), **recorded}
        ignored = T2I_SPEED_ONLY + (("gan_head_loss",) if len(self.disc_features) == 1 else ())
        return {k: (old[k], v) for k, v in self.to_dict().items() if k not in ignored and old[k] != v}


@dataclass
class T2IRunConfig:
    """Run settings: global ``batch_size`` (all ranks; ``per_gpu_batch`` micro-batches, 0 = no accumulation),
    ``steps`` iterations, ``resolution`` of the real images (pixels; the U-Net's latent size times the VAE
    factor if 0), intervals in iterations (0 = off), ``sample_prompts`` for the grids; every ``fid_every``
    iterations zero-shot FID of the EMA student on the first ``fid_images`` captions of ``fid_ref`` (from
    ``coco-ref``) with the Inception ``fid_detector``, and CLIP score if ``clip_model`` names a CLIP folder (all
    ranks share the work; logged to logs/fid.jsonl); ``keep_checkpoints``,
    ``rng_mode`` (as the EDM trainer's), ``device``, ``cpu_threads`` (0: torch's default)."""

    batch_size: int = 1024
    per_gpu_batch: int = 0
    steps: int = 60_000
    resolution: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    sample_every: int = 1000
    sample_prompts: tuple[str, ...] = ("a photo of a cat", "a red car on a street", "a bowl of fruit on a table",
                                       "a mountain lake at sunrise")
    fid_every: int = 0
    fid_images: int = 5000
    fid_ref: str = ""
    fid_detector: str = ""
    clip_model: str = ""
    keep_checkpoints: int = 2
    num_workers: int = 4
    rng_mode: str = "per_rank"
    device: str = "auto"
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        self.sample_prompts = tuple(self.sample_prompts)
        for name in ("batch_size", "steps", "keep_checkpoints"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("per_gpu_batch", "resolution", "log_every", "ckpt_every", "sample_every", "num_workers",
                     "cpu_threads", "fid_every"):
            _int_at_least(name, getattr(self, name), 0)
        _int_at_least("fid_images", self.fid_images, 2)
        if self.fid_every and not (self.fid_ref and self.fid_detector):
            raise ValueError("fid_every > 0 needs fid_ref (python -m fdistill_lab.t2i coco-ref) and fid_detector "
                             "(inception-2015-12-05.pt); set both, or fid_every=0")
        _choice("rng_mode", self.rng_mode, RNG_MODES)
        _choice("device", self.device, ("auto", "cuda", "cpu"))
        if not self.sample_prompts or not all(isinstance(p, str) for p in self.sample_prompts):
            raise ValueError(f"sample_prompts must be a non-empty list of strings; got {self.sample_prompts!r}")


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # paper Table 5, COYO-700M column: batch 1024, K = 10, GAN 1e-3, lr 1e-5, wd 1e-2, R1 1, CFG 1.75, 60k iterations;
    # JS is the paper's best divergence for SD1.5; ratio clip, bins, EMA-free bins and bf16 as FastGen's SD1.5 config
    "sd15": {"distill": {}, "run": {}},
    "tiny": {"distill": dict(student_update_freq=2, lr_student=1e-4, lr_fake=1e-4, lr_disc=1e-4, ema_beta=0.9,
                             gan_weight_gen=1e-2, r1_gamma=0.0, precision="fp32", disc_features=("mid",)),
             "run": dict(batch_size=4, steps=4, log_every=1, ckpt_every=2, sample_every=2, num_workers=0,
                         rng_mode="shared", device="auto", cpu_threads=1, sample_prompts=("a cat", "a red car"))},
}
ALIASES: dict[str, tuple[str, ...]] = {"lr": ("lr_student", "lr_fake", "lr_disc"), "div": ("divergence",),
                                       "cfg": ("guidance_scale",)}
DISTILL_KEYS = tuple(f.name for f in dataclasses.fields(T2IConfig))
RUN_KEYS = tuple(f.name for f in dataclasses.fields(T2IRunConfig))
assert not set(DISTILL_KEYS) & set(RUN_KEYS)


def valid_keys() -> list[str]:
    return sorted(DISTILL_KEYS + RUN_KEYS + tuple(ALIASES))


def resolve(preset: str = "sd15", overrides: dict[str, Any] | None = None) -> tuple[T2IConfig, T2IRunConfig]:
    """Preset ``preset`` (``sd15`` or ``tiny``) with ``overrides`` (strings from ``--set k=v`` or Python values)
    applied and validated; unknown names, presets and bad values raise ValueError naming the valid choices."""
    if preset not in PRESETS:
        raise ValueError(f"unknown text-to-image preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    p = copy.deepcopy(PRESETS[preset])
    hints = {**typing.get_type_hints(T2IConfig), **typing.get_type_hints(T2IRunConfig)}
    for key, raw in (overrides or {}).items():
        for t in ALIASES.get(key, (key,)):
            if t not in hints:
                raise ValueError(f"unknown setting {key!r}; valid settings: {', '.join(valid_keys())}")
            (p["distill"] if t in DISTILL_KEYS else p["run"])[t] = parse_value(t, raw, hints)
    return T2IConfig.from_dict(p["distill"]), T2IRunConfig(**p["run"])
