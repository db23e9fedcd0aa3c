"""The book: page versions of the notebooks per edition, and a smoke build of the whole site (every notebook's page
and its figures exist; headless Chromium screenshots of the landing page and notebook 02 show navigation, figures)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from browser_harness import browser_page
from notebook_harness import NOTEBOOKS, prepare_environment

from fdistill_lab.course import book

NAMES = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_editions_fold_or_remove_the_solutions_and_drop_the_install_cell():
    nb = nbformat.read(NOTEBOOKS / "01_f_divergences.ipynb", as_version=4)
    teacher = book.book_notebook(nb, "01", "instructor")
    pupil = book.book_notebook(nb, "01", "student")
    folded = [c for c in teacher.cells if "hide-input" in c.metadata.get("tags", [])]
    assert len(folded) == 2 and all("BEGIN SOLUTION" in c.source for c in folded)
    assert not any("BEGIN SOLUTION" in c.source for c in pupil.cells)
    assert sum("raise NotImplementedError()" in c.source for c in pupil.cells) == 2
    for page in (teacher, pupil):
        assert not any("hosted-install" in c.metadata.get("tags", []) for c in page.cells)
        assert len(page.cells) == len(nb.cells) - 1
    with pytest.raises(ValueError, match="unknown edition 'teacher'; valid editions: instructor, student"):
        book.book_notebook(nb, "01", "teacher")
    with pytest.raises(ValueError, match="no '## Nope' section"):
        book.section("# t\n## Syllabus\nx\n", "Nope")
    assert book.section("# t\n## Syllabus\nrow\n## Next\ny\n", "Syllabus") == "# Syllabus\nrow\n"


def test_links_to_files_outside_the_book_go_to_the_repository():
    text = "see [m](fdistill_lab/method.py), [d](data/README.md), [n](notebooks/01_a.ipynb), [r](docs/r.md), " \
           "[w](https://x.org/a), [s](#syllabus)"
    assert book.link_outside_pages(text, "https://github.com/o/r") == (
        "see [m](https://github.com/o/r/blob/main/fdistill_lab/method.py), "
        "[d](https://github.com/o/r/blob/main/data/README.md), [n](notebooks/01_a.ipynb), [r](docs/r.md), "
        "[w](https://x.org/a), [s](#syllabus)")


def test_no_execute_without_executed_copies_names_the_command(tmp_path, capsys):
    pytest.importorskip("myst_nb", reason="the book extra is not installed (pip install -e .[book])")
    assert book.main(["--no-execute", "--smoke", "--only", "01_f_divergences", "--build", str(tmp_path)]) == 1
    assert "run python -m fdistill_lab.handouts --smoke first" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory) -> dict[str, Path]:
    """Both editions built from one smoke execution of every notebook (the student one reuses the executed copies)."""
    pytest.importorskip("myst_nb", reason="the book extra is not installed (pip install -e .[book])")
    pytest.importorskip("sphinx_book_theme", reason="the book extra is not installed (pip install -e .[book])")
    prepare_environment()
    build = tmp_path_factory.mktemp("book")
    assert book.main(["--smoke", "--build", str(build)]) == 0
    assert book.main(["--smoke", "--no-execute", "--edition", "student", "--build", str(build)]) == 0
    return {e: build / "book" / "smoke" / e / "html" for e in book.EDITIONS}


def _images(html: Path) -> list[str]:
    return re.findall(r'<img[^>]+src="([^"]+)"', html.read_text(encoding="utf-8"))


@pytest.mark.notebooks
@pytest.mark.timeout(1200)
def test_smoke_book_has_every_page_and_figure(smoke_book):
    for edition, site in smoke_book.items():
        index = (site / "index.html").read_text(encoding="utf-8")
        assert (site / "syllabus.html").is_file() and (site / "search.html").is_file()
        assert (site / "searchindex.js").is_file()
        for doc in sorted((book.ROOT / "docs").glob("*.md")):
            assert (site / "docs" / f"{doc.stem}.html").is_file(), f"{edition}: docs/{doc.name} has no page"
        study = site / "docs" / "notebook03_full_study.html"
        assert len(_images(study)) >= 4 and all((study.parent / s).resolve().is_file() for s in _images(study))
        for name in NAMES:
            page = site / "notebooks" / f"{name}.html"
            assert page.is_file(), f"{edition}: no page for {name}"
            assert f'href="notebooks/{name}.html"' in index, f"{edition}: {name} is not in the navigation"
            images = [src for src in _images(page) if not src.startswith("http")]
            assert images, f"{edition}: {name} shows no figure"
            for src in images:
                assert (page.parent / src).resolve().is_file(), f"{edition}: {name} figure {src} is missing"
    teacher = (smoke_book["instructor"] / "notebooks" / "01_f_divergences.html").read_text(encoding="utf-8")
    pupil = (smoke_book["student"] / "notebooks" / "01_f_divergences.html").read_text(encoding="utf-8")
    assert teacher.count("BEGIN SOLUTION") == 2 and teacher.count("hide-input") >= 2
    assert "BEGIN SOLUTION" not in pupil and pupil.count("YOUR CODE HERE") == 2
    assert "Open In Colab" in teacher and "REQUIREMENT" not in teacher  # the link stays, the install cell goes


@pytest.mark.notebooks
@pytest.mark.browser
@pytest.mark.timeout(1200)
def test_book_screenshots_show_navigation_text_and_figures(smoke_book, tmp_path):
    site = smoke_book["instructor"]
    with browser_page() as page:
        for shot, rel in [("landing", "index.html"), ("notebook02", "notebooks/02_toy_mode_coverage.html")]:
            page.goto((site / rel).as_uri(), wait_until="load", timeout=120_000)
            nav = page.locator("nav.bd-docs-nav")
            assert nav.is_visible(), f"{rel}: the navigation is not visible"
            for name in NAMES:
                if not rel.endswith(f"{name}.html"):  # the page's own entry links to "#"
                    assert nav.locator(f'a[href$="{name}.html"]').count() == 1, f"{rel}: no link to {name}"
            assert page.locator("article h1").first.is_visible()
            page.wait_for_function(  # MathJax ships with the site: formulas are typeset offline
                "() => window.MathJax && MathJax.Hub && MathJax.Hub.queue.pending === 0"
                " && document.querySelectorAll('article .MathJax').length > 3", timeout=60_000)
            if shot == "notebook02":
                figures = page.locator("article img[src*='_images']")
                assert figures.count() >= 3
                figures.first.scroll_into_view_if_needed()
                widths = figures.evaluate_all("els => els.map(e => e.naturalWidth)")
                assert all(w > 0 for w in widths), f"figures that did not load: {widths}"
            path = tmp_path / f"book_{shot}.png"
            page.screenshot(path=str(path))
            print(f"screenshot: {path}")
