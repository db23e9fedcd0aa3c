"""Lab of notebook 01: f-distill made exact in one dimension. ``exact``: Gaussian student, Gaussian-mixture
teacher, the f-distill gradient and the divergence by quadrature; ``plots`` and ``widgets``: its figures."""

from .exact import (
    FitResult,
    Quadrature,
    bimodal,
    divergence_value,
    fdistill_gradient,
    finite_difference_gradient,
    fit_gaussian,
    gaussian,
    grid_bounds,
    modes_kept,
    normalized_variance,
    one_thread,
    quadrature,
    single_thread,
)

__all__ = ["FitResult", "Quadrature", "bimodal", "divergence_value", "fdistill_gradient",
           "finite_difference_gradient", "fit_gaussian", "gaussian", "grid_bounds", "modes_kept",
           "normalized_variance", "one_thread", "quadrature", "single_thread"]
