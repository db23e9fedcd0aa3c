"""Performance check of f-distill training on one GPU (run by scripts/gpu_check.sh).

Builds the full-size EDM ImageNet-64 ADM (296M parameters; random weights unless --teacher is given) as
teacher, student and fake score with the ``imagenet64`` preset (bf16 autocast, discriminator on the teacher's
8x8 bottleneck, extra EMAs; ``--preset dmd2`` for DMD2's recipe, ``--preset cifar10`` for the CIFAR-10 DDPM++
with R1), then prints:

1. the largest per-GPU batch that fits (doubling search over one generator and one critic step);
2. at that batch and at about 4/5 of it (close to the memory limit a smaller batch can be faster per image):
   generator-step, critic-step and iteration time (FastGen schedule K = 5: 1 generator + 4 critic steps),
   images/s, peak memory; the faster of the two is the batch of the later stages;
3. the time of each network pass, measured in isolation at that batch (teacher forward/backward,
   student, fake score, discriminator, optimiser steps), as shares of their sum; the passes are those of the
   imagenet64 recipe (heads on the teacher, no R1), so for dmd2 and cifar10 only the step times are exact;
4. JS against reverse KL: generator-step time with each weighting, and the overhead on the iteration;
5. model FLOPs (torch.utils.flop_counter) per iteration and the model FLOPs utilisation (MFU);
6. A/B timings of the student's forward+backward, each with one change from the trainer's default: EDM's float32
   attention (instead of the fused bf16 kernel), channels-last memory layout, compiled norms (``compile_norms``);
7. with ``--profile N``: the N operators that take the most device time in one generator + one critic step
   (torch.profiler);
8. with ``--variants``: the step variants of :mod:`fdistill_lab.train.variants` side by side with today's eager
   step, each a fresh trainer from the same initial state: the first step pair's losses against the eager ones
   (the same maths up to bf16 rounding), iteration time, images/s, peak memory, MFU with the eager step's FLOP count,
   compile time (first step pair minus a warm one) and the JS-vs-reverse-KL overhead (``--variant-js-rkl``);
   ``microbatch`` trains ``--micro-batch`` x 4 with gradient accumulation (the generator step's extra gradient-free
   pass that normalises over the whole batch) against one micro-batch of eager steps.

A failing stage is reported and the later ones still run; the JSON file is rewritten after every stage.
``--memory-gib`` caps the memory PyTorch may take (e.g. 79 on an H200 to find the batch of an 80 GB H100).

``--tiny --device cpu`` runs the same code on a tiny network (for tests on machines without a GPU).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fdistill_lab.method import FDistillWeighting
from fdistill_lab.networks import build_edm, cifar10_ddpmpp_config, count_parameters, imagenet64_adm_config
from fdistill_lab.networks.layers import eager_norms
from fdistill_lab.train import speed
from fdistill_lab.train.presets import resolve
from fdistill_lab.train.run_folder import StudentEMAs
from fdistill_lab.train.smoke_assets import smoke_teacher_config
from fdistill_lab.train.trainer import FDistillTrainer
from fdistill_lab.train.variants import COMPARED, MICRO_BATCHES, VARIANTS, compare_logs, measure_variant, parse_variants

# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched in this order against the device
# name (an SXM H100 reports "NVIDIA H100 80GB HBM3"; the PCIe and NVL boards are slower)
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10": 125e12, "L4": 121e12}


SKIPPABLE = ("passes", "js_vs_rkl", "mfu", "student_ab")


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# the network each preset distils (EDM's configurations, dropout off for timing)
PRESET_NETWORKS = {"imagenet64": imagenet64_adm_config, "dmd2": imagenet64_adm_config,
                   "cifar10": cifar10_ddpmpp_config}


def teacher_config(preset: str, tiny: bool) -> dict:
    """EDMPrecond keywords of the random-weight teacher: the preset's network, or the smoke network."""
    return smoke_teacher_config() if tiny else dict(PRESET_NETWORKS[preset](), dropout=0.0)


def new_teacher(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The ``--teacher`` pickle, else a random-weight teacher of the preset's network (seed 0)."""
    if args.teacher:
        from fdistill_lab.train.teachers import load_edm

        return load_edm(args.teacher, device=device)
    torch.manual_seed(0)
    with torch.device(device):
        return build_edm(**teacher_config(args.preset, args.tiny)).eval().requires_grad_(False)


def build(args: argparse.Namespace, device: torch.device, settings: dict | None = None,
          teacher: torch.nn.Module | None = None) -> tuple[FDistillTrainer, StudentEMAs]:
    """The preset's trainer (with ``settings`` on top) and its extra EMAs, on ``teacher`` or a new one."""
    preset = "tiny" if args.tiny else args.preset
    dcfg, rcfg = resolve(preset, {"precision": "bf16" if device.type == "cuda" else "fp32",
                                  "compile_norms": args.compile_norms, **(settings or {})})
    trainer = FDistillTrainer(teacher if teacher is not None else new_teacher(args, device), dcfg, device,
                              rng_mode="per_rank")
    return trainer, StudentEMAs(trainer.student, rcfg.extra_ema_betas)


def batch_of(trainer: FDistillTrainer, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    t = trainer.teacher
    x = torch.rand(n, t.img_channels, t.img_resolution, t.img_resolution) * 2 - 1
    return x, (torch.randint(0, t.label_dim, (n,)) if t.label_dim else None)


def fits(trainer: FDistillTrainer, n: int, device: torch.device) -> bool:
    try:
        x, y = batch_of(trainer, n)
        trainer.generator_step(x, y)
        trainer.critic_step(x, y)
        sync(device)
        return True
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError is newer than torch 2.3
        return False
    finally:
        for opt in (trainer.opt_student, trainer.opt_fake, trainer.opt_disc):
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def search_batch(trainer: FDistillTrainer, device: torch.device, start: int, limit: int) -> int:
    """Largest batch in start, 2 start, 4 start, ... (then halfway to the first failure) that fits."""
    best, n = 0, start
    while n <= limit and fits(trainer, n, device):
        print(f"  batch {n}: fits", flush=True)
        best, n = n, n * 2
    if best and n <= limit:
        print(f"  batch {n}: out of memory", flush=True)
        mid = (best + n) // 2 // 8 * 8
        if mid > best and fits(trainer, mid, device):
            print(f"  batch {mid}: fits", flush=True)
            best = mid
    if not best:
        raise SystemExit(f"even batch {start} does not fit on {device}")
    return best


def pass_times(trainer: FDistillTrainer, n: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Isolated timings of each network pass at batch n (same autocast as the trainer)."""
    x, y = batch_of(trainer, n)
    x, y = x.to(device), (y.to(device) if y is not None else None)
    sigma = torch.full((n,), 2.0, device=device)
    ac = trainer._autocast
    keys = trainer.disc.keys

    def student_fwd_bwd() -> None:
        with ac():
            out = trainer.student(x * 80, torch.full((n,), 80.0, device=device), y)
        out.float().square().mean().backward()

    def teacher_fwd_bwd_input() -> None:  # as the generator step: x0 without a graph, features with one
        xi = x.detach().requires_grad_(True)
        with ac():
            _, feats = trainer.teacher(xi, sigma, y, return_features=True, decoder="no_grad")
            logit = trainer.disc({k: feats[k] for k in keys})
        logit.float().mean().backward()

    def teacher_encoder() -> None:  # as the critic step: the discriminator needs the encoder only
        with torch.no_grad(), ac():
            trainer.teacher(x, sigma, y, return_features=True, decoder="skip")

    def student_fwd() -> None:
        with torch.no_grad(), ac():
            trainer.student(x * 80, torch.full((n,), 80.0, device=device), y)

    def fake_fwd() -> None:
        with torch.no_grad(), ac():
            trainer.fake_score(x, sigma, y)

    def fake_fwd_bwd() -> None:
        with ac():
            out = trainer.fake_score(x, sigma, y)
        out.float().square().mean().backward()

    with torch.no_grad(), ac():
        _, feats0 = trainer.teacher(x, sigma, y, return_features=True)
    feats = {k: feats0[k].detach() for k in keys}

    def disc_fwd_bwd() -> None:
        with ac():
            logit = trainer.disc(feats)
        logit.float().mean().backward()

    def opt(o: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> Callable[[], None]:
        for p in params:
            p.grad = torch.zeros_like(p)
        return o.step

    out = {
        "student fwd+bwd (generator)": timed(student_fwd_bwd, device, repeats),
        "teacher fwd+bwd to input + disc (generator)": timed(teacher_fwd_bwd_input, device, repeats),
        "fake score fwd, no grad (generator)": timed(fake_fwd, device, repeats),
        "student fwd, no grad (critic)": timed(student_fwd, device, repeats),
        "teacher encoder, no grad (critic, x2)": 2 * timed(teacher_encoder, device, repeats),
        "fake score fwd+bwd (critic)": timed(fake_fwd_bwd, device, repeats),
        "discriminator fwd+bwd (critic, x2)": 2 * timed(disc_fwd_bwd, device, repeats),
        "AdamW student": timed(opt(trainer.opt_student, list(trainer.student.parameters())), device, repeats),
        "AdamW fake score + disc": timed(opt(trainer.opt_fake, list(trainer.fake_score.parameters())), device,
                                         repeats) + timed(opt(trainer.opt_disc, list(trainer.disc.parameters())),
                                                          device, repeats),
    }
    for o in (trainer.opt_student, trainer.opt_fake, trainer.opt_disc):
        o.zero_grad(set_to_none=True)
    return out


def ab_student(trainer: FDistillTrainer, n: int, device: torch.device, repeats: int) -> dict[str, object]:
    """Student forward+backward at batch n as EDM runs it (eager, NCHW) and with one change each: EDM's float32
    attention instead of the fused kernel, channels-last layout, compiled norms (CUDA only: compiling on a CPU
    takes minutes; the timing excludes the compilation)."""
    from fdistill_lab.networks import layers

    x0, y = batch_of(trainer, n)
    x0, y = x0.to(device), (y.to(device) if y is not None else None)
    sigma = torch.full((n,), 80.0, device=device)
    net = trainer.student
    fused = layers.attention

    def float32_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        return fused(qkv.float(), num_heads).to(qkv.dtype)

    def run(channels_last: bool = False, compiled: bool = False, attention: Callable = fused) -> float | str:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net.to(memory_format=fmt)
        layers.use_compiled_norms(net, compiled)
        layers.attention = attention
        x = x0.contiguous(memory_format=fmt)

        def step() -> None:
            with trainer._autocast():
                out = net(x * 80, sigma, y)
            out.float().square().mean().backward()

        try:
            return timed(step, device, repeats)
        except torch.cuda.OutOfMemoryError:
            return "out of memory"
        finally:
            net.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    out: dict[str, object] = {"batch": n}
    try:
        out["eager NCHW"] = run()
        out["EDM float32 attention"] = run(attention=float32_attention)
        out["channels-last"] = run(channels_last=True)
        if device.type == "cuda":
            out["compiled norms"] = run(compiled=True)
    finally:  # back to the trainer's settings
        layers.attention = fused
        net.to(memory_format=torch.contiguous_format)
        layers.use_compiled_norms(net, trainer.config.compile_norms)
    return out


def time_steps(trainer: FDistillTrainer, emas: StudentEMAs, n: int, device: torch.device, repeats: int
               ) -> tuple[float, float, float]:
    """Generator step (with the extra EMAs) and critic step times at batch n, and the peak memory in GiB."""
    x, y = batch_of(trainer, n)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_gen = timed(lambda: (trainer.generator_step(x, y), emas.update(trainer.student)), device, repeats)
    t_crit = timed(lambda: trainer.critic_step(x, y), device, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return t_gen, t_crit, peak


def step_flops(trainer: FDistillTrainer, n: int) -> tuple[int, int]:
    x, y = batch_of(trainer, n)
    flops = []
    for fn in (trainer.generator_step, trainer.critic_step):
        with FlopCounterMode(display=False) as fc, eager_norms():  # the same model FLOPs, counted op by op
            fn(x, y)
        flops.append(fc.get_total_flops())
    return flops[0], flops[1]


def step_flops_per_image(trainer: FDistillTrainer, n: int) -> float:
    """Model FLOPs of one iteration (1 generator + K-1 critic steps, averaged) per image at batch n."""
    f_gen, f_crit = step_flops(trainer, n)
    k = trainer.config.student_update_freq
    return (f_gen + (k - 1) * f_crit) / k / n


def time_variant(args: argparse.Namespace, device: torch.device, teacher: torch.nn.Module, settings: dict,
                 batch: int, k: int, js_rkl: bool = True) -> dict:
    """A fresh trainer with ``settings`` on a copy of ``teacher``, measured at ``batch`` (:func:`measure_variant`:
    two warm-up step pairs after compilation, one without), with its JS-vs-reverse-KL overhead if ``js_rkl`` and
    ``--variant-js-rkl`` ask for it."""
    from torch._dynamo.utils import counters

    counters.clear()
    trainer, emas = build(args, device, settings, copy.deepcopy(teacher))
    torch.manual_seed(1)  # the same real batch for every variant
    x, y = batch_of(trainer, batch)
    compiled = trainer.config.compile != "none"
    res = measure_variant(trainer, emas, x, y, device, args.variant_repeats, warmup=2 if compiled else 1)
    res["settings"] = settings
    if compiled:  # graphs compiled, and graphs that inductor ran without CUDA graphs (it says why on stderr)
        res["graphs"] = counters["stats"]["unique_graphs"]
        if trainer.config.cuda_graphs:
            res["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    if js_rkl and (args.variant_js_rkl == "all" or (args.variant_js_rkl == "uncompiled" and not compiled)):
        js_weighting = trainer.weighting
        trainer.weighting = FDistillWeighting.from_config(trainer.config, "rkl").to(device)
        trainer.generator_step(x, y)  # a compiled step compiles again: the weighting is part of its graph
        rkl = timed(lambda: trainer.generator_step(x, y), device, args.variant_repeats, warmup=1)
        trainer.weighting = js_weighting
        js = min(res["generator_step_s"], timed(lambda: trainer.generator_step(x, y), device, args.variant_repeats))
        res.update(js_gen_s=js, rkl_gen_s=rkl, js_overhead=(js - rkl) / (rkl + (k - 1) * res["critic_step_s"]))
    res["first_logs"] = {key: v for key, v in res["first_logs"].items() if key in COMPARED}
    return res


def variant_row(vname: str, r: dict) -> str:
    """One printed line of a variant's figures."""
    text = (f"{vname}: batch {r['batch']}, generator {r['generator_step_s'] * 1e3:.0f} ms, critic "
            f"{r['critic_step_s'] * 1e3:.0f} ms, iteration {r['iteration_s'] * 1e3:.0f} ms, {r['images_per_s']:.0f} "
            f"images/s, peak " + (f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] == r["peak_memory_gib"]
                                  else "n/a") + ", MFU "
            + (f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a (unknown peak)")
            + f", compile {r['compile_s']:.0f} s"
            + (f" ({r['graphs']} graphs" if "graphs" in r else "")
            + (f", {r['cudagraph_skips']} without CUDA graphs" if "cudagraph_skips" in r else "")
            + (")" if "graphs" in r else ""))
    if "max_rel_diff_vs_eager" in r:
        text += f"; first steps vs eager: max rel. diff {r['max_rel_diff_vs_eager']:.1e} ({r['max_rel_diff_key']})"
    if "js_overhead" in r:
        text += f"; JS vs reverse KL {100 * r['js_overhead']:+.2f}% of the iteration"
    if "overhead_vs_single" in r:
        s = r["single_micro_batch"]
        text += (f"; vs {MICRO_BATCHES} x one micro-batch of {s['batch']} ({s['iteration_s'] * 1e3:.0f} ms per "
                 f"iteration): {100 * r['overhead_vs_single']:+.1f}%")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--preset", default="imagenet64", choices=sorted(PRESET_NETWORKS),
                   help="training recipe and its EDM network (default imagenet64)")
    p.add_argument("--tiny", action="store_true", help="tiny network and preset (code-path test on CPU)")
    p.add_argument("--teacher", default="", help="real EDM teacher pickle instead of random weights")
    p.add_argument("--start-batch", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--batch", type=int, default=0, help="skip the search and use this per-GPU batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-gib", type=float, default=0.0,
                   help="cap on the GPU memory PyTorch may use (0: all), e.g. 79 to emulate an 80 GB H100")
    p.add_argument("--compile-norms", action="store_true", help="train with compile_norms (fused GroupNorm+SiLU)")
    p.add_argument("--skip", default="", help=f"comma-separated stages to leave out: {', '.join(SKIPPABLE)}")
    p.add_argument("--ab-batch", type=int, default=64, help="batch of the A/B timings of stage 6 (0: skip them)")
    p.add_argument("--profile", type=int, default=0, help="print the N costliest operators of one step pair")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s if the GPU is not known")
    p.add_argument("--json", default="", help="also write the figures to this JSON file (after every stage)")
    p.add_argument("--variants", default="", help="step variants to time side by side with the eager step, "
                   f"comma-separated, or all: {', '.join(VARIANTS)} (default: none)")
    p.add_argument("--variant-batch", type=int, default=0,
                   help="per-GPU batch of the variants (default: the batch of stage 2), e.g. one that only a "
                        "compiled variant fits")
    p.add_argument("--variant-repeats", type=int, default=3, help="timed step pairs per variant")
    p.add_argument("--variant-js-rkl", default="uncompiled", choices=("none", "uncompiled", "all"),
                   help="variants whose JS-vs-reverse-KL overhead is measured (a compiled one compiles again)")
    p.add_argument("--micro-batch", type=int, default=0,
                   help=f"per-GPU micro-batch of the microbatch variant (x {MICRO_BATCHES}; default 128, tiny 2)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of compiled variants "
                   "(e.g. aot_eager: graph capture without code generation, to test the code path quickly)")
    args = p.parse_args(argv)
    try:
        variant_names, cuda_only = parse_variants(args.variants, torch.device(args.device)) if args.variants \
            else ([], [])
    except ValueError as exc:
        print(f"error: --variants: {exc}", file=sys.stderr)
        return 2
    speed.BACKEND = args.compile_backend
    skip = {t.strip() for t in args.skip.split(",") if t.strip()}
    if skip - set(SKIPPABLE):
        print(f"error: --skip takes stages among {', '.join(SKIPPABLE)}; got {', '.join(sorted(skip))}",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU (use --device cpu --tiny to test the script)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    total = float("nan")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        if args.memory_gib:
            if not 0 < args.memory_gib <= total:
                print(f"error: --memory-gib must be in (0, {total:.1f}]; got {args.memory_gib}", file=sys.stderr)
                return 2
            torch.cuda.set_per_process_memory_fraction(args.memory_gib / total, device.index or 0)
            total = args.memory_gib
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    t_start = time.perf_counter()
    figures: dict[str, object] = {"device": name, "torch": torch.__version__, "memory_cap_gib": args.memory_gib or None,
                                  "preset": "tiny" if args.tiny else args.preset,
                                  "compile_norms": args.compile_norms}
    failed: list[str] = []

    def save() -> None:
        figures["wall_s"] = time.perf_counter() - t_start
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(figures, indent=2))

    def stage(label: str, fn: Callable[[], None]) -> None:
        if label in skip:
            print("   skipped (--skip)", flush=True)
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # report, and go on with the next stage
            failed.append(label)
            figures.setdefault("errors", {})[label] = f"{type(exc).__name__}: {exc}"  # type: ignore[index]
            print(f"   FAILED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
        print(f"   ({label}: {time.perf_counter() - t0:.0f} s)", flush=True)
        save()

    trainer, emas = build(args, device)
    k = trainer.config.student_update_freq
    print(f"device {name}, torch {torch.__version__}; preset {'tiny' if args.tiny else args.preset}, "
          f"{trainer.teacher.model_type} with {count_parameters(trainer.teacher) / 1e6:.1f}M "
          f"parameters x3 (teacher, student, fake score) + EMAs {[trainer.config.ema_beta, *emas.betas]}; precision "
          f"{trainer.config.precision}, divergence {trainer.config.divergence}, K = {k}; compile_norms "
          f"{trainer.config.compile_norms}"
          + (f"; memory capped at {args.memory_gib:g} GiB" if args.memory_gib else ""), flush=True)

    print("1. largest per-GPU batch (generator + critic step):", flush=True)
    n = args.batch or search_batch(trainer, device, args.start_batch, args.max_batch)
    if device.type == "cuda":  # as in training; after the search, so cuDNN autotunes only the sizes that are timed
        torch.backends.cudnn.benchmark = True
    sizes = [n]
    smaller = n * 4 // 5 // 8 * 8  # near the memory limit a smaller batch can be faster per image
    if not args.batch and 0 < smaller < n:
        sizes.append(smaller)
    timings = {}
    for i, b in enumerate(sizes):
        t_gen, t_crit, peak = time_steps(trainer, emas, b, device, args.repeats)
        t_iter = (t_gen + (k - 1) * t_crit) / k
        timings[b] = {"generator_step_s": t_gen, "critic_step_s": t_crit, "iteration_s": t_iter,
                      "images_per_s": b / t_iter, "peak_memory_gib": peak}
        print(f"{'2.' if i == 0 else '  '} batch {b}: generator step {t_gen * 1e3:.0f} ms, critic step "
              f"{t_crit * 1e3:.0f} ms, iteration (1 generator + {k - 1} critic)/{k} = {t_iter * 1e3:.0f} ms, "
              f"{b / t_iter:.0f} images/s per GPU; peak memory {peak:.1f} of {total:.1f} GiB", flush=True)
    n = max(timings, key=lambda b: timings[b]["images_per_s"])
    if len(timings) > 1:
        print(f"   fastest per image: batch {n} (a good per_gpu_batch); the stages below use it", flush=True)
    t_gen, t_crit, t_iter = (timings[n][key] for key in ("generator_step_s", "critic_step_s", "iteration_s"))
    figures.update({"largest_batch": None if args.batch else sizes[0], "batch_per_gpu": n, **timings[n],
                    "batches": {str(b): v for b, v in timings.items()}})
    save()
    x, y = batch_of(trainer, n)

    def network_passes() -> None:
        passes = pass_times(trainer, n, device, args.repeats)
        weight = {key: (1 if "(generator)" in key or key == "AdamW student" else k - 1) for key in passes}
        cycle = {key: passes[key] * weight[key] for key in passes}
        s = sum(cycle.values())
        for key, v in cycle.items():
            print(f"   {key:45s} {passes[key] * 1e3:8.1f} ms x{weight[key]}  {100 * v / s:5.1f}%")
        print(f"   sum {s * 1e3:.0f} ms per cycle vs measured {k * t_iter * 1e3:.0f} ms "
              "(the rest: EMA, losses, ratio maths, random numbers, launch gaps)", flush=True)
        figures["passes_s"] = passes

    def js_vs_rkl() -> None:
        weightings = {d: FDistillWeighting.from_config(trainer.config, d).to(device) for d in ("js", "rkl")}
        gen_t: dict[str, list[float]] = {"js": [], "rkl": []}
        for _ in range(2):
            for d in ("js", "rkl"):
                trainer.weighting = weightings[d]
                gen_t[d].append(timed(lambda: trainer.generator_step(x, y), device, args.repeats))
        js, rkl = min(gen_t["js"]), min(gen_t["rkl"])
        overhead = (js - rkl) / (rkl + (k - 1) * t_crit)
        print(f"   generator step: JS {js * 1e3:.1f} ms, reverse KL {rkl * 1e3:.1f} ms; JS overhead on the iteration "
              f"{100 * overhead:+.2f}% (target < 3%)", flush=True)
        figures.update({"js_gen_s": js, "rkl_gen_s": rkl, "js_overhead": overhead})

    def utilisation() -> None:
        f_gen, f_crit = step_flops(trainer, n)
        f_iter = (f_gen + (k - 1) * f_crit) / k
        figures["flops_per_image"] = f_iter / n
        achieved = f_iter / t_iter
        pk = peak_flops(name, args.peak_tflops)
        mfu = achieved / pk if pk else None
        print(f"   FLOPs: generator step {f_gen / 1e12:.2f} T, critic step {f_crit / 1e12:.2f} T, per iteration "
              f"{f_iter / 1e12:.2f} T; achieved {achieved / 1e12:.1f} TFLOP/s"
              + (f"; MFU {100 * mfu:.1f}% of {pk / 1e12:.0f} TFLOP/s bf16 peak (target >= 35%)" if mfu else
                 "; MFU: unknown GPU peak (pass --peak-tflops)"), flush=True)
        figures.update({"flops_per_iteration": f_iter, "achieved_tflops": achieved / 1e12, "mfu": mfu})

    def student_ab() -> None:
        ab = ab_student(trainer, min(args.ab_batch, n), device, args.repeats)
        print("   " + "; ".join(f"{key} {v * 1e3:.1f} ms" if isinstance(v, float) else f"{key} {v}"
                                for key, v in ab.items() if key != "batch") + f" (batch {ab['batch']})", flush=True)
        figures["student_fwd_bwd_ab_s"] = ab

    print("3. network passes, isolated at the same batch (share of their sum over one K-cycle):", flush=True)
    stage("passes", network_passes)
    print("4. JS vs reverse KL (generator step; the discriminator is trained in both):", flush=True)
    stage("js_vs_rkl", js_vs_rkl)
    print("5. model FLOPs utilisation:", flush=True)
    stage("mfu", utilisation)
    if args.ab_batch:
        print("6. student forward+backward A/B (speed settings, one at a time):", flush=True)
        stage("student_ab", student_ab)

    def profile() -> None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            trainer.generator_step(x, y)
            trainer.critic_step(x, y)
            sync(device)
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=args.profile, max_name_column_width=60)
        print(table, flush=True)
        figures["profile_table"] = table

    if args.profile:
        print(f"7. the {args.profile} costliest operators of one generator + one critic step:", flush=True)
        stage("profile", profile)

    if variant_names:
        teacher = trainer.teacher  # each variant trains a fresh trainer on a copy of it
        trainer = emas = None  # free the first trainer's memory for the variants
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        micro = args.micro_batch or (2 if args.tiny else 128)
        pk = peak_flops(name, args.peak_tflops)
        results: dict[str, dict] = figures.setdefault("variants", {})  # type: ignore[assignment]
        for skipped in cuda_only:
            results[skipped] = {"skipped": "needs a CUDA device"}
        print(f"8. step variants at batch {args.variant_batch or n}, each a fresh trainer from the same initial state ("
              + ", ".join(f"{v}: {VARIANTS[v] or 'preset as is'}" for v in variant_names if v != "microbatch")
              + (f"; microbatch: {MICRO_BATCHES} x {micro} with accumulation" if "microbatch" in variant_names else "")
              + (f"; left out, they need CUDA: {', '.join(cuda_only)}" if cuda_only else "") + "):", flush=True)

        def run_variant(vname: str) -> None:
            settings, b = dict(VARIANTS[vname]), args.variant_batch or n
            if vname == "microbatch":
                settings["accum_steps"], b = MICRO_BATCHES, MICRO_BATCHES * micro
            res = time_variant(args, device, teacher, settings, b, k, js_rkl=vname != "microbatch")
            if vname == "microbatch":  # against eager steps on one micro-batch
                single = time_variant(args, device, teacher, {}, micro, k, js_rkl=False)
                res["single_micro_batch"] = {key: v for key, v in single.items() if key != "first_logs"}
                res["overhead_vs_single"] = res["iteration_s"] / (MICRO_BATCHES * single["iteration_s"]) - 1
            elif vname != "eager":
                res["max_rel_diff_vs_eager"], res["max_rel_diff_key"] = compare_logs(
                    res["first_logs"], results["eager"]["first_logs"])
            if "flops_per_image" not in figures:  # the eager step's model FLOPs (stage 5 skipped or failed)
                tr, _ = build(args, device, {}, copy.deepcopy(teacher))
                figures["flops_per_image"] = step_flops_per_image(tr, args.variant_batch or n)
                del tr
            achieved = figures["flops_per_image"] * res["images_per_s"]  # type: ignore[operator]
            res["mfu"] = achieved / pk if pk else None
            results[vname] = res
            print("   " + variant_row(vname, res), flush=True)

        for vname in variant_names:
            stage(f"variant {vname}", lambda vname=vname: run_variant(vname))
            gc.collect()
            torch._dynamo.reset()  # free the variant's compiled graphs (and CUDA graph pools)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base = results.get("eager", {}).get("images_per_s")
        if base:
            print("   images/s against eager: " + ", ".join(
                f"{v} {r['images_per_s'] / base:.2f}x" for v, r in results.items() if "images_per_s" in r), flush=True)
    save()
    print(f"total {figures['wall_s']:.0f} s" + (f"; failed stages: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
