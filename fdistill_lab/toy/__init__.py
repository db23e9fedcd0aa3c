"""Lab of notebooks 02-03: f-distill of an analytic 2-D Gaussian mixture into a one-step MLP (``trainer``, ``models``),
its metrics, comparisons, analyses and plots, and parallel resumable grids of runs (``grid``, ``sensitivity``)."""

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
