"""Measurements on the 2-D toy for notebook 03: ratio calibration, loss and gradient fluctuation,
gradient variance at matched states, per-iteration cost and peak tensor memory.

Built on ``fdistill_lab.toy`` (notebook 02's training code) without changing it:
- ``InstrumentedDistiller`` logs the generator's gradient norm each step (a pre-step hook on its optimiser).
- ``ratio_calibration`` compares the discriminator's r = exp(logit) with the "true" p_sigma / q_sigma,
  where q_sigma is a Gaussian KDE of fresh student samples (bandwidth by held-out likelihood), noised
  exactly; paper section 4 (ratio from logits) and section 5 (stage-1 normalisation).
- ``gradient_variance`` measures the spread of the f-distill gradient over mini-batches for several
  divergences on the *same* networks (common random numbers): the "variance" column of paper Table 1.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .. import divergences
from ..losses import FDistillWeighting, fdistill_loss
from ..mixtures import GaussianMixture
from ..ratio import ratio_from_logits
from . import ToyConfig, ToyDistiller, evaluate_samples, select_bandwidth, student_kde

RATIO_VARIANTS = ("raw", "clipped", "clipped+bins")


class InstrumentedDistiller(ToyDistiller):
    """``ToyDistiller`` whose history also holds ``grad_norm``: the generator's gradient L2 norm per step."""

    def __init__(self, teacher: GaussianMixture, config: ToyConfig) -> None:
        super().__init__(teacher, config)
        self._grad_norm = float("nan")
        self.opt_gen.register_step_pre_hook(self._record_grad_norm)

    def _record_grad_norm(self, optimizer, args, kwargs) -> None:
        grads = [p.grad.detach().norm() for p in self.generator.parameters() if p.grad is not None]
        self._grad_norm = float(torch.stack(grads).norm()) if grads else 0.0

    def generator_step(self) -> dict[str, float]:
        logs = super().generator_step()
        logs["grad_norm"] = self._grad_norm
        return logs


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_and_evaluate(teacher: GaussianMixture, config: ToyConfig, eval_samples: int = 4000,
                       progress: bool = True, desc: str | None = None) -> dict:
    """Train one instrumented run and evaluate ``eval_samples`` final samples (``toy.evaluate_samples``).

    Returns ``metrics``, ``history`` (incl. ``grad_norm``), ``seconds`` (warm-up + training),
    ``sec_per_iter`` (training with its periodic ``eval_every`` evaluations, without the warm-up, divided by the
    generator steps), ``fluctuation`` and the ``run``.
    """
    run = InstrumentedDistiller(teacher, config)
    c = run.cfg
    t0 = time.perf_counter()
    if not c.oracle:
        for _ in range(c.critic_warmup):
            run.critic_step()
    t1 = time.perf_counter()
    warm, c.critic_warmup = c.critic_warmup, 0  # train() would warm up again
    run.train(progress=progress, desc=desc)
    c.critic_warmup = warm
    t2 = time.perf_counter()
    with torch.no_grad():
        g = torch.Generator().manual_seed(10_000 + c.seed)
        x = run.generator(torch.randn(eval_samples, c.z_dim, generator=g))
    h = run.history
    return {"metrics": evaluate_samples(x, teacher, seed=c.seed), "history": h, "seconds": t2 - t0,
            "sec_per_iter": (t2 - t1) / c.steps, "samples": x,
            "fluctuation": {k: fluctuation(h[k]) for k in ("gen_loss", "grad_norm")}, "run": run}


def train_with_snapshots(teacher: GaussianMixture, config: ToyConfig, at: Sequence[int],
                         progress: bool = True) -> tuple[InstrumentedDistiller, dict[int, ToyDistiller]]:
    """Train one instrumented run and keep frozen copies (``snapshot``) after the generator steps in ``at``
    (0 = right after the critic warm-up). The schedule is the same as ``ToyDistiller.train``."""
    marks = sorted(set(int(a) for a in at))
    if not marks or marks[0] < 0 or marks[-1] > config.steps:
        raise ValueError(f"snapshot steps must lie in [0, steps={config.steps}]; got {list(at)}")
    run = InstrumentedDistiller(teacher, config)
    c = run.cfg
    if not c.oracle:
        for _ in range(c.critic_warmup):
            run.critic_step()
    total, warm = c.steps, c.critic_warmup
    snaps, done = {}, 0
    try:
        c.critic_warmup = 0
        for mark in [*marks, total]:
            if mark > done:
                c.steps = mark - done
                run.train(progress=progress, desc=f"{c.divergence} steps {done}-{mark}")
                done = mark
            if mark in marks and mark not in snaps:
                snaps[mark] = snapshot(run)
    finally:
        c.steps, c.critic_warmup = total, warm
    return run, snaps


def fluctuation(values: Sequence[float], burn_in: float = 0.2) -> dict[str, float]:
    """Fluctuation of a training curve after dropping the first ``burn_in`` fraction of steps.

    ``cv``: std / mean; ``step_change``: median |v_t - v_{t-1}| / mean (how jumpy step to step).
    """
    v = torch.as_tensor(list(values), dtype=torch.float64)
    if v.numel() < 3:
        raise ValueError(f"need at least 3 values; got {v.numel()}")
    v = v[int(burn_in * v.numel()):]
    mean = float(v.mean())
    scale = abs(mean) if mean != 0 else float("nan")
    return {"mean": mean, "cv": float(v.std()) / scale, "step_change": float(v.diff().abs().median()) / scale}


# ---------------------------------------------------------------------------------------- density ratio
def _require_trained_critics(run: ToyDistiller, what: str) -> None:
    """The analyses of the learned ratio and fake score need them trained; an oracle run never trains them."""
    if run.cfg.oracle:
        raise ValueError(f"{what} studies the run's trained discriminator and fake score, but this run has "
                         "oracle=True (exact critics; its networks were never trained): use a run with oracle=False")


def log_ratio_estimates(run: ToyDistiller, x_t: torch.Tensor, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """log r from the run's discriminator: raw exp(logit), clipped (logit and ratio clip), and clipped
    then divided by the run's stage-1 per-bin running mean (its state after training, not updated)."""
    c = run.cfg
    _require_trained_critics(run, "log_ratio_estimates")
    with torch.no_grad():
        logit = run.discriminator(x_t, sigma).double()
        r = ratio_from_logits(logit, c.logit_clip, c.ratio_min, c.ratio_max)
        binned = run.weighting.normalizer(r, sigma, update=False) if c.normalize_ratio else r
    return {"raw": logit, "clipped": r.log(), "clipped+bins": binned.log()}


@torch.no_grad()
def ratio_calibration(run: ToyDistiller, sigmas: Sequence[float], n: int = 2000, kde_samples: int = 4000,
                      seed: int = 0) -> dict:
    """Discriminator ratio vs the KDE-based "true" log p_sigma / q_sigma on noisy student samples.

    For each sigma: ``n`` student samples are noised (x_t ~ q_sigma, where the generator loss
    evaluates r). The reference q is a Gaussian KDE of ``kde_samples`` other student samples, its
    bandwidth picked by held-out likelihood; q noised at sigma is then exact (variance bw^2 + sigma^2).
    Returns ``rows`` (per sigma and variant: mean |log error|, E_q[r], correlation of log r) and
    ``points`` (per sigma: true and estimated log r) for calibration plots.
    """
    _require_trained_critics(run, "ratio_calibration")
    g = torch.Generator().manual_seed(seed)
    z_dim = run.generator.z_dim
    fit = run.generator(torch.randn(kde_samples, z_dim, generator=g)).double()
    held = run.generator(torch.randn(kde_samples // 2, z_dim, generator=g)).double()
    bw = select_bandwidth(fit, held)
    kde = student_kde(fit, bw)
    rows, points = [], {}
    for s in sigmas:
        if s <= 0:
            raise ValueError(f"sigmas must be > 0; got {s}")
        x = run.generator(torch.randn(n, z_dim, generator=g)).double()
        sig = torch.full((n,), float(s), dtype=torch.float64)
        x_t = x + s * torch.randn(x.shape, generator=g, dtype=torch.float64)
        true = run.teacher.log_ratio(kde, x_t, sig)
        est = log_ratio_estimates(run, x_t.float(), sig.float())
        points[float(s)] = {"true": true, **est}
        for name in RATIO_VARIANTS:
            e = est[name]
            corr = float(torch.corrcoef(torch.stack([true, e]))[0, 1]) if e.std() > 0 else float("nan")
            rows.append({"sigma": float(s), "variant": name, "abs_log_error": float((e - true).abs().mean()),
                         "mean_ratio": float(e.exp().mean()), "corr": corr})
        rows.append({"sigma": float(s), "variant": "true (KDE)", "abs_log_error": 0.0,
                     "mean_ratio": float(true.exp().mean()), "corr": 1.0})
    return {"rows": rows, "points": points, "kde_bandwidth": bw}


# ---------------------------------------------------------------------------------------- gradient variance
def snapshot(run: ToyDistiller) -> ToyDistiller:
    """A frozen copy of the run's networks and ratio state (shares teacher and config; no optimiser use)."""
    snap = copy.copy(run)
    for name in ("generator", "fake_score", "discriminator", "weighting"):
        setattr(snap, name, copy.deepcopy(getattr(run, name)))
    snap.history = {}
    return snap


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


def gradient_variance(run: ToyDistiller, divs: Sequence[str], num_batches: int = 32, batch: int | None = None,
                      seed: int = 0) -> dict[str, dict[str, float]]:
    """Spread of the generator's f-distill gradient over ``num_batches`` mini-batches, per divergence.

    All divergences see the same networks and the same batches (z, sigma, noise): only h differs
    (with the run's clipping and normalisation settings; the stage-1 state is read, not updated).
    Per divergence: ``trace_var`` = E||g_b - E g||^2, ``rel_var`` = trace_var / ||E g||^2 (the noise-to-signal
    ratio of one mini-batch step, see :func:`noise_to_signal`), ``weight_var`` = mean over batches of
    Var(h_norm) (Table 1's variance of the weight) and ``grad_norm`` = ||mean g||.
    """
    if num_batches < 2:
        raise ValueError(f"num_batches must be >= 2; got {num_batches}")
    _require_trained_critics(run, "gradient_variance")
    c = run.cfg
    names = [divergences.canonical_name(d) for d in divs]
    weightings = {}
    for d in names:
        w = FDistillWeighting.from_config(c, d)
        w.load_state_dict(run.weighting.state_dict())
        weightings[d] = w
    params = [p for p in run.generator.parameters() if p.requires_grad]
    b = batch or c.batch
    g = torch.Generator().manual_seed(seed)
    grads: dict[str, list[torch.Tensor]] = {d: [] for d in names}
    wvar: dict[str, list[float]] = {d: [] for d in names}
    saved_rng = run.rng
    run.rng = g  # the run's own sampling helpers, fed by this seed
    try:
        for _ in range(num_batches):
            x = run.generator.sample(b, g)
            sigma = run.sample_sigma(b)
            x_t = run.noise(x.detach(), sigma)
            x0_teacher = run.teacher_x0(x_t, sigma)
            with torch.no_grad():
                x0_fake = run.fake_score(x_t, sigma)
                logits = run.discriminator(x_t, sigma)
            for d in names:
                h, _ = weightings[d](logits, sigma, update=False)
                grads[d].append(_flat_grad(fdistill_loss(x, x0_fake, x0_teacher, h), params))
                wvar[d].append(float(h.var()))
    finally:
        run.rng = saved_rng
    out = {}
    for d in names:
        G = torch.stack(grads[d]).double()
        trace_var, rel_var = noise_to_signal(G)
        out[d] = {"trace_var": trace_var, "rel_var": rel_var, "weight_var": sum(wvar[d]) / len(wvar[d]),
                  "grad_norm": float(G.mean(0).norm())}
    return out


def noise_to_signal(grads: torch.Tensor) -> tuple[float, float]:
    """(trace_var, rel_var) of gradients [B, P], one row per mini-batch.

    trace_var = sum of the unbiased per-coordinate variances, an unbiased estimate of E||g_b - E g||^2.
    rel_var = trace_var / (||mean g||^2 - trace_var / B): the squared norm of the mean overestimates ||E g||^2
    by trace_var / B, which capped the plain ratio near B and biased it low; inf when the B batches do not
    resolve the mean gradient above its noise.
    """
    if grads.ndim != 2 or grads.shape[0] < 2:
        raise ValueError(f"need gradients [B >= 2, P]; got shape {tuple(grads.shape)}")
    g = grads.double()
    mean = g.mean(0)
    trace_var = float(((g - mean) ** 2).sum() / (g.shape[0] - 1))
    signal = float(mean.pow(2).sum()) - trace_var / g.shape[0]
    return trace_var, trace_var / signal if signal > 0 else math.inf


# ---------------------------------------------------------------------------------------- cost
@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ log lines (written to file descriptor 2) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of live CPU tensors allocated while ``fn()`` runs (torch profiler memory events).

    Allocations are attributed to the op that made them and frees to ``[memory]`` events; the running
    sum in time order gives the peak over the call (tensors alive before the call are not counted).
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    return int(max(itertools.accumulate(d for _, d in deltas), default=0))


def iteration_cost(teacher: GaussianMixture, config: ToyConfig, iters: int = 20, warmup: int = 3,
                   weighting_reps: int = 200) -> dict[str, float]:
    """Wall time of one training iteration (critic_steps critic updates + 1 generator update) and of its
    generator update alone (medians over ``iters``), the time of the weighting h_norm alone (mean of
    ``weighting_reps`` calls), and the peak tensor memory of one iteration. Fresh networks from ``config``."""
    if iters < 1 or warmup < 0 or weighting_reps < 1:
        raise ValueError(f"need iters >= 1, warmup >= 0, weighting_reps >= 1; got {iters}, {warmup}, {weighting_reps}")
    run = ToyDistiller(teacher, config)

    def iteration() -> None:
        if not run.cfg.oracle:
            for _ in range(run.cfg.critic_steps):
                run.critic_step()
        run.generator_step()

    for _ in range(warmup):
        iteration()
    it, gen = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        if not run.cfg.oracle:
            for _ in range(run.cfg.critic_steps):
                run.critic_step()
        t1 = time.perf_counter()
        run.generator_step()
        t2 = time.perf_counter()
        it.append(t2 - t0)
        gen.append(t2 - t1)
    logits = torch.randn(config.batch)
    sigma = run.sample_sigma(config.batch)
    t0 = time.perf_counter()
    for _ in range(weighting_reps):
        run.weighting(logits, sigma, update=False)
    weight_s = (time.perf_counter() - t0) / weighting_reps
    return {"sec_per_iter": _median(it), "gen_step_s": _median(gen), "weighting_s": weight_s,
            "peak_tensor_mb": peak_tensor_bytes(iteration) / 2**20}


def _median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())
