"""Notebook 02's experiment: the teacher, the divergence list, and the divergences x seeds comparison."""

from __future__ import annotations

import pickle
import time
from collections.abc import Mapping
from concurrent.futures import as_completed
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import divergences, stats
from ..mixtures import GaussianMixture, ring, unequal_weights
from .metrics import evaluate_samples, summarize
from .trainer import ToyConfig, ToyTrainer

COMPARISON: tuple[str, ...] = divergences.PAPER_NAMES  # rkl, srkl, js, sh, fkl, jeffreys
COMPARED = ("modes_covered", "mass_tv", "precision", "recall", "fkl", "rkl")  # the metrics with intervals
LOWER_IS_BETTER = ("mass_tv", "fkl", "rkl")


def resolve_divergences(div: str) -> list[str]:
    """``'all'`` -> the paper's six divergences; otherwise one canonical name (ValueError listing valid names)."""
    if isinstance(div, str) and div.strip().lower() == "all":
        return list(COMPARISON)
    try:
        return [divergences.canonical_name(div)]
    except ValueError as err:
        raise ValueError(f"{err}; or 'all' for the comparison of {', '.join(COMPARISON)}") from None


def default_teacher(num_modes: int = 8, radius: float = 2.0, std: float = 0.2, largest: float = 0.30,
                    smallest: float = 0.03) -> GaussianMixture:
    """8 Gaussians on a radius-2 ring with weights decreasing geometrically from 0.30 to 0.03."""
    return ring(num_modes, radius, std, unequal_weights(num_modes, largest, smallest))


# The converged design of notebook 02 (docs/notebook02_design_log.md): the GAN term, width 128, a student EMA, a cosine
# learning rate, batch 512 at lr 4e-3, 10,000 iterations. JS's seed-0 student reaches precision 0.93 on the ring.
CONVERGED: dict = {"gan_weight_gen": 1.0, "hidden": 128, "ema_beta": 0.99, "lr_schedule": "cosine",
                   "batch_size": 512, "lr_student": 4e-3, "lr_fake": 4e-3, "lr_disc": 4e-3, "steps": 10_000}
# Where the light-mode design's student starts: collapsed on the heavy mode.
LIGHT_MODE_START: dict = {"init_center": (-2.0, 0.0), "init_scale": 0.1}


def converged_config(**overrides) -> ToyConfig:
    """``ToyConfig`` with the settings of ``CONVERGED``, then ``overrides``."""
    return ToyConfig(**{**CONVERGED, **overrides})


def light_mode_teacher(light: float = 0.1, distance: float = 4.0, std: float = 0.2) -> GaussianMixture:
    """A design where theory predicts separation: a heavy mode (weight 1 - ``light``) at (-distance/2, 0) and a
    light one at (distance/2, 0), ``distance / std`` = 20 stds apart by default. Mode 1 is the light one."""
    if not 0 < light < 1:
        raise ValueError(f"light must be in (0, 1); got {light}")
    if distance <= 0 or std <= 0:
        raise ValueError(f"distance and std must be > 0; got {distance}, {std}")
    means = torch.tensor([[-distance / 2, 0.0], [distance / 2, 0.0]], dtype=torch.float64)
    return GaussianMixture(means, std, torch.tensor([1.0 - light, light], dtype=torch.float64))


def final_samples(run: ToyTrainer, n: int) -> torch.Tensor:
    """The ``n`` samples a finished run is evaluated on, seeded by 10000 + its seed (apart from every training and
    evaluation stream), so runs of one seed are compared on the same latents."""
    return run.sample(n, torch.Generator().manual_seed(10_000 + run.config.seed))


@dataclass
class Comparison:
    """Results of ``run_comparison``: per-run metrics, final samples and the runs themselves (their ``history`` and
    ``evaluations``), per divergence in seed order."""

    metrics: dict[str, list[dict]] = field(default_factory=dict)
    samples: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    runs: dict[str, list[ToyTrainer]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, dict]:
        """Mean and std over seeds of the scalar metrics, per divergence."""
        return {name: summarize(ms) for name, ms in self.metrics.items()}

    def per_seed(self, metric: str) -> dict[str, list[float]]:
        """``metric`` of every run, per divergence in seed order (the same seeds for every divergence)."""
        return {name: [float(m[metric]) for m in ms] for name, ms in self.metrics.items()}

    def add_mode_metrics(self, mode: int, name: str) -> None:
        """Add ``<name>_found`` (1 if the run covers teacher mode ``mode``, else 0) and ``<name>_mass`` (the mass
        of its samples on that mode) to every run's metrics, so that :meth:`intervals` can compare them."""
        for ms in self.metrics.values():
            for m in ms:
                if not 0 <= mode < len(m["mode_mass"]):
                    raise ValueError(f"mode must be in [0, {len(m['mode_mass'])}); got {mode}")
                m[f"{name}_found"] = float(m["covered"][mode])
                m[f"{name}_mass"] = float(m["mode_mass"][mode])

    def intervals(self, baseline: str | None = None, metrics: tuple[str, ...] = COMPARED,
                  confidence: float = 0.95) -> dict[str, list[dict]]:
        """Per metric, :func:`fdistill_lab.stats.compare` rows: each divergence's mean with its t interval over
        seeds and the paired difference against ``baseline`` (default: reverse KL if it ran, else the first)."""
        names = list(self.metrics)
        base = baseline or ("rkl" if "rkl" in names else names[0])
        seeds = {name: [m["seed"] for m in ms] for name, ms in self.metrics.items()}
        if len({tuple(s) for s in seeds.values()}) > 1:
            raise ValueError(f"paired differences need the same seeds for every divergence; got {seeds}")
        return {k: stats.compare(self.per_seed(k), base, higher_is_better=k not in LOWER_IS_BETTER,
                                 confidence=confidence) for k in metrics}


def run_comparison(teacher: GaussianMixture, divs: list[str], seeds: list[int], config: ToyConfig,
                   eval_samples: int = 4000, progress: bool = True, threads: int | None = 1,
                   workers: int = 1) -> Comparison:
    """Train one run per (divergence, seed) with ``config`` and evaluate ``eval_samples`` final samples.

    ``threads``: torch intra-op threads during the sweep (restored afterwards). The toy's MLPs are so small
    that one thread is fastest; on a busy 2-core machine two threads made a run about 3x slower.
    ``None`` keeps the current setting. ``workers`` > 1: the runs go to that many spawned processes of one thread
    each (one per core is fastest); every run is seeded and single-threaded, so the results equal the serial ones
    bit for bit. A run that fails stops the others and raises its error.
    """
    return run_studies({"runs": (teacher, divs, seeds, config)}, eval_samples, progress, threads, workers)["runs"]


def run_studies(studies: Mapping[str, tuple[GaussianMixture, list[str], list[int], ToyConfig]],
                eval_samples: int = 4000, progress: bool = True, threads: int | None = 1,
                workers: int = 1) -> dict[str, Comparison]:
    """Several comparisons ``{name: (teacher, divs, seeds, config)}`` trained together, in one pool when ``workers``
    > 1 (so a short study fills the cores a long one leaves idle); runs start in the order of ``studies``, longest
    first is best. Returns ``{name: Comparison}``; see :func:`run_comparison` for the other arguments."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None; got {threads}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1; got {workers!r}")
    jobs: list[tuple[str, GaussianMixture, ToyConfig]] = []
    for name, (teacher, divs, seeds, config) in studies.items():
        if not divs or not seeds:
            raise ValueError(f"study {name!r}: need at least one divergence and one seed; got {divs}, {seeds}")
        jobs += [(name, teacher, config.replace(divergence=d, seed=s)) for d in divs for s in seeds]
    if workers > 1 and len(jobs) > 1:
        done = _in_processes([(t, c) for _, t, c in jobs], eval_samples, min(workers, len(jobs)), progress)
    else:
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            done = [train_one(t, c, eval_samples, progress)
                    for _, t, c in tqdm(jobs, desc="runs", **({} if progress else {"disable": True}))]
        finally:
            torch.set_num_threads(previous)
    out = {name: Comparison() for name in studies}
    for (study, _, cfg), (run, x, metrics, seconds) in zip(jobs, done):
        comparison, name = out[study], cfg.divergence
        comparison.metrics.setdefault(name, []).append(metrics)
        comparison.seconds.setdefault(name, []).append(seconds)
        comparison.samples.setdefault(name, []).append(x)
        comparison.runs.setdefault(name, []).append(run)
    return out


def train_one(teacher: GaussianMixture, cfg: ToyConfig, eval_samples: int,
              progress: bool = False) -> tuple[ToyTrainer, torch.Tensor, dict, float]:
    """One run of a comparison: (trained run, its final samples, their metrics with the seed, seconds)."""
    t0 = time.perf_counter()
    run = ToyTrainer(teacher, cfg).fit(progress=progress)
    x = final_samples(run, eval_samples)
    metrics = {"seed": cfg.seed, **evaluate_samples(x, teacher, seed=cfg.seed)}
    return run, x, metrics, time.perf_counter() - t0


def _train_one_pickled(job: bytes) -> bytes:
    """A worker's :func:`train_one`, its job and result as plain pickle bytes: multiprocessing would share each
    tensor through a file descriptor of its own (a run holds dozens), which a pool stopped early leaves half
    served."""
    return pickle.dumps(train_one(*pickle.loads(job)))


def _in_processes(jobs: list[tuple[GaussianMixture, ToyConfig]], eval_samples: int, workers: int,
                  progress: bool) -> list[tuple]:
    from .grid import spawn_pool, stop_pool

    pool = spawn_pool(workers)
    try:
        futures = [pool.submit(_train_one_pickled, pickle.dumps((teacher, cfg, eval_samples))) for teacher, cfg in jobs]
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"runs ({workers} processes)",
                           **({} if progress else {"disable": True})):
            future.result()  # the first failure raises here
        results = [pickle.loads(f.result()) for f in futures]
    except BaseException:
        stop_pool(pool)  # end the runs in flight now: a failure must not wait for them
        raise
    pool.shutdown()
    return results
