"""Hosted notebooks: the Colab link and install cell are rendered from pyproject's one URL, do nothing where the
package is installed, and install it where it is missing (a fresh venv, offline, from a locally built wheel)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement

from fdistill_lab.course import hosted

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def _nb(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_notebooks_carry_the_cells_rendered_from_pyproject():
    url = hosted.repository_url(ROOT / "pyproject.toml")
    assert hosted.out_of_date(NOTEBOOKS, url) == [], "run python -m fdistill_lab.course.hosted --write"
    assert set(hosted.HOSTED) | set(hosted.NOT_HOSTED) == {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")}
    for name in hosted.HOSTED:
        nb = _nb(name)
        assert [i for i, c in enumerate(nb.cells) if c.cell_type == "code"][0] == 1, "install cell is the first code"
        assert "parameters" in nb.cells[2].metadata.get("tags", []), f"{name}: the parameters cell follows it"
        assert f"]({hosted.colab_url(url, name)})" in nb.cells[0].source
    for name in hosted.NOT_HOSTED:
        nb = _nb(name)
        assert not hosted.install_cells(nb) and "colab" not in nb.cells[0].source.lower()


def test_requirement_names_this_package_its_extra_and_the_url():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    url = project["urls"]["Repository"]
    req = Requirement(hosted.install_requirement(url))
    assert req.name == project["name"] and req.extras == {"notebooks"} and req.url == f"git+{url}"
    assert hosted.install_requirement(url) in hosted.install_cell_source(url)


def test_bad_repository_url_is_rejected_with_the_key_to_set(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n')
    with pytest.raises(ValueError, match=r"set \[project.urls\] Repository"):
        hosted.repository_url(pyproject)
    pyproject.write_text('[project]\nname = "x"\n[project.urls]\nRepository = "https://gitlab.com/a/b"\n')
    with pytest.raises(ValueError, match="must be https://github.com/OWNER/NAME"):
        hosted.repository_url(pyproject)


def test_write_is_idempotent_and_check_detects_a_stale_cell(tmp_path):
    for name in (*hosted.HOSTED, *hosted.NOT_HOSTED):
        (tmp_path / f"{name}.ipynb").write_bytes((NOTEBOOKS / f"{name}.ipynb").read_bytes())
    assert hosted.main(["--check", "--notebooks", str(tmp_path)]) == 0
    assert hosted.main(["--write", "--notebooks", str(tmp_path)]) == 0
    nb = nbformat.read(tmp_path / "01_f_divergences.ipynb", as_version=4)
    assert len(hosted.install_cells(nb)) == 1 and nb.cells[0].source.count("Open In Colab") == 1
    nb.cells[1].source = nb.cells[1].source.replace("fdistill-lab/fdistill-lab", "someone/else")
    nbformat.write(nb, tmp_path / "01_f_divergences.ipynb")
    assert hosted.main(["--check", "--notebooks", str(tmp_path)]) == 1


def test_write_leaves_current_notebooks_alone_and_keeps_a_stale_cells_id(tmp_path):
    """--write rewrites only stale notebooks, and reuses the install cell (its id): the committed, stripped
    notebooks stay byte for byte what nbstripout made of them."""
    for name in (*hosted.HOSTED, *hosted.NOT_HOSTED):
        (tmp_path / f"{name}.ipynb").write_bytes((NOTEBOOKS / f"{name}.ipynb").read_bytes())
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.ipynb")}
    assert hosted.main(["--write", "--notebooks", str(tmp_path)]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.ipynb")} == before
    path = tmp_path / "02_toy_mode_coverage.ipynb"
    stale = nbformat.read(path, as_version=4)
    cell_id = stale.cells[1]["id"]
    stale.cells[1].source = "print('an old install cell')"
    nbformat.write(stale, path)
    assert hosted.main(["--write", "--notebooks", str(tmp_path)]) == 0
    fixed = nbformat.read(path, as_version=4)
    assert fixed.cells[1]["id"] == cell_id and hosted.install_cells(fixed) == [1]
    assert path.read_bytes() == before[path.name]


def test_install_cell_does_nothing_where_the_package_is_installed(monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError(f"the install cell ran {args} although fdistill_lab is importable")

    monkeypatch.setattr(subprocess, "run", no_pip)
    exec(compile(_nb("01_f_divergences").cells[1].source, "<install cell>", "exec"), {})


@pytest.mark.timeout(600)
def test_install_cell_installs_into_a_fresh_environment(tmp_path):
    """The cell of notebook 01, with the git URL swapped for a wheel built here, run by a fresh venv's python.

    Offline: pip gets no index and no dependencies (torch & co. would be a download; what is tested is that the
    cell finds the package missing, installs it, and that it then imports from the venv)."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(ROOT)], check=True, timeout=300)
    (wheel,) = wheels.glob("fdistill_lab-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)  # no system site packages: fdistill_lab is absent there
    python = env_dir / "bin" / "python"
    url = hosted.repository_url(ROOT / "pyproject.toml")
    source = _nb("01_f_divergences").cells[1].source
    assert source.count(f"git+{url}") == 1
    source = source.replace(f"git+{url}", wheel.resolve().as_uri())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_NO_INDEX="1", PIP_NO_DEPS="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    where = [str(python), "-c", "import importlib.util as u; print(u.find_spec('fdistill_lab'))"]
    run = dict(env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    before = subprocess.run(where, **run)
    assert before.stdout.strip() == "None", f"fdistill_lab should be absent from the fresh venv: {before.stdout}"
    cell = subprocess.run([str(python), "-c", source], **run)
    assert cell.returncode == 0, f"the install cell failed:\n{cell.stdout}\n{cell.stderr}"
    after = subprocess.run([str(python), "-c", "import fdistill_lab; print(fdistill_lab.__version__, "
                            "fdistill_lab.__file__)"], **run)
    assert after.returncode == 0, after.stderr
    version, origin = after.stdout.split()
    assert version == fdistill_lab_version() and Path(origin).is_relative_to(env_dir), after.stdout


def fdistill_lab_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
