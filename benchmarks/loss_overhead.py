"""Overhead of the f-distill weighting over plain reverse KL (DMD2) in one generator loss.

Times, on a 64x3x64x64 batch on the CPU, the generator loss and its backward pass into x:
  rkl   : fdistill_loss(x, x0_fake, x0_teacher)                   (DMD2's update)
  fdiv  : logits -> ratio -> stage-1 bins -> h -> stage-2 mean -> fdistill_loss(..., weights=h)
and prints medians of repeated runs and their ratio. Issue target: overhead under 5%.

    python benchmarks/loss_overhead.py [--div js] [--repeats 200] [--batch 64] [--res 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fdistill_lab import edm
from fdistill_lab.losses import FDistillWeighting, fdistill_loss


def _time(fn, repeats: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--div", default="js")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.res, args.res)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    x0_fake = torch.randn(shape, generator=g)
    x0_teacher = torch.randn(shape, generator=g)
    logits = torch.randn(args.batch, generator=g)
    sigma = edm.sample_sigma_grid(args.batch, generator=g).float()
    weighting = FDistillWeighting(args.div, normalize_ratio=True, normalize_weight=True, bin_ema=0.5)

    def rkl() -> None:
        fdistill_loss(x, x0_fake, x0_teacher).backward()
        x.grad = None

    def fdiv() -> None:
        h, _ = weighting(logits, sigma)
        fdistill_loss(x, x0_fake, x0_teacher, weights=h).backward()
        x.grad = None

    # interleave the two so drifts in machine load hit both alike
    t_rkl, t_f = [], []
    for _ in range(4):
        t_rkl += _time(rkl, args.repeats // 4)
        t_f += _time(fdiv, args.repeats // 4)
    m_rkl, m_f = statistics.median(t_rkl), statistics.median(t_f)
    over = (m_f / m_rkl - 1) * 100
    print(f"batch {shape}, torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {len(t_rkl)}")
    print(f"rkl (DMD2) loss+backward : median {m_rkl * 1e3:8.3f} ms")
    print(f"{args.div:5s} weighted         : median {m_f * 1e3:8.3f} ms")
    print(f"ratio {m_f / m_rkl:.4f}  -> overhead {over:+.2f}% (target < 5%)")
    return {"rkl_ms": m_rkl * 1e3, "fdiv_ms": m_f * 1e3, "overhead_pct": over}


if __name__ == "__main__":
    main()
