"""The 2-D toy lab of notebook 02: distil an analytic Gaussian-mixture teacher into a one-step MLP
generator with any f-divergence, and measure mode coverage.

- ``models``: generator, fake score (EDM denoiser), discriminator, the oracle's KDE of the student.
- ``train``: ``ToyConfig``, ``ToyDistiller`` (critic / generator steps), ``train_toy``.
- ``metrics``: modes covered, precision, recall, mode-mass error, KDE-based KL estimates.
- ``experiment``: the notebook's teacher and the divergences x seeds sweep.
"""

from .experiment import COMPARISON, Comparison, default_teacher, resolve_divergences, run_comparison
from .metrics import (
    assign_modes,
    evaluate_samples,
    kde_log_prob,
    kl_estimates,
    mode_metrics,
    recall,
    select_bandwidth,
    summarize,
)
from .models import Generator, ToyDenoiser, ToyDiscriminator, student_kde
from .trainer import ToyConfig, ToyDistiller, score_disagreement, train_toy

__all__ = [
    "COMPARISON", "Comparison", "default_teacher", "resolve_divergences", "run_comparison", "score_disagreement",
    "Generator", "ToyConfig", "ToyDenoiser", "ToyDiscriminator", "ToyDistiller", "assign_modes",
    "evaluate_samples", "kde_log_prob", "kl_estimates", "mode_metrics", "recall", "select_bandwidth",
    "student_kde", "summarize", "train_toy",
]
