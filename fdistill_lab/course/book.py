"""The workbook as a book: one static website of the README, the syllabus, every executed notebook and ``docs/``.

``python -m fdistill_lab.book [--edition instructor|student] [--smoke] [--no-execute] [--build build]`` runs the
handouts (:mod:`.handouts`) to get executed copies with real outputs, unless ``--no-execute`` reuses those already in
``<build>/handouts/<full|smoke>/executed/``; it then assembles ``<build>/book/<full|smoke>/<edition>/src/`` and
renders it with Sphinx, MyST-NB and the Sphinx Book Theme (the ``book`` extra) into ``.../<edition>/html/``: open
``html/index.html``. Navigation, search and the stored outputs come with the theme; nothing is executed by Sphinx;
MathJax is copied into the site, so formulas typeset offline.
The instructor edition folds each exercise's solution cell (tag ``hide-input``: a "show code" toggle); the student
edition replaces the solutions by the exercise stub, as the student copies do. The Colab install cell is left out.

Why not Jupyter Book 2 (mystmd): its HTML build downloads the site theme at build time from a template server; the
theme is published on no package registry, so that build cannot run offline or on CI. Sphinx with MyST-NB (the
engine of Jupyter Book 1) reads the same MyST markdown and notebooks and installs from PyPI alone.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

from .handouts import ROOT, select_notebooks
from .hosted import INSTALL_TAG, repository_url
from .student_copies import has_solution, student_notebook

EDITIONS = ("instructor", "student")
TITLE = "fdistill-lab: one-step diffusion distillation with f-divergences"
CONF = '''\
# Written by python -m fdistill_lab.book; edit fdistill_lab/course/book.py instead.
project = {title!r}
extensions = ["myst_nb"]
root_doc = "index"
html_theme = "sphinx_book_theme"
html_title = {title!r}
html_theme_options = {{"show_toc_level": 2, "home_page_in_toc": True}}
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header", "misc.highlighting_failure", "mystnb.unknown_mime_type"]  # records: JSON for tests
exclude_patterns = ["_build", "_mathjax"]
# MathJax 2 from the jupyter-server-mathjax package, shipped with the site: formulas typeset offline too
html_static_path = ["_mathjax"]
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
mathjax2_config = {{
    "HTML-CSS": {{"availableFonts": [], "webFont": "STIX-Web", "imageFont": None}},  # the one font it ships
    "tex2jax": {{"processClass": "math|output_area|tex2jax_process"}},  # the theme marks the article "ignore"
}}
'''


def book_notebook(nb: nbformat.NotebookNode, name: str, edition: str) -> nbformat.NotebookNode:
    """The page version of an executed notebook: solutions folded (instructor) or stubbed (student)."""
    if edition not in EDITIONS:
        raise ValueError(f"unknown edition {edition!r}; valid editions: {', '.join(EDITIONS)}")
    nb = copy.deepcopy(nb) if edition == "instructor" else student_notebook(nb, name, clear_outputs=False)
    cells = []
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if INSTALL_TAG in tags:
            continue
        if edition == "instructor" and cell.cell_type == "code" and has_solution(cell.source):
            tags.append("hide-input")
        cells.append(cell)
    nb.cells = cells
    nb.metadata.pop("widgets", None)  # saved widget views cannot render without a kernel
    return nb


def section(markdown: str, heading: str) -> str:
    """The ``## heading`` section of ``markdown`` (up to the next ``## ``); ValueError if there is none."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    if match is None:
        raise ValueError(f"no '## {heading}' section in the README")
    return f"# {heading}\n{match.group(1)}"


def copy_mathjax(dest: Path) -> None:
    """Copy MathJax (from the ``jupyter-server-mathjax`` package of the book extra) to ``dest``."""
    try:
        import jupyter_server_mathjax
    except ImportError as exc:
        raise RuntimeError("jupyter-server-mathjax is missing (pip install -e .[book]): the book ships MathJax "
                           "so that formulas render offline") from exc
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    if not (static / "MathJax.js").is_file():
        raise RuntimeError(f"no MathJax.js in {static}; reinstall jupyter-server-mathjax")
    shutil.copytree(static, dest, ignore=shutil.ignore_patterns("localization", "*.py", "__pycache__"))


def link_outside_pages(markdown: str, url: str) -> str:
    """Point relative links to files that are not pages of the book (``fdistill_lab/method.py``, ``data/README.md``)
    at the repository ``url``; links to notebooks, ``docs/`` and web addresses are kept."""
    def fix(match: re.Match) -> str:
        target = match.group(1)
        inside = target.startswith(("notebooks/", "docs/", "#")) or re.match(r"[a-z]+:", target)
        return match.group(0) if inside else f"]({url}/blob/main/{target})"

    return re.sub(r"\]\(([^)\s]+)\)", fix, markdown)


def assemble(src: Path, executed: dict[str, Path], edition: str, docs: Path = ROOT / "docs",
             readme: Path = ROOT / "README.md") -> list[str]:
    """Write the book's sources into ``src`` (emptied first); return the toc's document names."""
    shutil.rmtree(src, ignore_errors=True)
    (src / "notebooks").mkdir(parents=True)
    readme_text = link_outside_pages(readme.read_text(encoding="utf-8"), repository_url())
    (src / "syllabus.md").write_text(section(readme_text, "Syllabus"),
                                     encoding="utf-8")
    pages = []
    for name, path in executed.items():
        nb = book_notebook(nbformat.read(path, as_version=4), path.name, edition)
        nbformat.write(nb, src / "notebooks" / f"{name}.ipynb")
        pages.append(f"notebooks/{name}")
    shutil.copytree(docs, src / "docs")
    results = [f"docs/{p.stem}" for p in sorted((src / "docs").glob("*.md"))]
    toc = ["", "```{toctree}", ":hidden:", "", "syllabus", "```", "",
           "```{toctree}", ":hidden:", ":caption: Notebooks", "", *pages, "```", "",
           "```{toctree}", ":hidden:", ":caption: Results and guides", "", *results, "```", ""]
    edition_note = f"\n*{edition.capitalize()} edition.*\n"
    first, _, rest = readme_text.partition("\n")
    (src / "index.md").write_text("\n".join([first, edition_note, rest, *toc]), encoding="utf-8")
    copy_mathjax(src / "_mathjax" / "mathjax")
    (src / "conf.py").write_text(CONF.format(title=f"{TITLE} ({edition} edition)"), encoding="utf-8")
    return ["index", "syllabus", *pages, *results]


def render(src: Path, html: Path) -> None:
    """Run Sphinx (html builder) on ``src`` into ``html``; RuntimeError with Sphinx's output tail on failure."""
    shutil.rmtree(html, ignore_errors=True)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-d", str(src / "_build" / "doctrees"),
           str(src), str(html)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"sphinx failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")


def build_book(build: Path, edition: str, smoke: bool, execute: bool = True, notebooks: Path = ROOT / "notebooks",
               only: list[str] | None = None) -> Path:
    """Build one edition of the book under ``build``; return the folder of its ``index.html``."""
    from . import handouts

    if edition not in EDITIONS:
        raise ValueError(f"unknown edition {edition!r}; valid editions: {', '.join(EDITIONS)}")
    mode = "smoke" if smoke else "full"
    paths = select_notebooks(notebooks, only)
    if execute:
        argv = ["--notebooks", str(notebooks), "--build", str(build), "--only", *[p.stem for p in paths]]
        if handouts.main(argv + (["--smoke"] if smoke else [])) != 0:
            raise RuntimeError("a notebook failed to execute (see above); its handout shows the error")
    executed = {p.stem: build / "handouts" / mode / "executed" / p.name for p in paths}
    missing = [str(p) for p in executed.values() if not p.is_file()]
    if missing:
        flag = " --smoke" if smoke else ""
        raise FileNotFoundError(f"no executed copy: {', '.join(missing)}; run python -m fdistill_lab.handouts{flag} "
                                "first, or build without --no-execute")
    root = build / "book" / mode / edition
    assemble(root / "src", executed, edition)
    render(root / "src", root / "html")
    return root / "html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdistill_lab.book", description=__doc__.splitlines()[0])
    parser.add_argument("--edition", choices=EDITIONS, default="instructor", help="solutions folded or removed")
    parser.add_argument("--smoke", action="store_true", help="build from smoke-mode runs (small sizes)")
    parser.add_argument("--no-execute", dest="execute", action="store_false",
                        help="reuse the handouts' executed copies instead of running the notebooks")
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="notebook names, e.g. 01_f_divergences")
    parser.add_argument("--notebooks", type=Path, default=ROOT / "notebooks", help="folder of the notebooks")
    parser.add_argument("--build", type=Path, default=ROOT / "build", help="build folder")
    args = parser.parse_args(argv)
    try:
        html = build_book(args.build, args.edition, args.smoke, args.execute, args.notebooks, args.only)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"book ({args.edition} edition) -> {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
