"""Write notebooks/05_imagenet.ipynb from the cell sources below.

Usage: python scripts/build_notebook_05.py && nbstripout notebooks/05_imagenet.ipynb
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "notebooks" / "05_imagenet.ipynb"

TITLE = r"""# 05 · ImageNet-64: distributed f-distill of the EDM teacher (GPU)

Paper: Xu, Nie, Vahdat, *One-step Diffusion Models with f-Divergence Distribution Matching* (arXiv 2502.15681),
Table 3: JS gives FID **1.16** on ImageNet-64 in one step (reverse KL / DMD2: 1.27; the authors' public
FastGen implementation reports 1.11). Prerequisite: notebook 04 (the same trainer on digits).

This notebook launches the package's real training program, `python -m fdistill_lab.train`, on one GPU or,
with `gpus > 1`, through `torchrun` (DDP over NCCL), and follows it: a progress bar, the sample grid of the
EMA student as it is written, FID at intervals, then the loss, ratio and throughput curves from the run's
JSONL log. Rerunning with the same `output_dir` **resumes** from the last checkpoint (step counter, RNG
states of every rank, ratio bins, optimiser states); interrupting the kernel makes the run save a
checkpoint first.

**Budget.** The full run needs CUDA GPUs: paper length 380k iterations at batch 512 is a multi-GPU job (see
`docs/imagenet64_training.md` for the downloads, commands and time estimates). Without a GPU the first code
cell stops, unless `-p smoke True`: then the *whole pipeline* runs on the CPU in well under a minute with
the `tiny` preset, a tiny **random** ADM teacher, a synthetic EDM-format zip and a stand-in FID detector,
all written on the fly. Smoke numbers only show that the pipeline works; they say nothing about image quality.

Command line: `papermill notebooks/05_imagenet.ipynb out.ipynb -p div js -p gpus 8`. Any other setting of the
preset goes in `overrides` as `key=value` pairs separated by `;`, e.g. `-p overrides "lr=1e-6; bin_ema=0.0"`
(all names and the `lr` alias: `python -m fdistill_lab.train --preset imagenet64 --describe`)."""

PARAMS = """\
div: str = "js"  # divergence (rkl, srkl, js, sh, fkl, jeffreys, neyman, pearson, alpha)
preset: str = "imagenet64"  # imagenet64 (paper Table 5), dmd2 (DMD2 recipe), cifar10 or tiny
teacher_path: str = "../downloads/edm/edm-imagenet-64x64-cond-adm.pkl"  # EDM teacher pickle (relative to notebooks/)
data_path: str = "../datasets/imagenet-64x64.zip"  # EDM-format ImageNet-64 zip (prepare_imagenet)
fid_detector: str = "../downloads/edm/inception-2015-12-05.pt"  # TorchScript Inception detector
fid_ref: str = "../downloads/edm/imagenet-64x64.npz"  # EDM FID reference statistics
batch_size: int = 512  # global batch over all GPUs (paper 512); gradient accumulation fills per_gpu_batch
per_gpu_batch: int = 0  # micro-batch per GPU (0: the preset's, 64 for imagenet64)
steps: int = 380000  # total iterations (generator and critic steps; paper 380k)
gpus: int = 0  # GPUs to use (0: all visible; more than 1 launches torchrun)
sample_every: int = 2000  # iterations between sample grids
fid_every: int = 20000  # iterations between FID evaluations (0: off)
fid_images: int = 50000  # images per FID evaluation (EDM protocol: 50000)
overrides: str = ""  # more settings of the preset; syntax in the title cell
seed: int = 0  # seeds weights of the discriminator heads, noise and data order
smoke: bool = False  # CPU smoke run of the whole pipeline (tiny preset, synthetic data); never skips cells
output_dir: str = "outputs/05_imagenet"  # run folder (checkpoints, logs, samples) and results.json"""

SETUP = '''from fdistill_lab.dist import require_cuda_or_smoke

require_cuda_or_smoke(smoke)  # first of all: the real run needs a CUDA GPU (or -p smoke True)

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, Markdown, display

from fdistill_lab import launch, presets, smoke_assets
from fdistill_lab.notebook import setup_notebook
from fdistill_lab.records import record
from fdistill_lab.train_io import read_json, read_jsonl


def validate(p: dict) -> None:
    launch.check_inputs(p["preset"], p["div"], {})  # names (ValueError listing the valid ones)
    for name in ("batch_size", "steps", "fid_images"):
        if p[name] < 1:
            raise ValueError(f"{name} must be >= 1; got {p[name]}")
    for name in ("per_gpu_batch", "gpus", "sample_every", "fid_every"):
        if p[name] < 0:
            raise ValueError(f"{name} must be >= 0; got {p[name]}")
    launch.overrides_from_text(p["overrides"])
    if not p["smoke"]:  # the files of the real run, with what to download and where
        files = {"teacher": p["teacher_path"], "data": p["data_path"]}
        if p["fid_every"]:
            files.update(fid_detector=p["fid_detector"], fid_ref=p["fid_ref"])
        launch.check_inputs(p["preset"], p["div"], files)


cfg = setup_notebook(globals(), validate=validate)'''

INPUTS_MD = r"""## 1. Inputs and settings

The real run reads the EDM ImageNet-64 teacher (`edm-imagenet-64x64-cond-adm.pkl`, 296M parameters), EDM's
ImageNet-64 zip, the Inception detector and EDM's FID reference statistics (the first cell checked that they
exist). The smoke run writes stand-ins in the same formats into `output_dir/smoke_assets`. The settings
are the preset's (`fdistill_lab.presets`, paper Table 5 for `imagenet64`) plus this notebook's parameters;
`presets.resolve` validates every value."""

INPUTS = '''if cfg.smoke:
    assets = smoke_assets.make_smoke_assets(cfg.output_dir / "smoke_assets")
    run_preset = "tiny"
    teacher, data, detector, ref = assets["teacher"], assets["data"], assets["detector"], assets["ref"]
else:
    run_preset = preset
    teacher, data, detector, ref = teacher_path, data_path, fid_detector, fid_ref

visible = torch.cuda.device_count()
n_procs = 1 if cfg.smoke else (gpus or visible)
if n_procs > max(visible, 1):
    raise ValueError(f"gpus={gpus} but only {visible} CUDA device(s) are visible")

settings = {
    "divergence": div,
    "seed": seed,
    "batch_size": cfg.pick(full=batch_size, smoke=8),
    "steps": cfg.pick(full=steps, smoke=6),
    "sample_every": cfg.pick(full=sample_every, smoke=3),
    "fid_every": cfg.pick(full=fid_every, smoke=3),
    "fid_images": cfg.pick(full=fid_images, smoke=32),
    "fid_detector": str(detector),
    "fid_ref": str(ref),
}
if per_gpu_batch and not cfg.smoke:
    settings["per_gpu_batch"] = per_gpu_batch
settings.update(launch.overrides_from_text(overrides))
dcfg, rcfg = presets.resolve(run_preset, settings)  # ValueError naming a bad key or value
run_dir = cfg.output_dir / "run"
print(f"preset {run_preset}: {presets.PRESETS[run_preset].description}")
k = dcfg.student_update_freq
print(f"{n_procs} process(es) on {'cuda' if visible else 'cpu'}; global batch {rcfg.batch_size}, "
      f"{rcfg.steps} iterations (K = {k}: {rcfg.steps // k} student steps)")
print(f"divergence {dcfg.divergence}, lr {dcfg.lr_student:g}, GAN weight {dcfg.gan_weight_gen:g}, "
      f"bin EMA {dcfg.bin_ema}, ratio clip [{dcfg.ratio_min}, {dcfg.ratio_max}], "
      f"discriminator on the {dcfg.disc_placement}'s {dcfg.disc_features}, precision {dcfg.precision}")'''

TRAIN_MD = r"""## 2. Train

One child process (`python -m fdistill_lab.train`) or `torchrun --standalone --nproc_per_node gpus`. The
command is printed: paste it into a terminal (or a cluster job) to run the same thing outside Jupyter.
Each rank holds `batch_size / gpus` images; micro-batches of `per_gpu_batch` are accumulated. The networks
run in bf16 autocast on GPUs while the ratio $r = e^{\text{logit}}$, the weight $h(r)$ and its two-stage
normalisation stay in fp32. The grid below is replaced each time the run writes a new one (fixed latents
and labels, EMA student)."""

TRAIN = '''cmd = launch.train_command(run_preset, teacher, data, run_dir, settings, gpus=n_procs)
print(" ".join(cmd))
pointer = run_dir / "checkpoints" / "latest.json"
resumed_from = read_json(pointer)["step"] if pointer.is_file() else 0
print(f"resuming from iteration {resumed_from}" if resumed_from else "fresh run")
grid_view = display(Markdown("*waiting for the first sample grid...*"), display_id=True)


def show_grid(path):
    grid_view.update(Image(filename=str(path)))


def show_fid(row):
    print(f"iteration {row['step']}: FID {row['fid']:.4g} ({row['images']} images)")


result = launch.follow(cmd, run_dir, rcfg.steps, on_sample=show_grid, on_fid=show_fid)
print(f"training {result['status']} (log: {result['log']})")'''

CURVES_MD = r"""## 3. What the run measured

Every logged loss comes from `logs/train.jsonl` (means over each log interval): the f-distill surrogate
$\mathcal L_f$ and the GAN generator term on generator steps; the fake score's denoising loss and the
discriminator loss on critic steps; the ratio statistics before normalisation; the global throughput."""

CURVES = '''rows = read_jsonl(run_dir / "logs" / "train.jsonl")
fids = read_jsonl(run_dir / "logs" / "fid.jsonl")


def series(key):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return np.array(pts).T if pts else np.zeros((2, 0))


fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
for ax, keys, title in zip(axes.flat, [("loss_f",), ("loss_gan_g",), ("loss_dsm",), ("loss_d", "disc_acc"),
                                       ("ratio_mean", "ratio_min", "ratio_max", "weight_max"), ("images_per_s",)],
                           ["f-distill surrogate L_f", "GAN generator loss", "fake-score DSM loss",
                            "discriminator loss / accuracy", "ratio r and max weight", "images / s (global)"]):
    for key in keys:
        x, y = series(key)
        ax.plot(x, y, marker=".", label=key)
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.legend(fontsize=8)
axes[1, 1].set_yscale("log")
fig.tight_layout()
plt.show()

if fids:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in fids], [r["fid"] for r in fids], marker="o", label="student (EMA)")
    for name, value in presets.PRESETS[run_preset].paper_fid.items():
        ax.axhline(value, ls="--", lw=1, color="gray")
        ax.annotate(name, (0, value), fontsize=7, va="bottom")
    ax.set_xlabel("iteration")
    ax.set_ylabel("FID")
    ax.set_title(f"FID of the one-step student, {rcfg.fid_images} images")
    plt.show()'''

GRID = '''samples = sorted((run_dir / "samples").glob("*.png"))
if samples:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(plt.imread(samples[-1]), interpolation="nearest")
    ax.set_title(f"EMA student, one step: {samples[-1].stem}")
    ax.axis("off")
    plt.show()'''

RECORD = '''metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
config = read_json(run_dir / "config.json")
tail = rows[-max(1, len(rows) // 4):]
record(cfg.output_dir, "run", {
    "status": result["status"], "preset": run_preset, "divergence": dcfg.divergence, "smoke": cfg.smoke,
    "steps_done": rows[-1]["step"] if rows else 0, "world_size": config["world_size"], "device": config["device"],
    "batch_size": rcfg.batch_size, "accum_steps": config["accum_steps"], "resumed_from": config["resumed_from"],
})
_ = record(cfg.output_dir, "metrics", {
    "last_fid": metrics.get("last", {}).get("fid"), "best_fid": metrics.get("best", {}).get("fid"),
    "best_step": metrics.get("best", {}).get("step"), "fid_evaluations": len(fids),
    "images_per_s": float(np.mean([r["images_per_s"] for r in tail])) if tail else None,
    "final_loss_f": next((r["loss_f"] for r in reversed(rows) if "loss_f" in r), None),
    "final_ratio_mean": next((r["ratio_mean"] for r in reversed(rows) if "ratio_mean" in r), None),
    "sample_grids": len(samples),
})'''

RESULTS_MD = r"""## 4. Reading the numbers

* **Smoke run** (`-p smoke True`): the teacher is random and the FID detector a random projection, so the FID
  and the losses only prove that every stage ran (data sharding, generator and critic steps, ratio
  normalisation, EMA, checkpoints, grids, FID, records); they are not comparable with anything.
* **Full run**: compare the best FID with the paper's Table 3 (JS 1.16, forward KL 1.21, reverse KL / DMD2 1.27)
  and with FastGen's 1.11. Use 50,000 images (EDM protocol) and report which EMA was evaluated (this run
  evaluates the trainer's `ema_beta`, 0.9999 for `imagenet64`; the other EMAs are saved in the checkpoints).
  Expect ±0.05-0.1 FID between seeds. The paper's extra fine-tuning stage at lr 5e-7 is not part of the preset
  (resume with `overrides='lr=5e-7'` in a new `output_dir` seeded from the checkpoint to try it).
* `scripts/gpu_check.sh` measures throughput and memory on one GPU: on an H200 capped at an H100's 79 GiB,
  214 images/s at batch 160 (22.5% MFU) and 173 images/s at this preset's 64 per GPU (README, GPU section), so
  about 39 h for the 380k iterations on 8 such GPUs (docs/imagenet64_training.md).

**Questions.** (1) With `gpus=8` and `batch_size=512`, how many images does one GPU hold, and what does
`per_gpu_batch=32` change? (2) Why must every rank see the *global* batch mean of $h$ and the global per-bin
ratio means, and where does the code all-reduce them? (3) Rerun with `preset='dmd2'` and `div='rkl'`: which
settings change besides the divergence (compare `python -m fdistill_lab.train --preset dmd2 --describe`)?"""


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [
        new_markdown_cell(TITLE),
        new_code_cell(PARAMS, metadata={"tags": ["parameters"]}),
        new_code_cell(SETUP),
        new_markdown_cell(INPUTS_MD),
        new_code_cell(INPUTS),
        new_markdown_cell(TRAIN_MD),
        new_code_cell(TRAIN),
        new_markdown_cell(CURVES_MD),
        new_code_cell(CURVES),
        new_code_cell(GRID),
        new_code_cell(RECORD),
        new_markdown_cell(RESULTS_MD),
    ]
    return nb


if __name__ == "__main__":
    nbformat.write(build(), OUT)
    print(f"wrote {OUT}")
