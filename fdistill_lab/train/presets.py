"""Training presets (paper Table 5, FastGen and DMD2 settings) and ``key=value`` overrides.

A run is a :class:`~fdistill_lab.train.config.DistillConfig` (the trainer's settings) plus a :class:`RunConfig`
(batch, steps, intervals, FID, data loading). Presets (paper Table 5, FastGen's f-distill configs, DMD2's
ImageNet-64 recipe):

* ``imagenet64``: f-distill JS on EDM ImageNet-64 (Table 5): batch 512, lr 2e-6, GAN weight 3e-3,
  K = 5 (4 critic steps per student step), bin EMA 0.5, 10 bins, ratio clip [0.1, 20], AdamW wd 0.01,
  grad clip 10, EMAs 0.9999 / 0.99995 / 0.9996, discriminator on the frozen teacher's 8x8 bottleneck,
  380k iterations, bf16 networks.
* ``cifar10``: f-distill forward KL on EDM CIFAR-10: batch 2048, lr 1e-4, GAN weight 1e-3, heads at
  32/16/8 (a GAN loss per head, averaged, as FastGen: ``gan_head_loss="per_head"``), R1 gamma 1, 60k iterations.
* ``dmd2``: reverse KL with DMD2's published ImageNet-64 recipe: batch 280, lr 2e-6, GAN 3e-3 (D 1e-2),
  critic every iteration and the generator every 5th, DM loss at indices 20..980, lambda-weighted fake
  score at 0..999, discriminator on the fake score's bottleneck (encoder trained), uniform labels,
  500 warm-up steps, no EMA; FID as DMD2 measures it (truncation, class-balanced labels, one seed set).
  The other presets measure FID with EDM's protocol (rounding, random labels, minimum over 3 seed sets).
* ``tiny``: CPU preset for tests and smoke runs (tiny ADM teacher file, synthetic data).

Every value can be overridden by name (``--set lr_student=1e-5``, ``--set divergence=fkl``); the aliases
``lr`` (all three learning rates) and ``div`` (divergence) are accepted. Unknown keys and badly typed
values raise ValueError naming the key and the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .config import DistillConfig
from .rng import RNG_MODES

FID_QUANTIZE = ("round", "trunc")
FID_LABELS = ("random", "balanced")


@dataclass
class RunConfig:
    """Settings of a training run that are not the trainer's (see :mod:`fdistill_lab.train`).

    ``batch_size`` is the global batch (all ranks, all micro-batches); ``per_gpu_batch`` the micro-batch on
    one device (0: batch_size / world_size, no accumulation); gradient accumulation fills the rest.
    ``steps`` counts iterations (generator or critic steps, as the schedule). Intervals are in iterations;
    0 switches a feature off. ``extra_ema_betas``: EMAs of the student kept besides the trainer's
    ``ema_beta`` (FastGen keeps three). FID uses ``fid_detector`` (TorchScript Inception) and
    ``fid_ref`` (EDM reference .npz) on ``fid_images`` samples of the EMA student per seed set
    (:func:`~fdistill_lab.train.fid.evaluate_fid`): ``fid_labels`` 'random' (one uniform class drawn from
    each sample's seed: EDM, FastGen) or 'balanced' (i mod classes: DMD2); ``fid_seed_sets`` sets, set k with
    seeds ``fid_seed + k * fid_images + i``, the reported FID being the minimum over sets (EDM: 3 sets, seeds
    0-149999). The defaults are EDM's protocol (taken as the paper's, which states none) and apply to every
    evaluation, the periodic ones too, so that the logged FIDs, and the best checkpoint chosen from them, are
    measured like the numbers they are compared with. That triples the FID time (150k one-step samples per
    evaluation, small next to the ``fid_every`` iterations between evaluations); ``fid_seed_sets=1`` makes
    each evaluation a third of the cost, with more seed noise (+-0.05-0.1 FID).
    ``cpu_threads``: torch threads per process (0: torch's default); tiny CPU runs are fastest on one.
    ``npz_label_map``: for downsampled-ImageNet npz data only, the devkit's ``map_clsloc.txt`` (npz labels
    -> EDM's sorted-wnid classes) or ``identity``; a class-conditional teacher refuses npz data without it.
    ``init_from``: a trainer checkpoint, or a run folder (its latest checkpoint), whose networks and ratio bins
    a fresh run starts from, with fresh optimisers at step 0 (a fine-tuning stage, e.g. the paper's
    ImageNet-64 stage at lr 5e-7). Once the run has checkpoints of its own, they win.
    """

    batch_size: int = 512
    per_gpu_batch: int = 0
    steps: int = 380_000
    warmup_steps: int = 0
    extra_ema_betas: tuple[float, ...] = ()
    log_every: int = 10
    ckpt_every: int = 2000
    sample_every: int = 2000
    sample_count: int = 64
    fid_every: int = 20_000
    fid_images: int = 50_000
    fid_batch: int = 128
    fid_detector: str = ""
    fid_ref: str = ""
    fid_quantize: str = "round"
    fid_seed: int = 0
    fid_labels: str = "random"
    fid_seed_sets: int = 3
    num_workers: int = 4
    xflip: bool = False
    npz_label_map: str = ""
    rng_mode: str = "per_rank"
    tf32: bool = True
    device: str = "auto"
    cpu_threads: int = 0
    keep_checkpoints: int = 2
    init_from: str = ""

    def validate(self) -> None:
        """Raise ValueError naming the bad setting."""
        for name in ("batch_size", "steps", "sample_count", "fid_images", "fid_batch", "fid_seed_sets",
                     "keep_checkpoints"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("per_gpu_batch", "warmup_steps", "log_every", "ckpt_every", "sample_every", "fid_every",
                     "fid_seed", "num_workers", "cpu_threads"):
            _int_at_least(name, getattr(self, name), 0)
        if self.fid_images < 2:
            raise ValueError(f"fid_images must be >= 2; got {self.fid_images}")
        if not all(isinstance(b, float) and 0.0 <= b < 1.0 for b in self.extra_ema_betas):
            raise ValueError(f"extra_ema_betas must be numbers in [0, 1); got {self.extra_ema_betas}")
        for name, valid in (("fid_quantize", FID_QUANTIZE), ("fid_labels", FID_LABELS), ("rng_mode", RNG_MODES),
                            ("device", ("auto", "cuda", "cpu"))):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {valid}; got {getattr(self, name)!r}")

    def __post_init__(self) -> None:
        self.extra_ema_betas = tuple(float(b) for b in self.extra_ema_betas)
        self.validate()


def _int_at_least(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}")


@dataclass
class Preset:
    """A named recipe: trainer settings, run settings, and what to download for it."""

    name: str
    description: str
    distill: dict[str, Any]
    run: dict[str, Any]
    teacher_hint: str = ""
    data_hint: str = ""
    paper_fid: dict[str, float] = field(default_factory=dict)


_FASTGEN = dict(schedule="fastgen", student_update_freq=5, betas=(0.9, 0.999), weight_decay=0.01, adam_eps=1e-8,
                grad_clip=10.0, critic_grad_clip=None, gan_weight_disc=1.0, disc_placement="teacher",
                min_index=2, max_index=998, fake_min_index=2, fake_max_index=998, real_same_t=False,
                fake_score_weighting="none", logit_clip=10.0, ratio_min=0.1, ratio_max=20.0, normalize_ratio=True,
                normalize_weight=True, num_bins=10, bin_spacing="linear", dmd_normalize=True, student_sigma=80.0,
                generator_labels="real", precision="bf16")
_EDM_TEACHER = "python -m fdistill_lab.download {group} --root downloads/edm (see docs/imagenet64_training.md)"

PRESETS: dict[str, Preset] = {
    "imagenet64": Preset(
        "imagenet64", "f-distill JS, EDM ImageNet-64 teacher (paper Table 5, FastGen config_f_distill_in64)",
        distill=dict(_FASTGEN, divergence="js", lr_student=2e-6, lr_fake=2e-6, lr_disc=2e-6, ema_beta=0.9999,
                     gan_weight_gen=3e-3, r1_gamma=0.0, disc_features=("bottleneck",), bin_ema=0.5),
        run=dict(batch_size=512, per_gpu_batch=64, steps=380_000, extra_ema_betas=(0.99995, 0.9996), log_every=10,
                 ckpt_every=2000, sample_every=2000, fid_every=20_000, fid_images=50_000),
        teacher_hint=_EDM_TEACHER.format(group="imagenet64") + " -> downloads/edm/edm-imagenet-64x64-cond-adm.pkl",
        data_hint="python -m fdistill_lab.train.prepare_imagenet --source <ILSVRC train folder> "
                  "--dest datasets/imagenet-64x64.zip (see docs/edm_data_and_fid.md)",
        paper_fid={"f-distill JS (paper)": 1.16, "DMD2 reverse KL (paper)": 1.27, "FastGen f-distill JS": 1.11}),
    "cifar10": Preset(
        "cifar10", "f-distill forward KL, EDM CIFAR-10 cond teacher (paper Table 5)",
        distill=dict(_FASTGEN, divergence="fkl", lr_student=1e-4, lr_fake=1e-4, lr_disc=1e-4, ema_beta=0.9999,
                     gan_weight_gen=1e-3, r1_gamma=1.0, disc_features=("32x32", "16x16", "8x8"), bin_ema=0.0),
        run=dict(batch_size=2048, per_gpu_batch=256, steps=60_000, extra_ema_betas=(0.99995, 0.9996), log_every=10,
                 ckpt_every=2000, sample_every=2000, fid_every=5000, fid_images=50_000),
        teacher_hint=_EDM_TEACHER.format(group="cifar10") + " -> downloads/edm/edm-cifar10-32x32-cond-vp.pkl",
        data_hint="EDM's CIFAR-10 zip (cifar10-32x32.zip, see docs/edm_data_and_fid.md section 3)",
        paper_fid={"f-distill forward KL (paper)": 1.92, "DMD2 reverse KL (paper)": 2.13}),
    "dmd2": Preset(
        "dmd2", "reverse KL with DMD2's published ImageNet-64 recipe (tianweiy/DMD2, GAN from scratch)",
        distill=dict(_FASTGEN, divergence="rkl", schedule="dmd2", lr_student=2e-6, lr_fake=2e-6, lr_disc=2e-6,
                     ema_beta=0.0, gan_weight_gen=3e-3, gan_weight_disc=1e-2, r1_gamma=0.0, critic_grad_clip=10.0,
                     disc_placement="fake_score", disc_features=("bottleneck",), min_index=20, max_index=980,
                     fake_min_index=0, fake_max_index=999, fake_score_weighting="edm", bin_ema=0.0,
                     generator_labels="uniform"),
        run=dict(batch_size=280, per_gpu_batch=0, steps=200_000, warmup_steps=500, extra_ema_betas=(), log_every=10,
                 ckpt_every=2000, sample_every=2000, fid_every=20_000, fid_images=50_000, fid_quantize="trunc",
                 fid_labels="balanced", fid_seed_sets=1),
        teacher_hint=_EDM_TEACHER.format(group="imagenet64") + " -> downloads/edm/edm-imagenet-64x64-cond-adm.pkl",
        data_hint="python -m fdistill_lab.train.prepare_imagenet --source <ILSVRC train folder> "
                  "--dest datasets/imagenet-64x64.zip",
        paper_fid={"DMD2 (its paper, two-stage)": 1.28, "DMD2 GAN from scratch (its paper)": 1.51}),
    "tiny": Preset(
        "tiny", "CPU preset for tests and smoke runs: tiny ADM teacher file and synthetic data",
        distill=dict(_FASTGEN, divergence="js", student_update_freq=2, lr_student=1e-4, lr_fake=1e-4, lr_disc=1e-4,
                     ema_beta=0.9, gan_weight_gen=1e-2, r1_gamma=0.0, disc_features=("bottleneck",), bin_ema=0.5,
                     precision="fp32"),
        run=dict(batch_size=8, per_gpu_batch=0, steps=6, extra_ema_betas=(0.5,), log_every=1, ckpt_every=3,
                 sample_every=3, sample_count=16, fid_every=3, fid_images=32, fid_batch=16, num_workers=0,
                 rng_mode="shared", tf32=False, cpu_threads=1, keep_checkpoints=2),
        teacher_hint="fdistill_lab.train.smoke_assets.make_smoke_assets(folder) writes a tiny random teacher",
        data_hint="fdistill_lab.train.smoke_assets.make_smoke_assets(folder) writes a tiny EDM-format zip"),
}

ALIASES: dict[str, tuple[str, ...]] = {"lr": ("lr_student", "lr_fake", "lr_disc"), "div": ("divergence",)}
DISTILL_KEYS = tuple(f.name for f in dataclasses.fields(DistillConfig))
RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig))
assert not set(DISTILL_KEYS) & set(RUN_KEYS), "DistillConfig and RunConfig settings must have distinct names"


def valid_keys() -> list[str]:
    """Every overridable name (trainer settings, run settings, aliases)."""
    return sorted(DISTILL_KEYS + RUN_KEYS + tuple(ALIASES))


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (a deep copy); unknown names raise ValueError listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(DistillConfig)
    hints.update(typing.get_type_hints(RunConfig))
    return hints


def _parse_scalar(key: str, raw: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.strip().lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"setting {key!r} must be a bool (true/false); got {raw!r}")
    if typ is int:
        if isinstance(raw, bool) or isinstance(raw, float):
            raise ValueError(f"setting {key!r} must be an integer; got {raw!r}")
        try:
            return int(str(raw).replace("_", "")) if isinstance(raw, str) else int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"setting {key!r} must be an integer; got {raw!r}") from None
    if typ is float:
        if isinstance(raw, bool):
            raise ValueError(f"setting {key!r} must be a number; got {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"setting {key!r} must be a number; got {raw!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"setting {key!r} must be finite; got {raw!r}")
        return value
    if typ is str:
        if not isinstance(raw, str):
            raise ValueError(f"setting {key!r} must be a string; got {raw!r}")
        return raw
    raise TypeError(f"unsupported setting type {typ} for {key!r}")  # pragma: no cover


def parse_value(key: str, raw: Any, hints: dict[str, Any] | None = None) -> Any:
    """Convert ``raw`` (a command-line string or a Python value) to the type of setting ``key``.

    Optional settings accept ``none``; tuple settings accept ``a,b`` (or a list/tuple). ``hints``: the settings'
    types (default: those of DistillConfig and RunConfig; the text-to-image trainer passes its own).
    """
    typ = (hints or _field_types())[key]
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (types.UnionType, typing.Union) and type(None) in args:
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null", "off")):
            return None
        typ = next(a for a in args if a is not type(None))
        args = typing.get_args(typ)
    if typing.get_origin(typ) is tuple:
        if isinstance(raw, str) and raw.strip().lower() in ("", "none", "()", "[]"):
            items: list[Any] = []
        elif isinstance(raw, str):
            text = raw.strip().strip("[]()")
            items = [s.strip().strip("'\"") for s in text.split(",") if s.strip()]
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise ValueError(f"setting {key!r} must be a comma-separated list; got {raw!r}")
        inner = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"setting {key!r} needs {len(args)} values; got {raw!r}")
        return tuple(_parse_scalar(key, v, inner) for v in items)
    return _parse_scalar(key, raw, typ)


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` (from ``--set``) -> {k: v}; a pair without '=' raises ValueError."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value; got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def resolve(preset: str, overrides: dict[str, Any] | None = None) -> tuple[DistillConfig, RunConfig]:
    """Preset ``preset`` with ``overrides`` applied (names as in :func:`valid_keys`), validated."""
    p = get_preset(preset)
    distill, run = dict(p.distill), dict(p.run)
    for key, raw in (overrides or {}).items():
        targets = ALIASES.get(key, (key,))
        for t in targets:
            if t not in DISTILL_KEYS and t not in RUN_KEYS:
                raise ValueError(f"unknown setting {key!r}; valid settings: {', '.join(valid_keys())}")
            value = parse_value(t, raw)
            (distill if t in DISTILL_KEYS else run)[t] = value
    try:
        dcfg = DistillConfig.from_dict(distill)
        rcfg = RunConfig(**run)
    except ValueError as exc:
        raise ValueError(f"preset {preset!r} with overrides {overrides or {}}: {exc}") from exc
    return dcfg, rcfg


def describe(preset: str, overrides: dict[str, Any] | None = None) -> str:
    """A readable table of a preset's settings (with ``overrides`` applied)."""
    dcfg, rcfg = resolve(preset, overrides)
    rows = [f"preset {preset}: {PRESETS[preset].description}" + (f"; overrides {overrides}" if overrides else "")]
    rows += [f"  {k} = {v!r}" for k, v in dcfg.to_dict().items()]
    rows += [f"  {k} = {v!r}" for k, v in dataclasses.asdict(rcfg).items()]
    rows += [f"aliases: {k} sets {', '.join(v)}" for k, v in ALIASES.items()]
    return "\n".join(rows)


__all__ = ["RunConfig", "Preset", "PRESETS", "ALIASES", "get_preset", "resolve", "parse_value", "parse_overrides",
           "valid_keys", "describe"]
