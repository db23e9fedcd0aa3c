"""Student copies of the notebooks: solutions replaced by nbgrader's stub, outputs cleared.

``python -m fdistill_lab.student notebooks/ build/student`` rewrites every ``*.ipynb``: each
``### BEGIN SOLUTION`` .. ``### END SOLUTION`` region becomes ``# YOUR CODE HERE`` plus
``raise NotImplementedError()`` (same indentation; ``YOUR ANSWER HERE`` in markdown cells),
``### BEGIN HIDDEN TESTS`` .. ``### END HIDDEN TESTS`` regions are deleted, outputs, execution counts and
widget state are cleared. As in nbgrader, a marker is any line containing
``BEGIN SOLUTION`` (etc.), whatever its comment prefix; a cell tagged ``solution`` without a region is an
error, never copied whole.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import nbformat

BEGIN, END = "BEGIN SOLUTION", "END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
MARKDOWN_STUB = ("YOUR ANSWER HERE",)


def _marker(line: str) -> str | None:
    """The marker a line holds (nbgrader's rule: the text anywhere in the line), or None."""
    for m in (BEGIN_HIDDEN, END_HIDDEN, BEGIN, END):
        if m in line:
            return m
    return None


def strip_source(source: str, where: str = "cell", stub: tuple[str, ...] = STUB) -> str:
    """Replace solution regions by ``stub`` and drop hidden-test regions; ValueError on unbalanced markers."""
    out: list[str] = []
    state = None  # None, "solution" or "hidden"
    for lineno, line in enumerate(source.splitlines(), 1):
        marker = _marker(line)
        if marker in (BEGIN, BEGIN_HIDDEN):
            if state is not None:
                raise ValueError(f"{where}, line {lineno}: {marker!r} inside an open {state} region")
            state = "solution" if marker == BEGIN else "hidden"
            if state == "solution":
                indent = line[: len(line) - len(line.lstrip())]
                out += [indent + s for s in stub]
        elif marker in (END, END_HIDDEN):
            expected = "solution" if marker == END else "hidden"
            if state != expected:
                raise ValueError(f"{where}, line {lineno}: {marker!r} without a matching BEGIN")
            state = None
        elif state is None:
            out.append(line)
    if state is not None:
        raise ValueError(f"{where}: {state} region is not closed (missing END marker)")
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def has_solution(source: str) -> bool:
    return any(_marker(line) == BEGIN for line in source.splitlines())


def student_notebook(nb: nbformat.NotebookNode, name: str = "notebook", clear_outputs: bool = True
                     ) -> nbformat.NotebookNode:
    """A copy of ``nb`` with solutions stubbed (and, by default, outputs and widget state cleared)."""
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):
        where = f"{name} cell {i}"
        if "solution" in cell.metadata.get("tags", []) and not has_solution(cell.source):
            raise ValueError(f"{where} is tagged 'solution' but has no BEGIN SOLUTION .. END SOLUTION region; "
                             "mark the part to hide (the cell would otherwise be copied whole)")
        if cell.cell_type == "code":
            cell.source = strip_source(cell.source, where)
            if clear_outputs:
                cell.outputs = []
                cell.execution_count = None
        elif cell.cell_type in ("markdown", "raw"):
            cell.source = strip_source(cell.source, where, MARKDOWN_STUB)
    if clear_outputs:
        nb.metadata.pop("widgets", None)
    return nb


def write_student_copies(src: Path, dest: Path) -> list[Path]:
    """Write student copies of ``src`` (a notebook or a folder of them) into ``dest``; return the paths."""
    paths = [src] if src.is_file() else sorted(src.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no notebooks found at {src}")
    clash = [p for p in paths if (dest / p.name).resolve() == p.resolve()]
    if clash:
        raise ValueError(f"{dest} would overwrite the instructor notebook {clash[0]} (solutions would be lost); "
                         "pick another output folder, e.g. build/student")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        out = dest / path.name
        nbformat.write(student_notebook(nb, path.name), out)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdistill_lab.student", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="a notebook or a folder of notebooks (e.g. notebooks/)")
    parser.add_argument("dest", type=Path, help="output folder (e.g. build/student)")
    args = parser.parse_args(argv)
    try:
        written = write_student_copies(args.src, args.dest)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for out in written:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
