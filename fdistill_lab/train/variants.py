"""Variants of the training step, timed side by side with today's eager step (``scripts/gpu_check.py``).

A variant is a set of speed settings (:mod:`fdistill_lab.train.speed`) on top of a preset. :func:`measure_variant`
trains a fresh trainer for one generator and one critic step from the same initial state as every other variant
(the first step pair, compilation included), compares those steps' losses and gradient norms with the eager
step's, then times the steps once warm.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

_LAYOUT = dict(channels_last=True, fused_optimizer=True, fold_biases=True)
# in order of value: a run cut short by its time limit has measured the most informative ones first
VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {},
    "layout": _LAYOUT,
    "microbatch": {},  # per-GPU micro-batch x 4 with gradient accumulation (see MICRO_BATCHES)
    "compile_steps": dict(compile="steps", **_LAYOUT),
    "compile_steps_graphs": dict(compile="steps", cuda_graphs=True, **_LAYOUT),
    "channels_last": dict(channels_last=True),
    "fused_adamw": dict(fused_optimizer=True),
    "fold_biases": dict(fold_biases=True),
    "compile_networks": dict(compile="networks", **_LAYOUT),
    "compile_norms": dict(compile_norms=True),
}
MICRO_BATCHES = 4
# the statistics compared with the eager step's (losses and gradient norms of the first generator and critic step)
COMPARED = ("loss_f", "loss_gan_g", "loss_g", "grad_norm_student", "ratio_mean", "loss_dsm", "loss_d",
            "loss_critic", "grad_norm_critic")


def parse_variants(text: str, device: torch.device) -> tuple[list[str], list[str]]:
    """Names from a comma-separated list ("all": every variant), and those left out because they need CUDA.
    Unknown names raise ValueError listing the valid ones."""
    names = list(VARIANTS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; valid: all, {', '.join(VARIANTS)}")
    if "eager" in names:  # the reference of every comparison comes first
        names.remove("eager")
    names.insert(0, "eager")
    cuda_only = [n for n in names if VARIANTS[n].get("cuda_graphs")] if device.type != "cuda" else []
    return [n for n in names if n not in cuda_only], cuda_only


def compare_logs(logs: dict[str, float], reference: dict[str, float]) -> tuple[float, str]:
    """Largest relative difference among :data:`COMPARED` statistics (relative to max(|reference|, 1e-3)) and
    the statistic it is in."""
    worst, key = 0.0, ""
    for k in COMPARED:
        if k in logs and k in reference:
            d = abs(logs[k] - reference[k]) / max(abs(reference[k]), 1e-3)
            if d >= worst:
                worst, key = d, k
    return worst, key


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_variant(trainer: Any, emas: Any, images: torch.Tensor, labels: torch.Tensor | None,
                    device: torch.device, repeats: int, warmup: int = 2) -> dict[str, Any]:
    """First generator + critic step (its logs and wall time, compilation included), then ``warmup`` more step
    pairs (CUDA graphs are recorded on the first calls after compilation) and the median of ``repeats`` timed
    generator steps (with the extra EMAs) and critic steps. Returns times in seconds, peak memory in GiB (NaN on a
    CPU), and the first steps' logs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    k = trainer.config.student_update_freq

    def gen() -> dict[str, float]:
        out = trainer.generator_step(images, labels)
        emas.update(trainer.student)
        return out

    t0 = time.perf_counter()
    first = {**gen(), **trainer.critic_step(images, labels)}
    _sync(device)
    t_first = time.perf_counter() - t0
    for _ in range(warmup):
        gen()
        trainer.critic_step(images, labels)
    _sync(device)
    t_gen = _median_time(gen, device, repeats)
    t_crit = _median_time(lambda: trainer.critic_step(images, labels), device, repeats)
    t_iter = (t_gen + (k - 1) * t_crit) / k
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"batch": images.shape[0], "generator_step_s": t_gen, "critic_step_s": t_crit, "iteration_s": t_iter,
            "images_per_s": images.shape[0] / t_iter, "peak_memory_gib": peak, "first_step_pair_s": t_first,
            "compile_s": max(t_first - t_gen - t_crit, 0.0), "first_logs": first}


__all__ = ["VARIANTS", "MICRO_BATCHES", "COMPARED", "parse_variants", "compare_logs", "measure_variant"]
