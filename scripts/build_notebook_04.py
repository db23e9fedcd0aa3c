"""Write notebooks/04_digits.ipynb from the cell sources below.

Usage: python scripts/build_notebook_04.py && nbstripout notebooks/04_digits.ipynb
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "notebooks" / "04_digits.ipynb"

TITLE = r"""# 04 · One-step image generation on real digits, on a CPU

Paper: Xu, Nie, Vahdat, *One-step Diffusion Models with f-Divergence Distribution Matching* (arXiv 2502.15681).
Prerequisites: notebooks 01 (the weight $h(r) = r^2 f''(r)$) and 02 (the f-distill loop on a toy).

The full image pipeline of the paper, small enough for a laptop: scikit-learn's 1,797 grey 8×8 digits
(10 classes, offline). The code is the library's image trainer `fdistill_lab.distill.FDistillTrainer`, the
same one the ImageNet-64 run uses.

**Goals.** After this notebook you can
1. train a small class-conditional EDM teacher (ADM U-Net with EDM preconditioning) and sample it with the
   18-step Heun sampler (35 network evaluations);
2. distil it into a one-step student with f-distill: student and fake score initialised from the teacher,
   discriminator heads on the teacher's encoder features, ratio $r = e^{\text{logit}}$, weight $h(r)$ with the
   two-stage normalisation, critic and generator steps on an explicit schedule;
3. measure what a one-step student keeps and loses, per divergence: class coverage, class-frequency error,
   a Fréchet distance and precision/recall in the feature space of a digit classifier, and speed.

**Budget** (2-core CPU, 2 threads): classroom defaults (`div="js"`) 106 s measured on the idle machine with
the teacher trained from scratch (3 min while other jobs shared it; about 1 min with the cache); `-p div all`
(reverse KL, JS, forward KL) 2.4 min (6-9 min on the shared machine); smoke (`-p smoke True`) 24 s. The teacher
is cached in `output_dir` by a hash of its configuration and data (`-p retrain_teacher True` retrains).
Command line: `papermill notebooks/04_digits.ipynb out.ipynb -p div all`."""

PARAMS = """\
div: str = "js"  # divergence (rkl, srkl, js, sh, fkl, jeffreys, neyman, pearson, alpha) or 'all' (rkl, js, fkl)
steps: int = 300  # distillation iterations per divergence (generator and critic steps together)
teacher_steps: int = 600  # EDM training steps of the teacher (cached by configuration in output_dir)
retrain_teacher: bool = False  # ignore a cached teacher and train it again
student_update_freq: int = 3  # K: iteration i updates the student when i mod K is 0, else the critic (K-1 : 1)
gan_weight: float = 0.01  # weight of the GAN generator loss (0: ratio-only mode, the discriminator still trains)
disc_placement: str = "teacher"  # discriminator heads on the frozen 'teacher' features or on the 'fake_score'
lr: float = 0.001  # AdamW learning rate of student, fake score and discriminator
batch_size: int = 64  # real images per iteration
eval_samples: int = 1000  # samples per model for the metrics
seed: int = 0  # seeds data split, teacher, classifier, trainers and evaluation noise
smoke: bool = False  # shrink sizes for CI (never skips cells)
output_dir: str = "outputs/04_digits"  # results.json, figures, cached teacher and student checkpoints"""

SETUP = '''import time

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display

from fdistill_lab import digit_metrics as dm
from fdistill_lab import divergences
from fdistill_lab.data.digits import BatchSampler, load_digits
from fdistill_lab.distill import DistillConfig, FDistillTrainer, fit
from fdistill_lab.edm import heun_sampler
from fdistill_lab.image_grid import make_grid
from fdistill_lab.networks import count_parameters, tiny_adm_config
from fdistill_lab.notebook import setup_notebook
from fdistill_lab.records import record
from fdistill_lab.teacher_training import TeacherConfig, load_or_train_teacher

ALL = ["rkl", "js", "fkl"]  # what div='all' compares (mode-seeking, medium, mass-covering)


def resolve_divs(name: str) -> list[str]:
    return list(ALL) if name.strip().lower() == "all" else [divergences.canonical_name(name)]


def distill_config(p: dict, name: str) -> DistillConfig:
    """The trainer settings of this notebook; DistillConfig validates them (clear errors)."""
    return DistillConfig(divergence=name, student_update_freq=p["student_update_freq"], lr_student=p["lr"],
                         lr_fake=p["lr"], lr_disc=p["lr"], gan_weight_gen=p["gan_weight"],
                         disc_placement=p["disc_placement"], ema_beta=0.9, seed=p["seed"])


def validate(p: dict) -> None:
    for name in resolve_divs(p["div"]):  # unknown names: ValueError listing the valid ones
        distill_config(p, name)
    for key in ("steps", "teacher_steps"):
        if p[key] < 1:
            raise ValueError(f"{key} must be >= 1; got {p[key]}")
    if not 2 <= p["batch_size"] <= 512:
        raise ValueError(f"batch_size must be in [2, 512]; got {p['batch_size']}")
    if p["eval_samples"] < 100:
        raise ValueError(f"eval_samples must be >= 100 (precision/recall and FD need samples); got {p['eval_samples']}")


cfg = setup_notebook(globals(), validate=validate)
T_START, CPU_START = time.perf_counter(), time.process_time()
DIVS = resolve_divs(div)
STEPS = cfg.pick(full=steps, smoke=min(steps, 12))
TEACHER_STEPS = cfg.pick(full=teacher_steps, smoke=min(teacher_steps, 40))
BATCH = cfg.pick(full=batch_size, smoke=min(batch_size, 32))
N_EVAL = cfg.pick(full=eval_samples, smoke=200)
CLF_STEPS = cfg.pick(full=400, smoke=60)
BENCH_N = 256  # the same in smoke mode: small batches measure call overhead, not the sampler
BENCH_REPEATS = cfg.pick(full=3, smoke=2)  # teacher; the one-step student (about 26 ms a call) gets 5x as many
print(f"divergences {DIVS} | {STEPS} iterations each, batch {BATCH} | teacher {TEACHER_STEPS} steps | "
      f"{N_EVAL} evaluation samples")'''

DATA_MD = r"""## 1. The data: scikit-learn digits as an EDM image set

Pixels 0..16 are mapped to $[-1, 1]$ (EDM assumes $\sigma_{data} = 0.5$). A class-stratified 20 % is held out:
the metrics compare samples with these held-out digits, never with the training set."""

DATA = '''train, heldout = load_digits(resolution=8, holdout_fraction=0.2, seed=seed)
print(f"train {tuple(train.images.shape)}, held out {tuple(heldout.images.shape)}, "
      f"class counts (held out) {torch.bincount(heldout.labels).tolist()}")


def show(ax, images, title, nrow=10):
    ax.imshow(make_grid(images, nrow=nrow), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title)
    ax.axis("off")


per_class = torch.stack([torch.nonzero(train.labels == k).flatten()[:10] for k in range(10)], dim=1)
real_grid = train.images[per_class.flatten()]  # row r holds the r-th example of digits 0..9
fig, ax = plt.subplots(figsize=(4, 4))
show(ax, real_grid, "real training digits (column k is digit k)")
plt.show()'''

TEACHER_MD = r"""## 2. The teacher: a small class-conditional EDM model

A two-level ADM U-Net (`DhariwalUNet`, the ImageNet-64 teacher's architecture, shrunk) inside EDM's
preconditioning $D(x;\sigma,y) = c_{skip}x + c_{out}F(c_{in}x, c_{noise}, y)$, trained with the EDM loss
($\ln\sigma \sim \mathcal N(-1.2, 1.2^2)$, weight $\lambda(\sigma)$) and kept as an EMA of its weights. The
checkpoint is cached in `output_dir` under a hash of the configuration and the training data; a corrupted
cache file stops the notebook with the file name and the fix."""

TEACHER = '''NET = tiny_adm_config(img_resolution=8, img_channels=1, label_dim=10, model_channels=16,
                      channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
teacher_cfg = TeacherConfig(net=NET, steps=TEACHER_STEPS, batch_size=128, lr=2e-3, warmup_steps=50,
                            ema_beta=0.999, seed=seed)
t0 = time.perf_counter()
teacher, teacher_info = load_or_train_teacher(teacher_cfg, train.images, train.labels, cfg.output_dir,
                                              retrain=retrain_teacher)
teacher_wall_s = time.perf_counter() - t0
print(f"teacher: {count_parameters(teacher):,} parameters; training took {teacher_info['train_time_s']:.1f} s "
      f"(CPU {teacher_info.get('train_cpu_s', float('nan')):.1f} s) "
      f"({'loaded from cache' if teacher_info['cached'] else 'trained now'}, this cell {teacher_wall_s:.1f} s)")
loss = pd.Series(teacher_info["loss"])
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(loss.rolling(max(1, len(loss) // 20), min_periods=1).mean())
ax.set(xlabel="step", ylabel="EDM loss (rolling mean)", yscale="log", title="teacher training")
plt.show()'''

HEUN_MD = r"""### The teacher's samples: 18-step Heun (35 network evaluations)

All models below get the same latents $z$ and the same labels (column $k$ = digit $k$)."""

HEUN = '''gen = torch.Generator().manual_seed(seed + 1)
eval_labels = torch.arange(N_EVAL) % 10
eval_z = torch.randn(N_EVAL, 1, 8, 8, generator=gen)


def teacher_sample(z, labels, num_steps=18):
    return heun_sampler(lambda x, s: teacher(x, s, labels), z, num_steps=num_steps)


t0 = time.perf_counter()
with torch.no_grad():
    x_teacher = teacher_sample(eval_z, eval_labels)
heun_s = time.perf_counter() - t0
print(f"{N_EVAL} teacher samples, 18 Heun steps (35 evaluations each) in {heun_s:.2f} s")
fig, ax = plt.subplots(figsize=(4, 4))
show(ax, x_teacher[:100], "teacher, 18-step Heun")
plt.show()'''

CLF_MD = r"""## 3. The yardstick: a digit classifier trained on the real training digits

Its 128-d penultimate layer plays the role Inception plays for FID. Metrics per model, against held-out
real digits: **label agreement** (classifier agrees with the conditioning label), **coverage** (fraction of
classes receiving at least a quarter of their share), **class-frequency error** (total-variation distance
of the predicted class frequencies from the labels'), **FD** (Fréchet distance of features), **precision**
and **recall** (k-NN manifolds, $k = 3$, Kynkäänniemi et al. 2019). The row *real (train)* measures
real training digits the same way: the floor set by the sample sizes."""

CLF = '''clf = dm.train_classifier(train.images, train.labels, steps=CLF_STEPS, seed=seed)
clf_accuracy = dm.accuracy(clf, heldout.images, heldout.labels)
print(f"classifier accuracy on held-out real digits: {clf_accuracy:.3f}")
n_real = min(N_EVAL, len(train))
reports = {"real (train)": dm.evaluate_samples(clf, train.images[:n_real], train.labels[:n_real], heldout.images),
           "teacher (Heun 18)": dm.evaluate_samples(clf, x_teacher, eval_labels, heldout.images)}
display(pd.DataFrame({k: v.as_dict() for k, v in reports.items()}).T.round(3))'''

DISTILL_MD = r"""## 4. f-distill: one-step students

For each divergence a fresh `FDistillTrainer` copies the teacher into the student $G$ and the fake score,
and puts discriminator heads on the teacher's bottleneck features (4×4 here; Conv4×4 s4 + GroupNorm + SiLU,
1×1 conv). One iteration is either

* a **generator step** (i % K == 0): $x = G(80z; \sigma{=}80, y)$, $x_t = x + \sigma\epsilon$ with $\sigma$ drawn
  from indices 2..998 of the Karras grid; the update direction is
  $\tilde h(r)\,(\hat x_0^{fake} - \hat x_0^{teacher}) / \mathrm{mean}|x - \hat x_0^{teacher}|$ plus
  `gan_weight` × the non-saturating GAN loss; or
* a **critic step**: the fake score learns the student's distribution (denoising loss on detached
  samples) and the heads learn to tell real digits from student samples, both noised at independent levels.

Student gradients are clipped at norm 10; the student's EMA (rate 0.9, short run) gives the samples."""

DISTILL = '''trainers, students, train_s, train_cpu_s = {}, {}, {}, {}
for name in DIVS:
    trainer = FDistillTrainer(teacher, distill_config(cfg.params, name))
    batches = BatchSampler(train, BATCH, seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    fit(trainer, batches, STEPS, desc=f"f-distill {name}")
    train_s[name], train_cpu_s[name] = time.perf_counter() - t0, time.process_time() - c0
    trainer.save_checkpoint(cfg.output_dir / f"student_{name}.pt", extra={"batches": batches.state_dict()})
    trainers[name] = trainer
    students[name] = trainer.sample(z=eval_z, labels=eval_labels)
    reports[f"{name} (1 step)"] = dm.evaluate_samples(clf, students[name], eval_labels, heldout.images)
    print(f"{name}: {STEPS} iterations in {train_s[name]:.1f} s (CPU {train_cpu_s[name]:.1f} s); "
          f"{ {k: round(v, 3) for k, v in reports[f'{name} (1 step)'].as_dict().items()} }")'''

SPEED_MD = r"""## 5. Sampling speed: one step against 18 Heun steps

Same batch, same thread count, best timed run after a warm-up (teacher: 3 runs, student: 15, since one
student call takes only tens of milliseconds and a single scheduler hiccup would distort it)."""

SPEED = '''bench_labels = torch.arange(BENCH_N) % 10
bench_z = torch.randn(BENCH_N, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 2))
first = trainers[DIVS[0]]
student_ips = dm.images_per_second(lambda n: first.sample(z=bench_z[:n], labels=bench_labels[:n]), n=BENCH_N,
                                   repeats=5 * BENCH_REPEATS)
teacher_ips = dm.images_per_second(lambda n: teacher_sample(bench_z[:n], bench_labels[:n]), n=BENCH_N,
                                   repeats=BENCH_REPEATS)
speedup = student_ips / teacher_ips
print(f"student (1 evaluation): {student_ips:,.0f} images/s | teacher (18 Heun steps, 35 evaluations): "
      f"{teacher_ips:,.0f} images/s | speed-up {speedup:.1f}x")
if speedup < 20:
    print("WARNING: speed-up below 20x on this machine (timing noise or a loaded CPU); rerun this cell")'''

GRIDS_MD = "## 6. Samples per model (same latents and labels; column k is digit k)"

GRIDS = '''panels = {"real (train)": real_grid, "teacher (Heun 18)": x_teacher[:100],
          **{f"{n} (1 step)": students[n][:100] for n in DIVS}}
fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
for ax, (title, imgs) in zip(axes, panels.items()):
    rep = reports.get(title)
    show(ax, imgs, title + (f"\\nFD {rep.fd:.1f}, recall {rep.recall:.2f}" if rep else ""))
fig.savefig(cfg.output_dir / "samples.png", dpi=90, bbox_inches="tight")
plt.show()'''

CURVES_MD = r"""## 7. Training curves

Generator steps: the distillation surrogate `loss_f` (its value is $\tfrac12\,\mathrm{mean}\,g^2$, a measure of
the teacher–fake disagreement, not a quantity that must fall), the GAN generator loss and the spread of the
normalised weights $\tilde h$ (0 for reverse KL, where $h \equiv 1$). Critic steps: the fake score's denoising
loss and the discriminator loss ($2\ln 2 \approx 1.39$ = chance)."""

CURVES = '''keys = [("loss_f", "distillation surrogate"), ("loss_gan_g", "GAN generator loss"),
        ("weight_std", "std of normalised h"), ("ratio_mean", "mean ratio r"),
        ("loss_dsm", "fake-score DSM loss"), ("loss_d", "discriminator loss")]
fig, axes = plt.subplots(2, 3, figsize=(12, 6))
for name in DIVS:
    hist = pd.DataFrame(trainers[name].history)
    for ax, (key, title) in zip(axes.flat, keys):
        if key in hist:
            s = hist[["step", key]].dropna()
            ax.plot(s["step"], s[key].rolling(max(1, len(s) // 10), min_periods=1).mean(), label=name)
            ax.set_title(title)
for ax in axes[-1]:
    ax.set_xlabel("iteration")
axes[0, 0].legend()
fig.tight_layout()
fig.savefig(cfg.output_dir / "training_curves.png", dpi=90)
plt.show()'''

RESULTS_MD = "## 8. Results"

RESULTS = '''table = pd.DataFrame({k: v.as_dict() for k, v in reports.items()}).T
table["train_s"] = pd.Series({"teacher (Heun 18)": teacher_info["train_time_s"],
                              **{f"{n} (1 step)": train_s[n] for n in DIVS}})
display(table.round(3))
total_s = time.perf_counter() - T_START
record(cfg.output_dir, "config", {"divergences": DIVS, "steps": STEPS, "teacher_steps": TEACHER_STEPS,
                                  "batch_size": BATCH, "eval_samples": N_EVAL, "smoke": cfg.smoke,
                                  "trainer": distill_config(cfg.params, DIVS[0]).to_dict()})
record(cfg.output_dir, "classifier_accuracy", clf_accuracy)
record(cfg.output_dir, "real", reports["real (train)"].as_dict())
record(cfg.output_dir, "teacher", {**reports["teacher (Heun 18)"].as_dict(), "parameters": count_parameters(teacher),
                                   "train_s": teacher_info["train_time_s"],
                                   "train_cpu_s": teacher_info.get("train_cpu_s"), "cached": teacher_info["cached"],
                                   "heun_steps": 18, "nfe": 35})
record(cfg.output_dir, "students", {n: {**reports[f"{n} (1 step)"].as_dict(), "train_s": train_s[n],
                                        "train_cpu_s": train_cpu_s[n]} for n in DIVS})
record(cfg.output_dir, "speed", {"student_images_per_s": student_ips, "teacher_images_per_s": teacher_ips,
                                 "speedup": speedup, "batch": BENCH_N})
cpu_s = time.process_time() - CPU_START
record(cfg.output_dir, "seconds_total", {"wall": total_s, "cpu": cpu_s, "threads": cfg.threads})
print(f"after setup: {total_s:.0f} s wall clock, {cpu_s:.0f} s CPU time of this kernel ({cfg.threads} threads; "
      "on a shared machine CPU time / threads estimates the unloaded wall time)")'''

OBS = '''best_fd = min(DIVS, key=lambda n: reports[f"{n} (1 step)"].fd)
best_recall = max(DIVS, key=lambda n: reports[f"{n} (1 step)"].recall)
t_rep = reports["teacher (Heun 18)"]
print(f"lowest FD: {best_fd}; highest recall: {best_recall}")
disc = {}
for n in DIVS:
    r = reports[f"{n} (1 step)"]
    late = pd.DataFrame(trainers[n].history).iloc[-max(1, STEPS // 5):].mean(numeric_only=True)
    disc[n] = {k: float(late.get(k, float("nan"))) for k in ("disc_acc", "loss_d", "weight_std", "ratio_max")}
    print(f"{n}: FD {r.fd:.1f} (teacher {t_rep.fd:.1f}), recall {r.recall:.2f} (teacher {t_rep.recall:.2f}), "
          f"precision {r.precision:.2f}, label agreement {r.label_agreement:.2f}, coverage {r.coverage:.1f} | "
          f"last 20%: discriminator accuracy {disc[n]['disc_acc']:.3f}, loss {disc[n]['loss_d']:.3f} "
          f"(chance 1.386), std of normalised h {disc[n]['weight_std']:.3f}, max ratio {disc[n]['ratio_max']:.2f}")
record(cfg.output_dir, "discriminator_late", disc)'''

TEXT_MD = r"""## 9. What the measurements show

The numbers printed above are this run's. On the project's 2-core CPU (2 threads, `-p div all`, seed 0,
teacher trained from scratch) we measured: teacher FD 8.4, recall 0.90 (real training digits: FD 8.0,
recall 0.85, the floor set by the sample sizes); after 300 iterations (100 generator steps) the one-step
students reached reverse KL FD 29.4 / recall 0.43, JS 26.5 / 0.46, forward KL 24.9 / 0.53, with precision
0.90-0.92 and label agreement 0.92-0.93; speed-up 50× (9,895 against 198 images/s on the idle machine, 36× on a
busy one: the ratio moves with the load). With the same teacher,
seeds 1 and 2 gave FD 44.0 / 39.0 / 34.9 and 24.4 / 24.3 / 24.6 (reverse KL / JS / forward KL).

* **Speed.** The one-step student is 35-50× faster than the 18-step Heun sampler (35 evaluations), as the
  evaluation count predicts; the sampler loop itself costs little.
* **Quality at this budget.** The students draw clean digits of the requested class, but they are **not**
  as good as the teacher: FD 3-5× the teacher's and recall 0.23-0.53 against 0.90. They lose diversity
  within each class. The student starts as the teacher evaluated once at $\sigma = 80$, which gives the
  class-mean digit (high precision, recall 0); a few hundred CPU iterations only partly spread it out. This
  is about 1/1000 of the paper's training on a tiny network: it does not test the paper's FID claims.
* **Divergences: a tendency, not a result.** Within a seed, forward KL had the lowest FD in 2 of 3 seeds and
  reverse KL the highest (the third seed was a tie within 0.3), the direction the paper reports for
  less mode-seeking divergences. But the differences (up to 9 FD) are smaller than the spread over seeds for
  one divergence (up to 20 FD), and 3 seeds are too few to call it. We neither confirm nor refute the paper.
* **Why the divergences behave alike here.** The discriminator barely separates real digits from student
  samples (accuracy about 0.54 and loss 1.36-1.37 against $2\ln 2 \approx 1.386$ at chance, last fifth of
  training), so the estimated ratios stay within about $[0.5, 1.8]$ and the normalised weights vary little
  (std 0.09 for JS, 0.19 for forward KL, 0 for reverse KL). With $r \approx 1$ every $h(r)$ is nearly
  constant and all divergences reduce to the reverse-KL (DMD2) update. The choice of divergence can only
  matter once the discriminator sees a real difference; try longer runs (`-p steps 1500`) and more seeds.
* **Coverage** is 1.0 for every model because the models are class-conditional: mode dropping shows up
  inside classes, as low recall, not as missing classes."""

QUESTIONS = r"""## Questions

1. The student at step 0 is the teacher applied once at $\sigma = 80$. Why does it give the mean digit of
   each class, and why does that give high precision but recall near 0?
2. Reverse KL has $h \equiv 1$, so `weight_std` is 0. For forward KL, which samples get the largest weights,
   and what does the discriminator have to learn first for those weights to mean anything?
3. Run `-p gan_weight 0` (ratio-only mode). The discriminator still trains; what changes in the samples?
4. Run `-p disc_placement fake_score` (DMD2's choice). Which network's encoder does the GAN loss now train?

## Exercises

* Double `steps` for one divergence and plot FD and recall against iterations (evaluate checkpoints).
* Switch the schedule to DMD2's convention (critic updated every iteration: `DistillConfig(schedule="dmd2")`)
  and compare at equal wall-clock time.
* Upsample the digits to 16×16 (`load_digits(resolution=16)`, `img_resolution=16`) and measure the cost."""


def build() -> nbformat.NotebookNode:
    cells = [new_markdown_cell(TITLE), new_code_cell(PARAMS, metadata={"tags": ["parameters"]}), new_code_cell(SETUP),
             new_markdown_cell(DATA_MD), new_code_cell(DATA), new_markdown_cell(TEACHER_MD), new_code_cell(TEACHER),
             new_markdown_cell(HEUN_MD), new_code_cell(HEUN), new_markdown_cell(CLF_MD), new_code_cell(CLF),
             new_markdown_cell(DISTILL_MD), new_code_cell(DISTILL), new_markdown_cell(SPEED_MD), new_code_cell(SPEED),
             new_markdown_cell(GRIDS_MD), new_code_cell(GRIDS), new_markdown_cell(CURVES_MD), new_code_cell(CURVES),
             new_markdown_cell(RESULTS_MD), new_code_cell(RESULTS), new_code_cell(OBS), new_markdown_cell(TEXT_MD),
             new_markdown_cell(QUESTIONS)]
    nb = new_notebook(cells=cells)
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    return nb


if __name__ == "__main__":
    nb = build()
    nbformat.validate(nb)
    nbformat.write(nb, OUT)
    print(f"wrote {OUT}")
