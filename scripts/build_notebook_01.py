"""Write notebooks/01_f_divergences.ipynb from the cell sources below (then run nbstripout on it).

Usage: python scripts/build_notebook_01.py && nbstripout notebooks/01_f_divergences.ipynb
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parents[1] / "notebooks" / "01_f_divergences.ipynb"

TITLE = r"""# 01 · The f-divergence family and why h(r) decides mode coverage

Paper: Xu, Nie, Vahdat, *One-step Diffusion Models with f-Divergence Distribution Matching* (arXiv 2502.15681).

**Goals.** After this notebook you can
1. write $f$ and the weight $h(r) = r^2 f''(r)$ of every divergence in the library and read Table 1's
   mode-seeking / saturating / variance columns off the curves (paper Fig. 3);
2. check the f-distill gradient identity numerically: the score difference times $h(r)$ equals the gradient
   of $D_f$;
3. explain why forward-KL-like weights are hard to estimate (paper Fig. 4a);
4. see a Gaussian student lock onto one mode (reverse KL) or spread over both (forward KL) when it follows
   the exact f-distill gradient.

**Prerequisites.** Densities, scores $\nabla_x \log p$, the chain rule. No GPU, no training of networks:
everything here uses exact densities and quadrature.

**Time.** CPU: about 30 s at the defaults on a 2-core laptop; smoke mode (`-p smoke True`) under 60 s.
"""

PARAMS = """smoke: bool = False  # shrink sizes for CI (never skips cells)
seed: int = 0  # random seed (the lesson is deterministic; kept for the harness)
div: str = "js"  # divergence shown first in the interactive control (name or alias)
steps: int = 400  # gradient steps of each Gaussian fit
lr: float = 0.1  # step size of the fits (on mean and log std; h normalised by its mean under q)
separation: float = 4.0  # distance between the teacher's two modes
weight: float = 0.8  # weight of the left mode in the imbalanced teacher (the right mode gets 1 - weight)
output_dir: str = "outputs/01_f_divergences"  # results.json is written here"""

SETUP = """import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display

from fdistill_lab import checks, divergences, gaussian1d, plotting, reference, widgets
from fdistill_lab.notebook import setup_notebook
from fdistill_lab.records import record


def validate(p: dict) -> None:
    if divergences.canonical_name(p["div"]) not in divergences.PAPER_NAMES:  # ValueError lists valid names
        raise ValueError(f"div must be one of the paper divergences {list(divergences.PAPER_NAMES)}; got {p['div']!r}")
    if not 0.5 <= p["weight"] < 1:
        raise ValueError(f"weight must be in [0.5, 1); got {p['weight']}")
    if not 1.0 <= p["separation"] <= 6.0:
        raise ValueError(f"separation must be in [1, 6] (wider makes the quadrature overflow); got {p['separation']}")
    if p["steps"] < 1 or p["lr"] <= 0:
        raise ValueError(f"need steps >= 1 and lr > 0; got steps={p['steps']}, lr={p['lr']}")


cfg = setup_notebook(globals(), validate=validate)
div = divergences.canonical_name(div)
fit_steps = cfg.pick(full=steps, smoke=min(steps, 200))
quad_points = cfg.pick(full=1001, smoke=501)
PAPER = list(divergences.PAPER_NAMES)"""

S1 = r"""## 1. The family: $f(r)$ and $h(r) = r^2 f''(r)$

$D_f(p\,\|\,q) = \mathbb E_q[f(p/q)]$ with $f$ convex and $f(1) = 0$; $p$ is the teacher, $q$ the one-step
student, $r = p/q$. f-distill updates the student along the teacher/fake score difference weighted by
$h(r) = r^2 f''(r)$ (paper Fig. 1). Only the *shape* of $h$ matters: it is normalised by its batch mean.

Left: the generators. Right: the weights, scaled so that $h(1) = 1$. Where the student puts too little
mass ($r \gg 1$), an increasing $h$ (forward KL, Jeffreys, Pearson) pulls hard; where it puts too much
($r \ll 1$), a decreasing $h$ (softened RKL, Neyman) pulls hard. Reverse KL ($h \equiv 1$) is DMD/DMD2."""

TABLE = """plotting.plot_f_and_h()
plt.show()
table = pd.DataFrame(divergences.table()).set_index("name")
display(table)"""

S1_NOTES = r"""The table reproduces paper Table 1 for the six paper divergences (`in_paper`); Neyman $\chi^2$,
Pearson $\chi^2$ and the $\alpha$ family (here $\alpha = 0.5$) are extras of the library. *Bounded* means $f$
saturates (JS $\le 2\log 2$, squared Hellinger $\le 1$)."""

EX1 = r"""### Exercise 1 — derive and implement $h$ for Jensen–Shannon

$f(r) = r\log r - (r+1)\log\frac{r+1}{2}$. Differentiate twice, multiply by $r^2$, and implement `h_js`
(elementwise, torch). The check cell compares with $r^2 f''$ computed by autograd."""

EX1_SOLUTION = '''def h_js(r: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon weight h(r) = r^2 f''(r), elementwise."""
    ### BEGIN SOLUTION
    return r / (r + 1)
    ### END SOLUTION'''

EX1_CHECK = "checks.check_h_js(h_js)"

EX1_USE_MD = r"""With a discriminator trained to tell teacher from student samples, $r = \exp(\text{logit})$, so the JS
weight is $h = r/(r+1) = \mathrm{sigmoid}(\text{logit})$: the discriminator's own output. The next cell uses your
`h_js`, or falls back to `fdistill_lab.reference.h_js` if you have not implemented it yet."""

EX1_USE = """h_js_used = reference.fallback(h_js, reference.h_js)
logit = torch.linspace(-6, 6, 121, dtype=torch.float64)
js_weight = h_js_used(logit.exp())
sigmoid_gap = float((js_weight - torch.sigmoid(logit)).abs().max())
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(logit, js_weight, label="h_js(exp(logit))")
ax.plot(logit, torch.sigmoid(logit), ls="--", label="sigmoid(logit)")
ax.set(xlabel="discriminator logit = log r", ylabel="weight", title="JS weight = discriminator output")
ax.legend()
plt.show()
print(f"max |h_js(exp l) - sigmoid(l)| = {sigmoid_gap:.1e}")
record(cfg.output_dir, "js_weight_sigmoid_max_gap", sigmoid_gap)"""

S2 = r"""## 2. The gradient identity on 1-D Gaussians

For $x = \theta + s z$ (a Gaussian student $q_\theta = \mathcal N(\theta, s^2)$) the paper's update is

$$\nabla_\theta D_f(p\,\|\,q_\theta) = -\,\mathbb E_{q}\big[h(r(x))\,(\nabla_x \log p(x) - \nabla_x \log q_\theta(x))
\,\partial x/\partial\theta\big].$$

We take $p = \mathcal N(1, 1.3^2)$, $q = \mathcal N(0.2, 0.8^2)$, compute the right side with exact scores and
the exact ratio by quadrature (`gaussian1d.fdistill_gradient`), and compare it with central finite
differences of $D_f$ itself (`gaussian1d.finite_difference_gradient`), for the mean and the std."""

GRAD = """p_ref, mean_ref, std_ref = gaussian1d.gaussian(1.0, 1.3), 0.2, 0.8
rows = []
for name in PAPER:
    est = gaussian1d.fdistill_gradient(name, p_ref, mean_ref, std_ref)
    fd = gaussian1d.finite_difference_gradient(name, p_ref, mean_ref, std_ref)
    rows.append({"divergence": name, "estimator d/dmean": est[0], "finite diff d/dmean": fd[0],
                 "estimator d/dstd": est[1], "finite diff d/dstd": fd[1]})
grad_table = pd.DataFrame(rows).set_index("divergence")
grad_err = float(max((grad_table["estimator d/dmean"] - grad_table["finite diff d/dmean"]).abs().max(),
                     (grad_table["estimator d/dstd"] - grad_table["finite diff d/dstd"]).abs().max()))
display(grad_table.style.format("{:.6f}"))
plotting.plot_gradient_check(grad_table["estimator d/dmean"].to_dict(), grad_table["finite diff d/dmean"].to_dict())
plt.show()
print(f"largest |estimator - finite difference| over 6 divergences x 2 parameters: {grad_err:.1e}")
record(cfg.output_dir, "gradient_identity_max_abs_error", grad_err)
record(cfg.output_dir, "gradient_mean_estimator", grad_table["estimator d/dmean"].to_dict())"""

S2_NOTES = r"""The two columns agree to about $10^{-7}$ (finite-difference and quadrature error), for every divergence,
for the mean and for the std: the f-distill update *is* the gradient of $D_f$. Reverse KL gives
$(\theta - 1)/1.3^2 = -0.473$ and forward KL $(\theta - 1)/0.8^2 = -1.25$ in closed form.

Note what differs between divergences: the *direction* is the same score difference everywhere, only the
weighting over $x$ changes. That is the whole design space f-distill explores."""

S3 = r"""## 3. The variance story (paper Fig. 4a)

In training $h$ is evaluated on a mini-batch, so a weight with a large spread under $q$ makes a noisy
gradient. The paper measures the normalised variance $\mathrm{Var}_q[h(r)] / \mathbb E_q[h(r)]^2$ for
$p = \mathcal N(\mu, 1)$, $q = \mathcal N(0, 1)$ as the mean shift $\mu$ grows. Closed forms: forward KL
$e^{\mu^2} - 1$, squared Hellinger $e^{\mu^2/4} - 1$."""

VAR = """mus = torch.linspace(0, 3, cfg.pick(full=13, smoke=7)).tolist()
var_names = PAPER + ["neyman", "pearson"]
variance = {name: [gaussian1d.normalized_variance(name, mu) for mu in mus] for name in PAPER}
plotting.plot_normalized_variance(mus, variance)  # the paper's six; Neyman and Pearson are in the table below
plt.show()
variance_at_2 = {name: gaussian1d.normalized_variance(name, 2.0) for name in var_names}
display(pd.Series(variance_at_2, name="normalised variance at mu = 2").to_frame().style.format("{:.4g}"))
record(cfg.output_dir, "normalized_variance_mu2", variance_at_2)"""

S3_NOTES = r"""**What we measured.** At $\mu = 2$ the order is forward KL (53.6) > Jeffreys (13.4) >
squared Hellinger (1.72) > JS (1.22) > softened RKL (0.10) > reverse KL (0), which matches the paper's High/Low
variance labels (Table 1) and the shape of Fig. 4a. The paper does not say whether Fig. 4a divides by the squared
mean, so compare shapes, not absolute values. Two extras: Pearson $\chi^2$ ($h = r^2$) is far worse than forward KL,
and Neyman $\chi^2$ ($h = 1/r$) equals forward KL here only because this setting is symmetric
($r(x)$ and $1/r(-x)$ have the same law under $q$). Bounded weights (JS, sRKL) are what make training with
a noisy discriminator stable; that is why the paper's best results use JS."""

S4 = r"""## 4. Mode seeking: a Gaussian student and a bimodal teacher

The teacher is $w\,\mathcal N(-d/2, 0.5^2) + (1-w)\,\mathcal N(d/2, 0.5^2)$. The student $\mathcal N(m, s^2)$ starts at
$\mathcal N(1, 1)$ (closer to the right mode) and follows the exact f-distill gradient (exact scores, exact
ratio, $h$ divided by $\mathbb E_q[h]$ as in the paper's batch normalisation) with plain gradient descent on
$(m, \log s)$. A mode is *kept* if it holds at least 10% of the student's mass.

First a balanced teacher ($w = 0.5$, separation `separation`), one panel per paper divergence."""

FIT_BALANCED = """teacher_balanced = gaussian1d.bimodal(separation, 0.5)
fits_balanced = [gaussian1d.fit_gaussian(name, teacher_balanced, 1.0, 1.0, steps=fit_steps, lr=lr, n=quad_points,
                                         progress=True) for name in PAPER]
modes_balanced = {f.divergence: gaussian1d.modes_kept(f, teacher_balanced) for f in fits_balanced}
plotting.plot_gaussian_fits(teacher_balanced, fits_balanced, modes_balanced)
plt.show()
final_std_balanced = {f.divergence: f.final[1] for f in fits_balanced}
record(cfg.output_dir, "final_std_balanced", final_std_balanced)
record(cfg.output_dir, "modes_kept_balanced", modes_balanced)"""

S4_NOTES = r"""**What we measured (defaults, separation 4).** Reverse KL and softened RKL collapse onto the right mode
(std 0.5, exactly one teacher component): with $h \equiv 1$ or a decreasing $h$ nothing pulls the student
towards mass it does not see. JS, squared Hellinger, forward KL and Jeffreys spread over both modes
(std ≈ 1.8–2.1; forward KL reaches the moment-matching solution, std $\sqrt{0.25 + 4} = 2.06$)."""

EX2 = r"""### Exercise 2 — predict which divergences keep both modes when the teacher is imbalanced

Now the left mode has weight `weight` (0.8 by default) and the right one $1 - w$; the student still starts
near the *light* right mode. Before running the next cells, predict for each paper divergence whether the
fitted Gaussian keeps **1** or **2** modes. Think about $h(r)$ where the student misses mass ($r \gg 1$) and
about which mode is heavier. The check compares your answer with the measured fits."""

EX2_SOLUTION = '''def predict_modes_kept() -> dict[str, int]:
    """Predicted number of teacher modes kept (1 or 2) for rkl, srkl, js, sh, fkl, jeffreys."""
    ### BEGIN SOLUTION
    return {"rkl": 1, "srkl": 1, "js": 1, "sh": 1, "fkl": 2, "jeffreys": 1}
    ### END SOLUTION'''

FIT_IMBALANCED = """teacher = gaussian1d.bimodal(separation, weight)
fits = [gaussian1d.fit_gaussian(name, teacher, 1.0, 1.0, steps=fit_steps, lr=lr, n=quad_points, progress=True)
        for name in PAPER]
modes_imbalanced = {f.divergence: gaussian1d.modes_kept(f, teacher) for f in fits}
plotting.plot_gaussian_fits(teacher, fits, modes_imbalanced)
plt.show()
record(cfg.output_dir, "modes_kept_imbalanced", modes_imbalanced)
record(cfg.output_dir, "final_mean_imbalanced", {f.divergence: f.final[0] for f in fits})"""

EX2_CHECK = "checks.check_mode_prediction(predict_modes_kept, modes_imbalanced)"

EX2_NOTES = r"""**What we measured (defaults: separation 4, weight 0.8).** Reverse KL and softened RKL stay on the light
right mode they started near: mode seeking does not even pick the *heavier* mode. JS and squared Hellinger first
spread, then settle on the heavy left mode — "medium" mode seeking, as in paper Table 1. Forward KL keeps
both (it matches the mixture's mean −1.2 and std 1.68). Jeffreys ($h = r + 1$, labelled *not* mode-seeking in
Table 1) ends near the heavy mode with std ≈ 1.0 and keeps less than 10% on the light one, so here it
behaves more mode-seeking than the paper's label suggests: its reverse-KL half ($h = 1$) still pulls. A single
Gaussian is a very restricted student; the 2-D lab (notebook 02) repeats the comparison with a neural
generator and a learned ratio."""

RESTART_MD = r"""### Stuck or optimal? Restart the fits

A fit that ends on one mode may be the divergence's best Gaussian or only the nearest local minimum. Restart
every fit from the mirror of the student's start, $\mathcal N(-1, 1)$ (the heavy side), and from a wide
Gaussian in the middle, $\mathcal N(0, 2^2)$, and compare the final $D_f(p\,\|\,q)$. A fit from the student's
start counts as *the best found* when no restart ends more than $10^{-4}$ lower."""

RESTART = """starts = {"student (1, 1)": (1.0, 1.0), "mirror (-1, 1)": (-1.0, 1.0), "wide (0, 2)": (0.0, 2.0)}
restart_fits = {f.divergence: {"student (1, 1)": f} for f in fits}  # the fits above started at (1, 1)
for name in PAPER:
    for label, (m0, s0) in list(starts.items())[1:]:
        restart_fits[name][label] = gaussian1d.fit_gaussian(name, teacher, m0, s0, steps=fit_steps, lr=lr,
                                                            n=quad_points)
restart_value = {name: {label: f.final_value for label, f in runs.items()} for name, runs in restart_fits.items()}
fit_is_best = {name: bool(vals["student (1, 1)"] <= min(vals.values()) + 1e-4) for name, vals in restart_value.items()}
restart_table = pd.DataFrame({
    **{f"D from {label}": {n: restart_value[n][label] for n in PAPER} for label in starts},
    **{f"mean from {label}": {n: restart_fits[n][label].final[0] for n in PAPER} for label in starts},
    "student start is best": fit_is_best,
})
display(restart_table.style.format(precision=4))
record(cfg.output_dir, "restart_value_imbalanced", restart_value)
record(cfg.output_dir, "fit_is_best_imbalanced", fit_is_best)"""

RESTART_NOTES = r"""**What we measured (defaults).** Reverse KL and softened RKL are *stuck*: restarted
on the heavy side or wide in the middle they land on the heavy mode, with $D$ = 0.223 instead of 1.609 for
reverse KL (these are $-\log 0.8$ and $-\log 0.2$: a student sitting on one mode pays minus the log of that
mode's weight). Their light-mode fit is a local minimum that plain gradient descent cannot leave, because $h$
gives no pull towards mass the student does not cover. JS, squared Hellinger, forward KL and Jeffreys end at
the same fit from all three starts, so their one-mode (or, for forward KL, moment-matching) answers are what
the divergence itself prefers, not an accident of the start. Jeffreys' heavy-mode fit (mean −1.71, std 1.04,
$D$ = 2.18) is its optimum among these starts."""

WIDGET_MD = r"""### Try it

The static figure below is the fit for `div` at the notebook's separation and weight. The control on top
re-runs the fit for any paper divergence, mode separation and weight imbalance (release a slider to
update). Where does each divergence switch from one mode to two?"""

WIDGET = """widgets.show_mode_seeking_fit(div, separation, weight, steps=fit_steps, lr=lr)
control = widgets.mode_seeking_widget(div, separation, weight, steps=min(fit_steps, 200), lr=lr)
if control is not None:
    display(control)"""

SUMMARY = """summary = {
    "gradient_identity_max_abs_error": grad_err,
    "rkl_std_balanced": final_std_balanced["rkl"],
    "fkl_std_balanced": final_std_balanced["fkl"],
    "fkl_variance_mu2": variance_at_2["fkl"],
}
display(pd.Series(summary, name="value").to_frame())
record(cfg.output_dir, "summary", summary)"""

QUESTIONS = r"""## Questions

1. Which column of Table 1 can you read off $h(r)$ as $r \to \infty$, and which off $r \to 0$? (Table 6 of the paper.)
2. Why can the reverse-KL student never discover the second mode, whatever the learning rate?
3. The variance of $h$ grows like $e^{\mu^2}$ for forward KL. What does that mean for a batch of 64 student
   samples when the student is one standard deviation away from the teacher?
4. JS keeps both modes when they are balanced and drops the light one at 80/20. Is that good or bad for a
   one-step image generator? What does the paper's recall column say?

## Open exercises

- Add the $\alpha$ family to the fits (`divergences.get("alpha", alpha=a)`) and find the $\alpha$ where the
  balanced teacher switches from one mode to two.
- Replace the exact ratio by a noisy one ($\log r + \varepsilon$) and measure how the std of the gradient
  grows per divergence (a numerical version of Fig. 4a).
- Average the gradient over several noise levels (`fit_gaussian(..., sigmas=(0.0, 0.5, 1.0))`, as diffusion
  distillation does) and see whether reverse KL still collapses."""


def build() -> nbformat.NotebookNode:
    params = new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    cells = [new_markdown_cell(TITLE), params, new_code_cell(SETUP), new_markdown_cell(S1), new_code_cell(TABLE),
             new_markdown_cell(S1_NOTES), new_markdown_cell(EX1)]
    sol1 = new_code_cell(EX1_SOLUTION)
    sol1.metadata["tags"] = ["solution"]
    sol2 = new_code_cell(EX2_SOLUTION)
    sol2.metadata["tags"] = ["solution"]
    cells += [sol1, new_code_cell(EX1_CHECK), new_markdown_cell(EX1_USE_MD), new_code_cell(EX1_USE),
              new_markdown_cell(S2), new_code_cell(GRAD), new_markdown_cell(S2_NOTES),
              new_markdown_cell(S3), new_code_cell(VAR), new_markdown_cell(S3_NOTES),
              new_markdown_cell(S4), new_code_cell(FIT_BALANCED), new_markdown_cell(S4_NOTES),
              new_markdown_cell(EX2), sol2, new_code_cell(FIT_IMBALANCED), new_code_cell(EX2_CHECK),
              new_markdown_cell(EX2_NOTES),
              new_markdown_cell(RESTART_MD), new_code_cell(RESTART), new_markdown_cell(RESTART_NOTES),
              new_markdown_cell(WIDGET_MD), new_code_cell(WIDGET),
              new_markdown_cell("## Summary"), new_code_cell(SUMMARY), new_markdown_cell(QUESTIONS)]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(build(), OUT)
    print(f"wrote {OUT}")
