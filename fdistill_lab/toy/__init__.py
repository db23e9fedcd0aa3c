"""Lab of notebooks 02-03: distil an analytic Gaussian-mixture teacher in 2-D into a one-step MLP with any
f-divergence, and measure mode coverage.

- ``models``: generator, fake score (EDM denoiser), discriminator, the oracle's KDE of the student.
- ``trainer``: ``ToyConfig``, ``ToyTrainer`` (the image trainer's schedule and names), ``train_toy``.
- ``metrics``: modes covered, precision, recall, mode-mass error, KDE-based KL estimates.
- ``experiment``: the notebook's teacher and the divergences x seeds comparison.
- ``analysis``: ratio calibration, gradient variance, loss fluctuation and cost (notebook 03); ``plots``: figures.
- ``sensitivity`` and ``grid``: one-factor-at-a-time studies run as parallel, resumable grids of toy runs.
"""

from .experiment import COMPARISON, Comparison, default_teacher, final_samples, resolve_divergences, run_comparison
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
from .models import ToyDenoiser, ToyDiscriminator, ToyGenerator, student_kde
from .trainer import EVALUATION_KEYS, ToyConfig, ToyTrainer, score_disagreement, train_toy

__all__ = [
    "COMPARISON", "Comparison", "EVALUATION_KEYS", "ToyConfig", "ToyDenoiser", "ToyDiscriminator", "ToyGenerator",
    "ToyTrainer", "assign_modes", "default_teacher", "evaluate_samples", "final_samples", "kde_log_prob",
    "kl_estimates", "mode_metrics", "recall", "resolve_divergences", "run_comparison", "score_disagreement",
    "select_bandwidth", "student_kde", "summarize", "train_toy",
]
