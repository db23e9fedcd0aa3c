"""fdistill_lab: learn, reproduce and extend one-step diffusion distillation with f-divergences.

Paper: Xu, Nie, Vahdat, "One-step Diffusion Models with f-Divergence Distribution Matching"
(arXiv 2502.15681). The student gradient is h(r) (s_q - s_p) with h(r) = r^2 f''(r) and r = p/q.
"""

__version__ = "0.1.0"
