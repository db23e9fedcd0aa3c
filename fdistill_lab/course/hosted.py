"""Hosted notebooks (Colab): an "Open in Colab" link in each CPU notebook's title and a first code cell that
installs the workbook where it is missing.

The repository URL lives in one place, ``[project.urls] Repository`` of ``pyproject.toml``; the link and the cell
are rendered from it. ``python -m fdistill_lab.course.hosted --write`` (re)writes them into the notebooks after a
change of the URL (then run ``python -m nbstripout notebooks/*.ipynb``), ``--check`` exits 1 when a notebook is out
of date. The cell does nothing where ``fdistill_lab`` is importable (a local install, CI, papermill runs); on a
hosted runtime without it, it pip-installs ``fdistill-lab[notebooks] @ git+<Repository>``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

import nbformat

from .handouts import ROOT

HOSTED = ("01_f_divergences", "02_toy_mode_coverage", "03_ratio_normalisation_and_sensitivity", "04_digits")
NOT_HOSTED = {"05_imagenet": "its real run needs the ImageNet-64 data, the EDM downloads and days on 8 GPUs, "
                             "more than a hosted runtime holds",
              "06_text_to_image": "its real run needs the SD1.5 download, an image-caption data set and a multi-GPU "
                                  "job, more than a hosted runtime holds"}
INSTALL_TAG = "hosted-install"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
BADGE_PREFIX = "[![Open In Colab]"
INSTALL_CELL = '''\
# On a hosted runtime (Colab) without the workbook, install it with its notebooks extra; elsewhere: nothing.
import importlib.util
import subprocess
import sys

REQUIREMENT = "{requirement}"
if importlib.util.find_spec("fdistill_lab") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", REQUIREMENT], check=True)'''


def repository_url(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The GitHub URL in ``[project.urls] Repository`` (ValueError, naming the key, if it is missing or not GitHub)."""
    urls = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"].get("urls", {})
    url = urls.get("Repository")
    if not url:
        raise ValueError(f"{pyproject}: set [project.urls] Repository = \"https://github.com/OWNER/NAME\"")
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"{pyproject}: [project.urls] Repository must be https://github.com/OWNER/NAME "
                         f"(Colab opens notebooks from GitHub); got {url!r}")
    return url


def install_requirement(url: str) -> str:
    return f"fdistill-lab[notebooks] @ git+{url}"


def install_cell_source(url: str) -> str:
    return INSTALL_CELL.format(requirement=install_requirement(url))


def colab_url(url: str, notebook: str, branch: str = "main") -> str:
    """Colab's address of ``notebooks/<notebook>.ipynb`` on ``branch`` of the GitHub repository ``url``."""
    return f"https://colab.research.google.com/github/{url.removeprefix('https://github.com/')}/blob/{branch}/" \
           f"notebooks/{notebook}.ipynb"


def badge_line(url: str, notebook: str) -> str:
    return f"{BADGE_PREFIX}({BADGE})]({colab_url(url, notebook)})"


def with_hosted_cells(nb: nbformat.NotebookNode, name: str, url: str) -> nbformat.NotebookNode:
    """``nb`` with the badge as the title cell's last line and the install cell first among the code cells."""
    title = nb.cells[0]
    if title.cell_type != "markdown" or not title.source.startswith("# "):
        raise ValueError(f"{name}: the first cell must be the markdown title cell (# ...)")
    lines = [line for line in title.source.rstrip("\n").split("\n") if not line.startswith(BADGE_PREFIX)]
    while lines and not lines[-1].strip():
        lines.pop()
    title.source = "\n".join([*lines, "", badge_line(url, name)])
    existing = [c for c in nb.cells if INSTALL_TAG in c.metadata.get("tags", [])]
    cells = [c for c in nb.cells if INSTALL_TAG not in c.metadata.get("tags", [])]
    # the first install cell is kept (its id too, so a stripped notebook stays stripped) with the rendered source
    cell = existing[0] if existing else nbformat.v4.new_code_cell()
    cell.source, cell.outputs, cell.execution_count = install_cell_source(url), [], None
    cell.metadata["tags"] = [INSTALL_TAG]
    nb.cells = [cells[0], cell, *cells[1:]]
    return nb


def install_cells(nb: nbformat.NotebookNode) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if INSTALL_TAG in c.metadata.get("tags", [])]


def out_of_date(notebooks: Path, url: str) -> list[str]:
    """Names of hosted notebooks whose badge or install cell differs from the one rendered from ``url``."""
    stale = []
    for name in HOSTED:
        nb = nbformat.read(notebooks / f"{name}.ipynb", as_version=4)
        cells = install_cells(nb)
        if (cells != [1] or nb.cells[1].source != install_cell_source(url)
                or badge_line(url, name) not in nb.cells[0].source.split("\n")):
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdistill_lab.course.hosted", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="write the link and the install cell into the notebooks")
    group.add_argument("--check", action="store_true", help="exit 1 if a notebook's link or cell is out of date")
    parser.add_argument("--notebooks", type=Path, default=ROOT / "notebooks", help="folder of the notebooks")
    args = parser.parse_args(argv)
    try:
        url = repository_url()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        stale = out_of_date(args.notebooks, url)
        if stale:
            print(f"error: out of date: {', '.join(stale)}; run python -m fdistill_lab.course.hosted --write",
                  file=sys.stderr)
            return 1
        print(f"hosted cells up to date ({url})")
        return 0
    stale = out_of_date(args.notebooks, url)
    for name in stale:  # only these are rewritten: an up-to-date notebook is left byte for byte
        path = args.notebooks / f"{name}.ipynb"
        nbformat.write(with_hosted_cells(nbformat.read(path, as_version=4), name, url), path)
        print(f"wrote {path}")
    print(f"{len(stale)} of {len(HOSTED)} notebooks rewritten ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
