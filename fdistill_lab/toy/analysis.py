"""Measurements on the 2-D toy for notebook 03: ratio calibration, loss and gradient fluctuation,
gradient variance at matched states, per-iteration cost and peak tensor memory.

Built on the toy trainer of notebook 02 without changing it:
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
from ..losses import fdistill_loss
from ..method import FDistillWeighting, noisy
from ..mixtures import GaussianMixture
from ..ratio import ratio_from_logits
from .experiment import final_samples
from .metrics import evaluate_samples, select_bandwidth
from .models import student_kde
from .trainer import ToyConfig, ToyTrainer

RATIO_VARIANTS = ("raw", "clipped", "clipped+bins")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_and_evaluate(teacher: GaussianMixture, config: ToyConfig, eval_samples: int = 4000,
                       progress: bool = True, desc: str | None = None) -> dict:
    """Train one run and evaluate ``eval_samples`` final samples (``toy.evaluate_samples``).

    Returns ``metrics``, ``seconds`` (warm-up + training), ``sec_per_iter`` (the iterations after the critic
    warm-up, with their periodic ``eval_every`` evaluations, per iteration), ``fluctuation`` of the surrogate loss
    ``loss_f`` and of the student's gradient norm ``grad_norm_student`` over the generator steps, the final
    ``samples`` and the ``run`` (its ``history`` and ``evaluations``).
    """
    run = ToyTrainer(teacher, config)
    c = run.config
    t0 = time.perf_counter()
    run.fit(min(c.critic_warmup, c.steps), progress=False)
    t1 = time.perf_counter()
    run.fit(progress=progress, desc=desc)
    t2 = time.perf_counter()
    x = final_samples(run, eval_samples)
    return {"metrics": evaluate_samples(x, teacher, seed=c.seed), "seconds": t2 - t0,
            "sec_per_iter": (t2 - t1) / max(1, c.steps - c.critic_warmup), "samples": x,
            "fluctuation": {k: fluctuation(run.curve(k)[1]) for k in ("loss_f", "grad_norm_student")}, "run": run}


def train_with_snapshots(teacher: GaussianMixture, config: ToyConfig, at: Sequence[int],
                         progress: bool = True) -> tuple[ToyTrainer, dict[int, ToyTrainer]]:
    """Train one run and keep frozen copies (``snapshot``) after the iterations in ``at``; the training is the same
    as without them."""
    marks = sorted(set(int(a) for a in at))
    if not marks or marks[0] < 0 or marks[-1] > config.steps:
        raise ValueError(f"snapshot steps must lie in [0, steps={config.steps}]; got {list(at)}")
    run = ToyTrainer(teacher, config)
    snaps = {}
    for mark in marks:
        run.fit(mark - run.step_count, progress=progress, desc=f"{config.divergence} to iteration {mark}")
        snaps[mark] = snapshot(run)
    run.fit(progress=progress)
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
def _require_trained_critics(run: ToyTrainer, what: str) -> None:
    """The analyses of the learned ratio and fake score need them trained; an oracle run never trains them."""
    if run.config.oracle:
        raise ValueError(f"{what} studies the run's trained discriminator and fake score, but this run has "
                         "oracle=True (exact critics; its networks were never trained): use a run with oracle=False")


def log_ratio_estimates(run: ToyTrainer, x_t: torch.Tensor, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """log r from the run's discriminator: raw exp(logit), clipped (logit and ratio clip), and clipped
    then divided by the run's stage-1 per-bin running mean (its state after training, not updated)."""
    c = run.config
    _require_trained_critics(run, "log_ratio_estimates")
    with torch.no_grad():
        logit = run.disc(x_t, sigma).double()
        r = ratio_from_logits(logit, c.logit_clip, c.ratio_min, c.ratio_max)
        binned = run.weighting.normalizer(r, sigma, update=False) if c.normalize_ratio else r
    return {"raw": logit, "clipped": r.log(), "clipped+bins": binned.log()}


@torch.no_grad()
def ratio_calibration(run: ToyTrainer, sigmas: Sequence[float], n: int = 2000, kde_samples: int = 4000,
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
    z_dim = run.student.z_dim
    fit = run.student(torch.randn(kde_samples, z_dim, generator=g)).double()
    held = run.student(torch.randn(kde_samples // 2, z_dim, generator=g)).double()
    bw = select_bandwidth(fit, held)
    kde = student_kde(fit, bw)
    rows, points = [], {}
    for s in sigmas:
        if s <= 0:
            raise ValueError(f"sigmas must be > 0; got {s}")
        x = run.student(torch.randn(n, z_dim, generator=g)).double()
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
def snapshot(run: ToyTrainer) -> ToyTrainer:
    """A frozen copy of the run's networks and ratio state (shares teacher and config; no optimiser use)."""
    snap = copy.copy(run)
    for name in ("student", "fake_score", "disc", "weighting"):
        setattr(snap, name, copy.deepcopy(getattr(run, name)))
    snap.history, snap.evaluations = [], []
    return snap


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


def gradient_variance(run: ToyTrainer, divs: Sequence[str], num_batches: int = 32, batch: int | None = None,
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
    c = run.config
    names = [divergences.canonical_name(d) for d in divs]
    weightings = {}
    for d in names:
        w = FDistillWeighting.from_config(c, d)
        w.load_state_dict(run.weighting.state_dict())
        weightings[d] = w
    params = [p for p in run.student.parameters() if p.requires_grad]
    b = batch or c.batch_size
    g = torch.Generator().manual_seed(seed)
    grads: dict[str, list[torch.Tensor]] = {d: [] for d in names}
    wvar: dict[str, list[float]] = {d: [] for d in names}
    saved_rng = run.rng
    run.rng = g  # the run's own sampling helpers, fed by this seed
    try:
        for _ in range(num_batches):
            x = run.student.sample(b, g)
            sigma = run.sample_sigma(b)
            x_t = noisy(x.detach(), sigma, run.randn(x.shape))
            x0_teacher = run.teacher_x0(x_t, sigma)
            with torch.no_grad():
                x0_fake = run.fake_score(x_t, sigma)
                logits = run.disc(x_t, sigma)
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
    """Wall time per iteration over a cycle of the schedule (``student_update_freq`` iterations: one generator
    update and its critic updates) and of the generator update alone (medians over ``iters`` cycles, after
    ``warmup`` cycles), the time of the weighting h_norm alone (mean of ``weighting_reps`` calls), and the peak
    tensor memory of one cycle. Fresh networks from ``config``, its schedule started after the critic warm-up."""
    if iters < 1 or warmup < 0 or weighting_reps < 1:
        raise ValueError(f"need iters >= 1, warmup >= 0, weighting_reps >= 1; got {iters}, {warmup}, {weighting_reps}")
    run = ToyTrainer(teacher, config.replace(critic_warmup=0))  # step() does not stop at config.steps
    k = run.config.student_update_freq

    def cycle() -> float:
        """K iterations; returns the time of its generator update."""
        gen_s = 0.0
        for _ in range(k):
            t = time.perf_counter()
            logs = run.step()
            if logs["generator_step"]:
                gen_s += time.perf_counter() - t
        return gen_s

    for _ in range(warmup):
        cycle()
    it, gen = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        gen.append(cycle())
        it.append((time.perf_counter() - t0) / k)
    logits = torch.randn(config.batch_size)
    sigma = run.sample_sigma(config.batch_size)
    t0 = time.perf_counter()
    for _ in range(weighting_reps):
        run.weighting(logits, sigma, update=False)
    weight_s = (time.perf_counter() - t0) / weighting_reps
    return {"sec_per_iter": _median(it), "gen_step_s": _median(gen), "weighting_s": weight_s,
            "peak_tensor_mb": peak_tensor_bytes(cycle) / 2**20}


def _median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())
