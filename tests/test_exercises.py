"""Exercises: solutions pass their checks, wrong answers are rejected, student copies stop at the first
exercise with NotImplementedError and later cells fall back to the reference implementation."""

from __future__ import annotations

import ast
import time

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from notebook_harness import NOTEBOOKS, prepare_environment

from fdistill_lab.course import checks, reference
from fdistill_lab.course import student_copies as student
from fdistill_lab.course.records import read_records

NB01 = NOTEBOOKS / "01_f_divergences.ipynb"


def _nb01() -> nbformat.NotebookNode:
    return nbformat.read(NB01, as_version=4)


def _defaults(nb: nbformat.NotebookNode) -> dict:
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {n.target.id: ast.literal_eval(n.value) for n in ast.parse(cell.source).body}


def _solutions(nb: nbformat.NotebookNode) -> dict:
    ns: dict = {"torch": torch}
    for cell in nb.cells:
        if "solution" in cell.metadata.get("tags", []):
            assert student.has_solution(cell.source), "cells tagged 'solution' must hold a BEGIN/END SOLUTION region"
            exec(compile(cell.source, "<solution>", "exec"), ns)
    return ns


def test_solutions_pass_their_checks(capsys):
    nb = _nb01()
    ns, p = _solutions(nb), _defaults(nb)
    checks.check_h_js(ns["h_js"])
    measured = reference.modes_kept_by_divergence(p["separation"], p["weight"], steps=p["steps"], lr=p["lr"])
    checks.check_mode_prediction(ns["predict_modes_kept"], measured)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("check_h_js: OK") and out[1].startswith("check_mode_prediction: OK - 6/6")


def test_wrong_answers_are_rejected_with_hints():
    with pytest.raises(AssertionError, match=r"check_h_js: WRONG .* Hint: differentiate"):
        checks.check_h_js(lambda r: r)  # forward KL's weight, not JS's
    with pytest.raises(AssertionError, match="expected a tensor of shape"):
        checks.check_h_js(lambda r: 0.5)
    measured = {"rkl": 1, "srkl": 1, "js": 1, "sh": 1, "fkl": 2, "jeffreys": 1}
    with pytest.raises(AssertionError, match=r"5/6 predictions match.*'jeffreys': \(2, 1\).*Hint"):
        checks.check_mode_prediction({**measured, "jeffreys": 2}, measured)
    with pytest.raises(AssertionError, match="missing \\['jeffreys'\\]"):
        checks.check_mode_prediction({k: v for k, v in measured.items() if k != "jeffreys"}, measured)
    with pytest.raises(AssertionError, match="values must be 1 or 2"):
        checks.check_mode_prediction({**measured, "js": 3}, measured)


def test_checks_are_fast():
    start = time.perf_counter()
    checks.check_h_js(reference.h_js)
    checks.check_mode_prediction(dict.fromkeys(["rkl", "srkl", "js", "sh"], 1) | {"fkl": 2, "jeffreys": 1},
                                 {"rkl": 1, "srkl": 1, "js": 1, "sh": 1, "fkl": 2, "jeffreys": 1})
    assert time.perf_counter() - start < 1.0


def test_fallback_uses_reference_only_when_not_implemented(capsys):
    def todo(r):
        raise NotImplementedError()

    f = reference.fallback(todo, reference.h_js)
    assert torch.equal(f(torch.tensor([1.0, 3.0])), torch.tensor([0.5, 0.75])) and f.uses_reference()
    assert "todo is not implemented yet: using fdistill_lab.course.reference.h_js" in capsys.readouterr().out
    g = reference.fallback(lambda r: r * 0, reference.h_js)
    assert torch.equal(g(torch.tensor([2.0])), torch.tensor([0.0])) and not g.uses_reference()

    def broken(r):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        reference.fallback(broken, reference.h_js)(torch.tensor([1.0]))

    def unsupported(r):  # a library's NotImplementedError inside the student's code is not the stub
        raise NotImplementedError("op not implemented for 'ComplexHalf'")

    h = reference.fallback(unsupported, reference.h_js)
    with pytest.raises(NotImplementedError, match="ComplexHalf"):
        h(torch.tensor([1.0]))
    assert not h.uses_reference()


def test_strip_source_stubs_and_validates_markers():
    src = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    assert student.strip_source(src) == "def f(x):\n    y = 1\n    # YOUR CODE HERE\n    raise NotImplementedError()\n"
    hidden = "a = 1\n### BEGIN HIDDEN TESTS\nassert a == 1\n### END HIDDEN TESTS\nb = 2"
    assert student.strip_source(hidden) == "a = 1\nb = 2"
    with pytest.raises(ValueError, match="not closed"):
        student.strip_source("### BEGIN SOLUTION\nx = 1")
    with pytest.raises(ValueError, match="without a matching BEGIN"):
        student.strip_source("x = 1\n### END SOLUTION")
    # nbgrader's rule: the marker text anywhere in the line, whatever the comment prefix
    for begin, end in [("#### BEGIN SOLUTION", "#### END SOLUTION"), ("###BEGIN SOLUTION", "# END SOLUTION")]:
        stubbed = student.strip_source(f"{begin}\nsecret = 42\n{end}\n")
        assert stubbed == "# YOUR CODE HERE\nraise NotImplementedError()\n"


def test_student_notebook_refuses_unmarked_solutions_and_stubs_markdown():
    tagged = nbformat.v4.new_code_cell("answer = 42")
    tagged.metadata["tags"] = ["solution"]
    with pytest.raises(ValueError, match="tagged 'solution' but has no BEGIN SOLUTION"):
        student.student_notebook(nbformat.v4.new_notebook(cells=[tagged]))
    md = nbformat.v4.new_markdown_cell("Why?\n<!-- BEGIN SOLUTION -->\nBecause h = 1.\n<!-- END SOLUTION -->")
    out = student.student_notebook(nbformat.v4.new_notebook(cells=[md]))
    assert out.cells[0].source == "Why?\nYOUR ANSWER HERE" and "Because" not in out.cells[0].source


def test_student_copies_never_overwrite_the_sources(tmp_path):
    src = tmp_path / "nbs"
    src.mkdir()
    (src / NB01.name).write_bytes(NB01.read_bytes())
    assert student.main([str(src), str(src)]) == 2
    assert (src / NB01.name).read_bytes() == NB01.read_bytes()  # solutions intact


def test_student_copies_written(tmp_path):
    assert student.main([str(NOTEBOOKS), str(tmp_path)]) == 0
    for src in sorted(NOTEBOOKS.glob("*.ipynb")):
        out = nbformat.read(tmp_path / src.name, as_version=4)
        text = "\n".join(c.source for c in out.cells)
        assert "### BEGIN SOLUTION" not in text and "### END SOLUTION" not in text
        assert all(not c.get("outputs") for c in out.cells if c.cell_type == "code")
        n_solutions = sum(student.has_solution(c.source) for c in nbformat.read(src, as_version=4).cells)
        assert text.count("raise NotImplementedError()") >= n_solutions
    text01 = "\n".join(c.source for c in nbformat.read(tmp_path / NB01.name, as_version=4).cells)
    assert "return r / (r + 1)" not in text01 and '"jeffreys": 1}' not in text01
    assert text01.count("# YOUR CODE HERE") == 2
    text02 = "\n".join(c.source for c in nbformat.read(tmp_path / "02_toy_mode_coverage.ipynb", as_version=4).cells)
    assert "predict, run.weighting, c.gan_weight_gen)" not in text02 and text02.count("# YOUR CODE HERE") == 1


@pytest.mark.notebooks
@pytest.mark.timeout(240)
def test_student_copy_stops_at_first_exercise_and_later_cells_fall_back(tmp_path):
    student.write_student_copies(NB01, tmp_path / "student")
    nb = nbformat.read(tmp_path / "student" / NB01.name, as_version=4)
    out = tmp_path / "out"
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])) + 1
    injected = nbformat.v4.new_code_cell(f"# Parameters\nsmoke = True\noutput_dir = {str(out)!r}\n")
    injected.metadata["tags"] = ["injected-parameters"]  # what papermill would insert
    nb.cells.insert(at, injected)
    prepare_environment()
    NotebookClient(nb, kernel_name="python3", allow_errors=True, timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert [o.ename for _, o in errors] == ["NotImplementedError", "NotImplementedError"], errors
    assert [nb.cells[i].source.strip() for i, _ in errors] == [
        "checks.check_h_js(h_js)", "checks.check_mode_prediction(predict_modes_kept, modes_imbalanced)"]
    streams = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "h_js is not implemented yet: using fdistill_lab.course.reference.h_js" in streams
    rec = read_records(out)
    assert rec["js_weight_sigmoid_max_gap"] < 1e-12 and "summary" in rec  # cells after the exercises ran


NB02 = NOTEBOOKS / "02_toy_mode_coverage.ipynb"


def _generator_step_solution():
    """Exercise 02.1's solution cell, run on its own (it needs ``method`` and ``toy`` beside ``torch``)."""
    from fdistill_lab import method, toy

    ns: dict = {"torch": torch, "method": method, "toy": toy}
    cells = [c for c in nbformat.read(NB02, as_version=4).cells if "solution" in c.metadata.get("tags", [])]
    assert len(cells) == 1 and student.has_solution(cells[0].source)
    exec(compile(cells[0].source, "<solution>", "exec"), ns)
    return ns["generator_step"]


def test_generator_step_solution_passes_its_check(capsys):
    checks.check_generator_step(_generator_step_solution())
    checks.check_generator_step(reference.toy_generator_step)
    out = capsys.readouterr().out.splitlines()
    assert all(line.startswith("check_generator_step: OK - max |student - library| = 0.0e+00") for line in out)


def test_wrong_generator_steps_are_rejected_with_hints():
    from fdistill_lab import method

    def step(run, order="x-sigma-eps", gan=True, critic_optimiser=False):
        b = run.config.batch_size
        if order == "x-sigma-eps":
            x = run.student.sample(b, run.rng)
            sigma, eps = run.sample_sigma(b), run.randn(x.shape)
        elif order == "x-eps-sigma":  # the same draws in another order
            x = run.student.sample(b, run.rng)
            eps = run.randn(x.shape)
            sigma = run.sample_sigma(b)
        else:  # a second batch of latents drawn and thrown away
            run.student.sample(b, run.rng)
            x = run.student.sample(b, run.rng)
            sigma, eps = run.sample_sigma(b), run.randn(x.shape)

        def predict(x_t):
            with torch.no_grad():
                x0_fake = run.fake_score(x_t, sigma)
            return run.teacher_x0(x_t, sigma), x0_fake, run.disc(x_t, sigma)

        loss, stats = method.generator_objective(x, sigma, eps, predict, run.weighting,
                                                 run.config.gan_weight_gen if gan else 0.0)
        run.opt_student.zero_grad()
        loss.backward()
        run.opt_student.step()
        if critic_optimiser:  # the GAN term's gradient also reached the discriminator
            run.opt_disc.step()
        return stats

    for wrong in (dict(gan=False), dict(order="x-eps-sigma")):
        with pytest.raises(AssertionError, match=r"WRONG - max \|student - library\| = .*Hint: draw x, sigma and eps"):
            checks.check_generator_step(lambda run, wrong=wrong: step(run, **wrong))
    with pytest.raises(AssertionError, match="WRONG - your step drew other random numbers.*Hint: draw x ="):
        checks.check_generator_step(lambda run: step(run, order="extra"))
    with pytest.raises(AssertionError, match="the discriminator changed"):
        checks.check_generator_step(lambda run: step(run, critic_optimiser=True))
    with pytest.raises(AssertionError, match="expected the statistics dict"):
        checks.check_generator_step(lambda run: step(run) and None)


def test_generator_step_check_is_fast():
    checks.check_generator_step(reference.toy_generator_step)  # imports and first calls
    start = time.perf_counter()
    checks.check_generator_step(reference.toy_generator_step)
    assert time.perf_counter() - start < 1.0
