"""Exercise checkers: fast (< 1 s), deterministic, one-line verdict, AssertionError with a hint on failure."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import divergences
from ..divergences import PAPER_NAMES


def _verdict(name: str, ok: bool, detail: str, hint: str) -> None:
    if not ok:
        raise AssertionError(f"{name}: WRONG - {detail}. Hint: {hint}")
    print(f"{name}: OK - {detail}")


def _second_derivative(f: Callable[[torch.Tensor], torch.Tensor], r: torch.Tensor) -> torch.Tensor:
    r = r.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    return d2.detach()


def check_h_js(h_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Exercise 01.1: ``h_fn(r)`` must equal r^2 f''(r) for Jensen-Shannon on r in [1e-3, 1e3]."""
    name = "check_h_js"
    r = torch.logspace(-3, 3, 61, dtype=torch.float64)
    out = h_fn(r.clone())
    if not torch.is_tensor(out) or out.shape != r.shape:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        _verdict(name, False, f"expected a tensor of shape {tuple(r.shape)}, got {got}",
                 "apply the formula elementwise with torch operations")
    js = divergences.get("js")
    target = r**2 * _second_derivative(js.f, r)  # h = r^2 f'' by autograd of the library's f
    diff = float((out.double() - target).abs().max())
    ok = bool(torch.allclose(out.double(), target, rtol=1e-6, atol=1e-9))
    _verdict(name, ok, f"max |h - r^2 f''| = {diff:.2e} on 61 points in [1e-3, 1e3]",
             "differentiate f(r) = r log r - (r + 1) log((r + 1)/2) twice, then multiply by r^2")


def check_mode_prediction(prediction: Mapping[str, int] | Callable[[], Mapping[str, int]],
                          measured: Mapping[str, int]) -> None:
    """Exercise 01.2: predicted modes kept (1 or 2) per paper divergence must match the measured fits."""
    name = "check_mode_prediction"
    pred = dict(prediction() if callable(prediction) else prediction)
    missing = [n for n in PAPER_NAMES if n not in pred]
    extra = [n for n in pred if n not in PAPER_NAMES]
    if missing or extra:
        _verdict(name, False, f"keys must be exactly {list(PAPER_NAMES)}; missing {missing}, unexpected {extra}",
                 "give one entry per paper divergence")
    bad_values = {k: v for k, v in pred.items() if v not in (1, 2) or isinstance(v, bool)}
    if bad_values:
        _verdict(name, False, f"values must be 1 or 2 (modes kept); got {bad_values}", "1 = one mode, 2 = both")
    wrong = {n: (pred[n], measured[n]) for n in PAPER_NAMES if pred[n] != measured[n]}
    _verdict(name, not wrong, f"{len(PAPER_NAMES) - len(wrong)}/{len(PAPER_NAMES)} predictions match the fits"
             + (f"; wrong (predicted, measured): {wrong}" if wrong else ""),
             "compare the weight where the student misses mass (r >> 1) with the weight on the light mode it sits "
             "on (r <= 1): growing with r is not enough at 80/20 (h = r + 1 still keeps one mode); what does h(r) "
             "do as r -> 0, and which h weighs large r most against it?")


def check_generator_step(step_fn: Callable[[Any], Mapping[str, Any]]) -> None:
    """Exercise 02.1: ``step_fn(run)`` must make the toy trainer's generator update: from the same state, two updates
    of ``step_fn`` and two of :meth:`~fdistill_lab.toy.trainer.ToyTrainer.generator_step` draw the same random
    numbers and give the same student (to float32 rounding), with the GAN term on, so that its gradient counts."""
    from ..toy import ToyConfig, ToyTrainer, default_teacher

    name = "check_generator_step"
    config = ToyConfig(divergence="fkl", steps=12, critic_warmup=4, batch_size=64, hidden=32, gan_weight_gen=0.1,
                       eval_every=12, seed=1)
    mine, ref = ToyTrainer(default_teacher(), config), ToyTrainer(default_teacher(), config)
    for run in (mine, ref):
        run.fit(6, progress=False)  # the critics trained for 6 updates
    disc = [p.detach().clone() for p in mine.disc.parameters()]
    for _ in range(2):
        stats = step_fn(mine)
        ref.generator_step()
    if not isinstance(stats, Mapping) or "loss_f" not in stats:
        _verdict(name, False, f"expected the statistics dict of method.generator_objective, got {type(stats).__name__}",
                 "return the second value that method.generator_objective returns")
    if not torch.equal(mine.rng.get_state(), ref.rng.get_state()):
        _verdict(name, False, "your step drew other random numbers than the library's",
                 "draw x = run.student.sample(b, run.rng), then sigma = run.sample_sigma(b), then "
                 "eps = run.randn(x.shape), and nothing else from run.rng")
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(mine.student.parameters(), ref.student.parameters()))
    moved = any(not torch.equal(a, b) for a, b in zip(disc, mine.disc.parameters()))
    _verdict(name, diff <= 1e-6 and not moved,
             f"max |student - library| = {diff:.1e} over the student's weights after 2 updates"
             + ("; the discriminator changed" if moved else ""),
             "draw x, sigma and eps in this order; predict(x_t) returns (run.teacher_x0(x_t, sigma), the fake "
             "score's x0 under torch.no_grad(), "
             "run.disc(x_t, sigma)); the loss is method.generator_objective(x, sigma, eps, predict, run.weighting, "
             "c.gan_weight_gen); then zero_grad, backward and run.opt_student.step(), only the student's optimiser")
