"""Notebook 04's design in one place: the teacher network and its EDM training, the classifier's length and the
one-step students' trainer settings (used by the notebook and by ``scripts/notebook04_ablation.py``)."""

from __future__ import annotations

from typing import Any

from ..networks import tiny_adm_config
from ..train.config import DistillConfig
from .teacher import TeacherConfig

CLASSIFIER_STEPS = 400  # training steps of the feature classifier (FD, precision/recall, class coverage)
HEUN_STEPS = 18  # the teacher's sampler: 18-step Heun, 35 network evaluations
STUDENT_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "gan_weight": 0.01, "disc_placement": "teacher",
                                    "student_update_freq": 3}


def teacher_net(img_shape: tuple[int, ...], label_dim: int = 10, model_channels: int = 16) -> dict[str, Any]:
    """The digits teacher: a small ADM (two levels, one block each, no attention); ``label_dim`` 0 for the
    unconditional teacher of the class-imbalanced study."""
    return tiny_adm_config(img_resolution=img_shape[-1], img_channels=img_shape[0], label_dim=label_dim,
                           model_channels=model_channels, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
                           dropout=0.0)


def teacher_config(net: dict[str, Any], steps: int, seed: int) -> TeacherConfig:
    """EDM training of the teacher: Adam lr 2e-3 with 50 warm-up steps, batch 128, weight EMA 0.999."""
    return TeacherConfig(net=net, steps=steps, batch_size=128, lr=2e-3, warmup_steps=50, ema_beta=0.999, seed=seed)


def student_config(divergence: str, seed: int = 0, **settings: Any) -> DistillConfig:
    """The students' trainer settings: ``STUDENT_DEFAULTS`` overridden by ``settings`` (``lr`` for the student,
    fake score and discriminator alike), student EMA 0.9. Unknown settings raise ValueError naming the valid ones;
    DistillConfig validates the values."""
    unknown = sorted(set(settings) - set(STUDENT_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown student setting(s) {unknown}; valid: {', '.join(STUDENT_DEFAULTS)}")
    s = {**STUDENT_DEFAULTS, **settings}
    return DistillConfig(divergence=divergence, student_update_freq=s["student_update_freq"], lr_student=s["lr"],
                         lr_fake=s["lr"], lr_disc=s["lr"], gan_weight_gen=s["gan_weight"],
                         disc_placement=s["disc_placement"], ema_beta=0.9, seed=seed)
