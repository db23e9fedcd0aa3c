"""GPU check of the text-to-image f-distill trainer (issue 20; not run yet: no GPU so far).

Builds a full-size, randomly initialised SD1.5 U-Net (860M parameters, 64x64 latents, SD1.5's published
configuration written out below; nothing is downloaded) as teacher, student and fake score with the ``sd15`` preset
(bf16 autocast, CFG 1.75 teacher, discriminator on the teacher's 1280x8x8 mid block, R1 gamma 1), random text
embeddings [B, 77, 768] and random latents (the frozen VAE and text encoder only preprocess the data), then prints:

1. the largest per-GPU batch that fits (doubling search over one generator and one critic step; ``--batch``
   skips it), with ``--memory-gib 79`` emulating an 80 GB H100 on a larger GPU;
2. at that batch: generator-step and critic-step time, the iteration time of the K = 10 schedule
   (1 generator + 9 critic steps, averaged per iteration), images/s, peak memory;
3. model FLOPs per iteration (torch.utils.flop_counter) and the MFU against the GPU's dense bf16 peak;
4. the time estimate of the paper's 60k iterations at batch 1024 on 8 such GPUs (per-GPU batch 128, gradient
   accumulation when the largest batch is smaller; linear scaling, communication not included).

``--device cpu --tiny`` runs the same code on the tiny components (tests on machines without a GPU).
``--device meta`` counts the model FLOPs of one generator and one critic step per image without running anything
(shapes only, on PyTorch's meta device: no GPU, no memory) and the lower bound on the paper run's time they imply;
it times nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

_spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).with_name("gpu_check.py"))
_gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gc)  # the EDM check's helpers: GPU peak table, synchronised timing
peak_flops, timed = _gc.peak_flops, _gc.timed

# SD v1.5's U-Net (unet/config.json of stable-diffusion-v1-5): 4-channel 64x64 latents, CLIP ViT-L/14 text (768)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=77, vocab_size=49408)
PAPER_ITERATIONS, PAPER_BATCH, GPUS = 60_000, 1024, 8


def build_components(tiny: bool, pipeline: str = ""):
    """Tiny components, the user's SD1.5 ``pipeline`` folder (real weights), or a random full-size SD1.5 U-Net and
    text encoder (with a tiny VAE: it is not timed)."""
    from fdistill_lab.t2i import tiny as tiny_mod

    if pipeline:
        from fdistill_lab.t2i.loader import load_components

        return load_components(pipeline)

    comps = tiny_mod.tiny_components()
    if tiny:
        return comps
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_mod.tiny_tokenizer(77)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    comps.unet = UNet2DConditionModel(**SD15_UNET).eval()
    comps.text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, eos_token_id=eos, pad_token_id=eos)).eval()
    comps.tokenizer = tok
    comps.source = "random full-size SD1.5 U-Net (scripts/t2i_gpu_check.py)"
    return comps


def make_batch(trainer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = trainer.teacher.img_channels, trainer.teacher.img_resolution
    tokens = trainer.teacher.null_labels(1).shape[1]
    return (torch.randn(n, c, r, r, device=trainer.device) * 0.8,
            torch.randn(n, tokens, trainer.teacher.label_dim, device=trainer.device))


def step_pair(trainer, batch) -> tuple[float, float]:
    t0 = time.perf_counter()
    trainer.generator_step(*batch)
    _gc.sync(trainer.device)
    t1 = time.perf_counter()
    trainer.critic_step(*batch)
    _gc.sync(trainer.device)
    return t1 - t0, time.perf_counter() - t1


def fits(trainer, n: int) -> bool:
    try:
        step_pair(trainer, make_batch(trainer, n))
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        for o in (trainer.opt_student, trainer.opt_fake, trainer.opt_disc):
            o.zero_grad(set_to_none=True)
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()


def count_flops(args: argparse.Namespace, preset: str) -> int:
    """Model FLOPs per image of a generator and a critic step (losses and backward passes, R1 included; no
    optimiser), counted on the meta device, and the paper run's time at 100% of a GPU's bf16 peak."""
    from fdistill_lab.t2i.config import resolve
    from fdistill_lab.t2i.trainer import T2ITrainer

    with torch.device("meta"):
        comps = build_components(args.tiny)
    dcfg, _ = resolve(preset, {"precision": "fp32"})  # the same FLOPs as bf16; autocast has no meta kernels
    trainer = T2ITrainer(comps, dcfg, "meta")
    lat, emb = make_batch(trainer, 1)
    flops = []
    for loss_fn in (lambda: trainer._generator_loss(emb, 1), lambda: trainer._critic_loss(lat, emb)):
        with FlopCounterMode(display=False) as fc:
            loss, _ = loss_fn()
            loss.backward()
        flops.append(fc.get_total_flops())
    k = dcfg.student_update_freq
    per_image = (flops[0] + (k - 1) * flops[1]) / k
    peak = peak_flops("H100", args.peak_tflops)
    bound_h = PAPER_ITERATIONS * PAPER_BATCH * per_image / (GPUS * peak) / 3600
    fig = {"device": "meta (FLOPs counted, nothing run)", "preset": preset, "generator_step_flops_per_image": flops[0],
           "critic_step_flops_per_image": flops[1], "iteration_flops_per_image": per_image,
           "paper_run_flops": PAPER_ITERATIONS * PAPER_BATCH * per_image, "paper_run_hours_at_peak": bound_h,
           "peak_flops": peak}
    print(f"model FLOPs per image: generator step {flops[0] / 1e12:.3f} TFLOP, critic step "
          f"{flops[1] / 1e12:.3f} TFLOP, iteration (K = {k}) {per_image / 1e12:.3f} TFLOP")
    print(f"paper run ({PAPER_ITERATIONS} iterations x {PAPER_BATCH} images): {fig['paper_run_flops']:.3g} FLOP, at "
          f"least {bound_h:.1f} h on {GPUS} GPUs at 100% of {peak / 1e12:.0f} TFLOP/s "
          "(a lower bound, not a measurement)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(fig, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu", "meta"))
    p.add_argument("--tiny", action="store_true", help="tiny components (code-path test on a CPU)")
    p.add_argument("--pipeline", default="", help="a downloaded SD1.5 folder instead of random weights")
    p.add_argument("--batch", type=int, default=0, help="per-GPU batch (0: the largest that fits)")
    p.add_argument("--start-batch", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--memory-gib", type=float, default=0.0, help="cap PyTorch's GPU memory (79: an 80 GB H100)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak TFLOP/s if the GPU is not known")
    p.add_argument("--json", default="", help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU (use --device cpu --tiny to test the script)", file=sys.stderr)
        return 2
    for name in ("batch", "start_batch", "max_batch", "repeats"):
        if getattr(args, name) < (0 if name == "batch" else 1):
            print(f"error: --{name.replace('_', '-')} must be a positive integer", file=sys.stderr)
            return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if args.memory_gib:
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib / total), device.index or 0)
    from fdistill_lab.networks import count_parameters
    from fdistill_lab.t2i.config import resolve
    from fdistill_lab.t2i.trainer import T2ITrainer

    preset = "tiny" if args.tiny else "sd15"
    if device.type == "meta":
        return count_flops(args, preset)
    dcfg, _ = resolve(preset, {"gradient_checkpointing": args.gradient_checkpointing,
                               **({"precision": "bf16"} if device.type == "cuda" else {})})
    trainer = T2ITrainer(build_components(args.tiny, args.pipeline), dcfg, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fig: dict[str, object] = {"device": name, "torch": torch.__version__, "preset": preset,
                              "weights": trainer.components.source,
                              "unet_parameters": count_parameters(trainer.student),
                              "gradient_checkpointing": args.gradient_checkpointing,
                              "memory_cap_gib": args.memory_gib or None, "precision": dcfg.precision}
    print(f"{name}: {preset}, U-Net {fig['unet_parameters'] / 1e6:.1f}M parameters, {dcfg.precision}, "
          f"latents {trainer.teacher.img_resolution}x{trainer.teacher.img_resolution}", flush=True)

    n = args.batch
    if not n:
        n, lo = 0, args.start_batch
        while lo <= args.max_batch and fits(trainer, lo):
            n, lo = lo, lo * 2
        if not n:
            print(f"error: batch {args.start_batch} does not fit", file=sys.stderr)
            return 1
    print(f"1. batch per GPU {n}" + ("" if args.batch else " (largest power of two that fits)"), flush=True)
    batch = make_batch(trainer, n)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_gen = timed(lambda: trainer.generator_step(*batch), device, args.repeats)
    t_crit = timed(lambda: trainer.critic_step(*batch), device, args.repeats)
    k = dcfg.student_update_freq
    t_iter = (t_gen + (k - 1) * t_crit) / k
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    fig.update(batch_per_gpu=n, generator_step_s=t_gen, critic_step_s=t_crit, iteration_s=t_iter,
               images_per_s=n / t_iter, peak_memory_gib=peak)
    print(f"2. generator step {t_gen:.3f} s, critic step {t_crit:.3f} s, iteration (K = {k}) {t_iter:.3f} s, "
          f"{n / t_iter:.1f} images/s" + (f", peak memory {peak:.1f} GiB" if peak is not None else ""), flush=True)

    flops = []
    for fn in (trainer.generator_step, trainer.critic_step):
        with FlopCounterMode(display=False) as fc:
            fn(*batch)
        flops.append(fc.get_total_flops())
    per_iter = (flops[0] + (k - 1) * flops[1]) / k
    pk = peak_flops(name, args.peak_tflops)
    mfu = per_iter / t_iter / pk if pk else None
    fig.update(flops_per_iteration=per_iter, mfu=mfu)
    print(f"3. model FLOPs per iteration {per_iter / 1e12:.2f} TFLOP ({per_iter / t_iter / 1e12:.1f} TFLOP/s)"
          + (f", MFU {100 * mfu:.1f}% of {pk / 1e12:.0f} TFLOP/s" if mfu else ", MFU: unknown peak"), flush=True)

    per_gpu = PAPER_BATCH // GPUS
    accum = -(-per_gpu // n)
    hours = PAPER_ITERATIONS * accum * t_iter * (per_gpu / (accum * n)) / 3600
    fig.update(paper_run_estimate_h=hours, paper_run_accum_steps=accum)
    print(f"4. estimate: {PAPER_ITERATIONS} iterations at batch {PAPER_BATCH} on {GPUS} such GPUs "
          f"({per_gpu} per GPU, {accum} micro-batch(es)): {hours:.1f} h (linear scaling, no communication)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(fig, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
