"""Notebook 01 in JupyterLab with a live kernel, driven by headless Chromium: Run All, no error output, the widget's
slider redraws its figure; and the same check fails on a copy whose widget is disconnected from its callback.

The server runs on a free local port with a token, over a temporary copy of the notebook (nothing is written to the
repository), in its own process group, and is shut down in the fixture's teardown. Screenshots land in each test's
tmp_path (printed; ``pytest -s`` shows them)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from browser_harness import browser_page, chromium_or_skip
from notebook_harness import NOTEBOOKS, prepare_environment

pytestmark = [pytest.mark.browser, pytest.mark.notebooks]
NAME = "01_f_divergences.ipynb"
UNHOOKED = "99_widget_unhooked.ipynb"
SERVER_START_S = 180
RUN_ALL_S = 300  # notebook 01 in smoke mode takes ~10 s on an idle 2-core machine
REDRAW_S = 90


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process (Linux): SIGTERM when pytest dies, so a killed test run leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _unhooked_notebook() -> nbformat.NotebookNode:
    """The notebook's control with the callback removed: the slider moves, nothing redraws."""
    source = ("from IPython.display import display\n\nfrom fdistill_lab.gaussian1d import widgets\n\n"
              "control = widgets.mode_seeking_widget('js', 4.0, 0.8, steps=20)\n"
              "for child in control.kwargs_widgets:\n"
              "    child.unobserve(control.update, names='value')\n"
              "display(control)")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    chromium_or_skip()
    prepare_environment()  # the kernel imports this checkout
    base = tmp_path_factory.mktemp("lab")
    root = base / "notebooks"
    root.mkdir()
    shutil.copy(NOTEBOOKS / NAME, root / NAME)
    nbformat.write(_unhooked_notebook(), root / UNHOOKED)
    token, port = secrets.token_hex(16), _free_port()
    env = dict(os.environ, FDISTILL_SMOKE="1", JUPYTER_RUNTIME_DIR=str(base / "runtime"),
               JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:  # CI runs as root
        cmd.append("--allow-root")
    log = base / "jupyter.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as res:
                    json.load(res)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer in {SERVER_START_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield Lab(url, token, root, log)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server's process group (the server and the kernels it started)."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def open_and_run_all(page, lab: Lab, name: str) -> None:
    """Open ``name`` in JupyterLab, Run All Cells from the Run menu, wait until every code cell has run, save."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    _shutdown_kernels(lab)  # else JupyterLab asks which kernel to use (another test's is still running)
    # a workspace of its own, reset: JupyterLab would otherwise reopen the tabs of the previous test
    workspace = Path(name).stem.replace("_", "-")
    page.goto(f"{lab.url}/lab/workspaces/{workspace}/tree/{name}?reset&token={lab.token}", timeout=120_000)
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=120_000)
    kernel = _idle_kernel(lab, name)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=180_000)
    started = ("() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]"
               ".some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))")
    for attempt in range(1, 4):  # a click can be lost while JupyterLab is still settling: retry
        _accept_kernel_choice(page)
        page.locator(".lm-MenuBar-itemLabel").filter(has_text=re.compile(r"^Run$")).click(timeout=30_000)
        page.locator(".lm-Menu-itemLabel").filter(has_text=re.compile(r"^Run All Cells$")).click(timeout=30_000)
        try:
            page.wait_for_function(started, timeout=30_000, polling=250)
            break
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
            if attempt == 3:
                raise AssertionError(f"Run > Run All Cells started no cell of {name} in 3 tries") from None
    n_code = len([c for c in nbformat.read(lab.root / name, as_version=4).cells if c.cell_type == "code"])
    try:
        page.wait_for_function(
            """n => {
                const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
                const done = prompts.filter(p => /\\[\\d+\\]/.test(p.textContent)).length;
                const busy = document.querySelector(".jp-Notebook-ExecutionIndicator[data-status='busy']");
                return prompts.length === n && done === n && !busy;
            }""", arg=n_code, timeout=RUN_ALL_S * 1000, polling=500)
    except PlaywrightTimeout:
        prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
        raise AssertionError(f"{name}: not every cell ran within {RUN_ALL_S} s; prompts {prompts}; kernel "
                             f"{_kernel_ids(lab)} (was {kernel}); server log {lab.log}") from None
    assert _kernel_ids(lab) == [kernel], f"the kernel was replaced during Run All: {_kernel_ids(lab)} != {kernel}"
    page.keyboard.press("Control+s")
    page.wait_for_function("() => !document.querySelector('.jp-NotebookPanel.jp-mod-dirty, .jp-mod-dirty')",
                           timeout=60_000)


def _api(lab: Lab, path: str, method: str = "GET"):
    req = urllib.request.Request(f"{lab.url}{path}", headers={"Authorization": f"token {lab.token}"}, method=method)
    with urllib.request.urlopen(req, timeout=60) as res:
        body = res.read()
    return json.loads(body) if body else None


def _kernel_ids(lab: Lab) -> list[str]:
    return [k["id"] for k in _api(lab, "/api/kernels")]


def _idle_kernel(lab: Lab, name: str, timeout_s: float = 180) -> str:
    """Id of the kernel of ``name``'s session once it reports idle (the page can run cells then)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for s in _api(lab, "/api/sessions"):
            if s["path"].endswith(name) and s["kernel"]["execution_state"] == "idle":
                return s["kernel"]["id"]
        time.sleep(0.5)
    raise AssertionError(f"no idle kernel for {name} within {timeout_s:.0f} s: {_api(lab, '/api/sessions')}")


def _shutdown_kernels(lab: Lab) -> None:
    for kernel_id in _kernel_ids(lab):
        _api(lab, f"/api/kernels/{kernel_id}", method="DELETE")


def _accept_kernel_choice(page) -> None:
    """Accept JupyterLab's "Select Kernel" dialog (its default: the notebook's python3), which would block clicks.
    Any other dialog is an error: accepting it blindly could restart the kernel."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and dialog.first.is_visible():
        text = dialog.first.inner_text()
        assert text.startswith("Select Kernel"), f"unexpected JupyterLab dialog: {text[:300]!r}"
        print(f"accepting JupyterLab dialog: {text[:100]!r}")
        dialog.first.locator(".jp-Dialog-button.jp-mod-accept").first.click(timeout=10_000)


def error_outputs(path: Path) -> list[str]:
    """``ename: evalue`` of every error output in the saved notebook."""
    nb = nbformat.read(path, as_version=4)
    return [f"cell {i}: {o.ename}: {o.evalue}" for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for o in c.outputs if o.output_type == "error"]


def move_slider_and_check_redraw(page, timeout_s: float = REDRAW_S) -> tuple[str, str]:
    """Press an arrow key on the widget's weight slider; AssertionError unless its figure changes within timeout_s.

    Returns the slider's readout before and after."""
    control = page.locator(".widget-interact").first
    control.wait_for(timeout=60_000)
    control.scroll_into_view_if_needed()
    figure = control.locator(".widget-output img").first
    figure.wait_for(timeout=120_000)
    before_src = figure.get_attribute("src")
    slider = control.locator(".widget-hslider").last  # "weight of left mode"
    readout = slider.locator(".widget-readout")
    before = readout.inner_text().strip()
    slider.locator(".noUi-handle").first.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("([el, v]) => el.textContent.trim() !== v", arg=[readout.element_handle(), before],
                           timeout=30_000)
    after = readout.inner_text().strip()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        img = control.locator(".widget-output img").first
        if img.count() and img.get_attribute("src") not in (None, before_src):
            return before, after
        page.wait_for_timeout(500)
    raise AssertionError(f"the widget's figure did not change within {timeout_s:.0f} s after moving its slider "
                         f"from {before} to {after}")


@pytest.mark.timeout(1200)
def test_notebook_01_runs_in_jupyterlab_and_its_widget_redraws(lab, tmp_path):
    with browser_page() as page:
        open_and_run_all(page, lab, NAME)
        errors = error_outputs(lab.root / NAME)
        page.screenshot(path=str(tmp_path / "lab_01_after_run_all.png"), full_page=False)
        assert not errors, f"error outputs after Run All: {errors} (server log: {lab.log})"
        images = sum("image/png" in o.get("data", {}) for c in nbformat.read(lab.root / NAME, as_version=4).cells
                     if c.cell_type == "code" for o in c.outputs)
        assert images >= 7, f"only {images} figures after Run All"
        before, after = move_slider_and_check_redraw(page)
        page.screenshot(path=str(tmp_path / "lab_01_widget_after_move.png"))
        print(f"slider {before} -> {after}; screenshots in {tmp_path}")


@pytest.mark.timeout(900)
def test_the_redraw_check_fails_when_the_widget_is_disconnected(lab, tmp_path):
    with browser_page() as page:
        open_and_run_all(page, lab, UNHOOKED)
        assert not error_outputs(lab.root / UNHOOKED)
        with pytest.raises(AssertionError, match="figure did not change within 20 s"):
            move_slider_and_check_redraw(page, timeout_s=20)
        page.screenshot(path=str(tmp_path / "lab_unhooked_widget.png"))
        print(f"screenshot in {tmp_path}")
