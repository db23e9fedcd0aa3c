"""fdistill_lab: learn, reproduce and extend one-step diffusion distillation with f-divergences.

Paper: Xu, Nie, Vahdat, "One-step Diffusion Models with f-Divergence Distribution Matching"
(arXiv 2502.15681). The student gradient is h(r) (s_q - s_p) with h(r) = r^2 f''(r) and r = p/q.

Layers (each imports only from the layers above it in this list; ``tests/test_layers.py`` checks it):

1. The method, in this folder: ``divergences`` (f, h), ``ratio`` (r from logits, two-stage normalisation),
   ``losses``, ``method`` (the generator and critic objectives, the weighting, the schedule), ``edm``,
   ``mixtures``, ``networks`` (EDM U-Nets, discriminator heads); and three helpers, ``files`` (atomic files,
   checkpoints, locks), ``image_grid`` and ``stats`` (intervals over seeds, paired differences).
2. The labs, one subpackage each: ``gaussian1d`` (notebook 01), ``toy`` (02-03), ``digits`` (04), ``train``
   (05: the image trainer on one or many GPUs, presets, data, FID, downloads, EDM teachers), ``t2i`` (06: that
   trainer on Stable Diffusion 1.5 latents with text, the ``t2i`` extra: diffusers, transformers).
3. The course tooling: ``course`` (notebook set-up, results records, exercise checks, student copies, handouts).
4. Commands: ``python -m fdistill_lab.train`` (also ``fdistill-train``), ``python -m fdistill_lab.t2i``,
   ``.download``, ``.sweep``, ``.student``, ``.handouts`` and ``.book``; the last five are two-line entry modules
   here that run a lab's or the course's ``main``.
"""

__version__ = "0.1.0"
