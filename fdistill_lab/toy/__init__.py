"""Lab of notebooks 02-03: f-distill of an analytic 2-D Gaussian mixture into a one-step MLP (``trainer``, ``models``),
its metrics, comparisons, analyses and plots, and parallel resumable grids of runs (``grid``, ``sensitivity``)."""

from .experiment import (
    COMPARISON,
    CONVERGED,
    LIGHT_MODE_START,
    Comparison,
    converged_config,
    default_teacher,
    final_samples,
    light_mode_teacher,
    resolve_divergences,
    run_comparison,
    run_studies,
)
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
    "COMPARISON", "CONVERGED", "Comparison", "EVALUATION_KEYS", "LIGHT_MODE_START", "ToyConfig", "ToyDenoiser",
    "ToyDiscriminator", "ToyGenerator", "ToyTrainer", "assign_modes", "converged_config", "default_teacher",
    "evaluate_samples", "final_samples", "kde_log_prob", "kl_estimates", "light_mode_teacher", "mode_metrics",
    "recall", "resolve_divergences", "run_comparison", "run_studies", "score_disagreement", "select_bandwidth",
    "student_kde", "summarize", "train_toy",
]
