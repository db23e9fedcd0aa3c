"""The sweep tool on a tiny throwaway notebook: grid expansion, run folders, resume, failures, the table, CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from fdistill_lab.course import sweep
from fdistill_lab.course.records import read_records, record
from fdistill_lab.files import lock_file

pytestmark = pytest.mark.notebooks  # starts real kernels (about 15 papermill runs of a two-cell notebook)

PARAMS = '''a: int = 1  # a number
b: str = "x"  # a label
fail: bool = False  # raise in the second cell
smoke: bool = False  # unused
seed: int = 0  # unused
output_dir: str = "out"  # where results.json goes'''

BODY = '''from pathlib import Path
from fdistill_lab.course.records import record
if fail:
    raise RuntimeError(f"deliberate failure for a={a}")
with open(Path(output_dir).parent.parent / "calls.log", "a") as fh:
    fh.write(f"{a},{b}\\n")
record(output_dir, "double", 2 * a)
record(output_dir, "info", {"label": b, "smoke": smoke, "history": list(range(40))})'''


def write_tiny(path: Path, params: str = PARAMS, body: str = BODY, markdown: str | None = None,
               outputs: bool = False) -> Path:
    """Write the tiny notebook (optionally after a markdown cell, and with a stale output in its body cell)."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    code = nbformat.v4.new_code_cell(body)
    if outputs:
        code.execution_count = 7
        code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="old output\n")]
    nb.cells = ([nbformat.v4.new_markdown_cell(markdown)] if markdown is not None else []) + [cell, code]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("nb") / "tiny.ipynb")


def calls(out: Path) -> list[str]:
    log = out / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_expand_grid_order_and_errors():
    points = sweep.expand_grid({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(points) == 6 and points[0] == {"a": 1, "b": "x"} and points[1] == {"a": 1, "b": "y"}
    assert points[-1] == {"a": 2, "b": "z"}
    with pytest.raises(ValueError, match="empty"):
        sweep.expand_grid({"a": []})
    with pytest.raises(TypeError, match="list of values"):
        sweep.expand_grid({"a": "12"})
    with pytest.raises(ValueError, match="repeats"):
        sweep.expand_grid({"a": [1, 1]})


def test_run_names_are_stable_and_distinct():
    p = {"a": 1, "b": "x y/z"}
    name = sweep.run_name(p, ["a", "b"])
    assert name == sweep.run_name(dict(reversed(list(p.items()))), ["a", "b"])
    assert name.startswith("a-1_b-x-y-z-") and "/" not in name
    assert sweep.run_name({"a": 1, "b": "x"}) != sweep.run_name({"a": 1, "b": "x", "c": 0.1})
    assert len(sweep.params_hash(p)) == 10 and sweep.params_hash(p) == sweep.params_hash(dict(p))


def test_parameters_are_checked_before_running(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown grid parameter 'c'.*a, b, fail, seed, smoke"):
        sweep.run_sweep(tiny, {"c": [1]}, tmp_path)
    with pytest.raises(ValueError, match="set by the sweep"):
        sweep.run_sweep(tiny, {"output_dir": ["x"]}, tmp_path)
    with pytest.raises(TypeError, match="must be int"):
        sweep.run_sweep(tiny, {"a": ["1"]}, tmp_path)
    with pytest.raises(ValueError, match="both in grid and base_params"):
        sweep.run_sweep(tiny, {"a": [1]}, tmp_path, base_params={"a": 2})
    for kwargs, message in (({"smoke": "false"}, "smoke must be True, False or None"),
                            ({"threads_per_run": 0}, "threads_per_run must be an integer >= 1"),
                            ({"timeout_s": 0}, "timeout_s must be > 0"), ({"timeout_s": -1}, "timeout_s must be > 0")):
        with pytest.raises(ValueError, match=message):  # refused, not quietly replaced
            sweep.run_sweep(tiny, {"a": [1]}, tmp_path, **kwargs)
    assert not (tmp_path / "runs").exists()


def test_values_are_converted_before_they_name_a_run(tmp_path):
    """An int given for a float parameter names the same run as the float (the command line parses 1 as 1.0)."""
    nb = write_tiny(tmp_path / "f.ipynb", params=PARAMS.replace("a: int = 1", "a: float = 1.0"))
    _, one = sweep.plan(nb, {"a": [1, 1.0, 2]}, tmp_path / "out")
    assert [p for p, _ in one] == [{"a": 1.0}, {"a": 2.0}]
    _, cli = sweep.plan(nb, [{"a": sweep.parse_value("1", "float")}], tmp_path / "out")
    assert cli[0][1] == one[0][1]


def test_sweep_resume_failures_and_table(tiny, tmp_path):
    out = tmp_path / "sw"
    grid = {"a": [1, 2, 3], "fail": [False, True]}
    table = sweep.run_sweep(tiny, grid, out, jobs=2, base_params={"b": "q"}, smoke=True, progress=False)
    assert table.attrs == {"skipped": 0, "ran": 6, "failed": 3}
    assert list(table["a"]) == [1, 1, 2, 2, 3, 3]
    ok = table[table.status == "done"]
    assert list(ok["double"]) == [2, 4, 6] and list(ok["info.label"]) == ["q"] * 3
    assert list(ok["info.smoke"]) == [True] * 3
    assert "info.history" not in table.columns  # long lists stay out of the table
    bad = table[table.status == "failed"]
    assert len(bad) == 3 and bad.error.str.contains("RuntimeError: deliberate failure").all()
    for run_dir in bad.run_dir:
        assert "deliberate failure" in (Path(run_dir) / sweep.ERROR_FILE).read_text()
        assert (Path(run_dir) / sweep.EXECUTED_FILE).is_file()
    assert sorted(calls(out)) == ["1,q", "2,q", "3,q"]

    # resume: finished runs are skipped; failed ones are kept (retry_failed=False) or rerun
    again = sweep.run_sweep(tiny, grid, out, jobs=1, base_params={"b": "q"}, smoke=True, retry_failed=False,
                            progress=False)
    assert again.attrs == {"skipped": 6, "ran": 0, "failed": 3} and len(calls(out)) == 3
    pd.testing.assert_frame_equal(again.drop(columns="seconds"), table.drop(columns="seconds"))

    # an interrupted run (results.json written, no status) and a done run whose results vanished are rerun
    first, second = (Path(d) for d in ok.run_dir[:2])
    (first / sweep.STATUS_FILE).unlink()
    (second / "results.json").unlink()
    assert sweep.run_status(first)["status"] == "pending" and not sweep.is_finished(second)
    grid_ok = {"a": [1, 2, 3], "fail": [False]}
    third = sweep.run_sweep(tiny, grid_ok, out, jobs=1, base_params={"b": "q"}, smoke=True, progress=False)
    assert third.attrs == {"skipped": 1, "ran": 2, "failed": 0}
    assert sorted(calls(out)) == ["1,q", "1,q", "2,q", "2,q", "3,q"]

    # the collected table covers every run under out/ and is written as CSV
    csv = pd.read_csv(out / sweep.TABLE_FILE)
    assert len(csv) == 6 and set(csv.status) == {"done", "failed"}
    assert sorted(csv.loc[csv.status == "done", "double"]) == [2, 4, 6]
    assert json.loads((first / sweep.PARAMS_FILE).read_text()) == {"a": 1, "b": "q", "fail": False, "smoke": True}



def test_changed_notebook_is_kept_with_a_warning_or_rerun_on_request(tmp_path):
    nb, out = write_tiny(tmp_path / "nb.ipynb"), tmp_path / "sw"
    old = sweep.notebook_hash(nb)[:sweep.SHORT_HASH]
    first = sweep.run_sweep(nb, {"a": [1, 2]}, out, jobs=1, progress=False)
    assert list(first[sweep.HASH_COLUMN]) == [old, old]

    # after a code edit, a resumed sweep keeps the old results by default, loudly
    write_tiny(nb, body=BODY + '\nrecord(output_dir, "version", 2)')
    new = sweep.notebook_hash(nb)[:sweep.SHORT_HASH]
    assert new != old
    changed = r"2 finished run\(s\) of this sweep .* another version of nb\.ipynb.*rerun_changed=True.*--rerun-changed"
    with pytest.warns(sweep.NotebookChangedWarning, match=changed):
        second = sweep.run_sweep(nb, {"a": [1, 2, 3]}, out, jobs=1, progress=False)
    assert second.attrs == {"skipped": 2, "ran": 1, "failed": 0} and calls(out) == ["1,x", "2,x", "3,x"]
    assert list(second[sweep.HASH_COLUMN]) == [old, old, new]
    assert list(second["version"].fillna(0)) == [0, 0, 2]
    assert sorted(sweep.collect(out)[sweep.HASH_COLUMN]) == sorted([old, old, new])
    assert sorted(pd.read_csv(out / sweep.TABLE_FILE)[sweep.HASH_COLUMN]) == sorted([old, old, new])

    # a run finished before hashes were recorded counts as changed too
    status_file = Path(second.run_dir[2]) / sweep.STATUS_FILE
    status = json.loads(status_file.read_text())
    status_file.write_text(json.dumps({k: v for k, v in status.items() if k != sweep.HASH_KEY}))
    with pytest.warns(sweep.NotebookChangedWarning, match=r"^1 finished run\(s\)"):
        legacy = sweep.run_sweep(nb, {"a": [3]}, out, jobs=1, progress=False)
    assert legacy.attrs["ran"] == 0 and list(legacy[sweep.HASH_COLUMN]) == [""]
    status_file.write_text(json.dumps(status))

    # rerun_changed reruns exactly the runs of the grid made with another version, without warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", sweep.NotebookChangedWarning)
        third = sweep.run_sweep(nb, {"a": [1, 2, 3]}, out, jobs=1, progress=False, rerun_changed=True)
    assert third.attrs == {"skipped": 1, "ran": 2, "failed": 0}
    assert calls(out) == ["1,x", "2,x", "3,x", "1,x", "2,x"]
    assert list(third[sweep.HASH_COLUMN]) == [new] * 3 and list(third["version"]) == [2] * 3

    # a changed parameter default is a code change; the command line warns, or reruns with --rerun-changed
    write_tiny(nb, params=PARAMS.replace('b: str = "x"', 'b: str = "y"'), body=BODY)
    cli = [str(nb), "--grid", "a=1", "--out", str(out), "--jobs", "1"]
    with pytest.warns(sweep.NotebookChangedWarning, match=r"^1 finished run\(s\)"):
        assert sweep.main(cli) == 0
    assert len(calls(out)) == 5
    assert sweep.main([*cli, "--rerun-changed"]) == 0
    assert calls(out)[5:] == ["1,y"]


def test_markdown_and_outputs_do_not_change_the_notebook_hash(tmp_path):
    nb, out = write_tiny(tmp_path / "nb.ipynb"), tmp_path / "sw"
    before = sweep.notebook_hash(nb)
    sweep.run_sweep(nb, {"a": [1]}, out, jobs=1, progress=False)
    write_tiny(nb, markdown="# Notes\nedited prose", outputs=True)  # also new cell ids and a stale output
    assert sweep.notebook_hash(nb) == before
    assert sweep.notebook_hash(write_tiny(tmp_path / "edited.ipynb", body=BODY + "\n")) != before
    with warnings.catch_warnings():
        warnings.simplefilter("error", sweep.NotebookChangedWarning)
        again = sweep.run_sweep(nb, {"a": [1]}, out, jobs=1, progress=False, rerun_changed=True)
    assert again.attrs == {"skipped": 1, "ran": 0, "failed": 0} and calls(out) == ["1,x"]
    assert list(again[sweep.HASH_COLUMN]) == [before[:sweep.SHORT_HASH]]

def test_notebook_without_results_counts_as_failed(tmp_path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('smoke: bool = False  # s\nseed: int = 0  # s\noutput_dir: str = "o"  # o')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "silent.ipynb"
    nbformat.write(nb, path)
    table = sweep.run_sweep(path, {"seed": [0]}, tmp_path / "out", progress=False)
    assert table.status.tolist() == ["failed"] and "recorded no results" in table.error[0]


def test_command_line(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = sweep.main([str(tiny), "--grid", "a=4,5", "--param", "b=cli", "--out", str(out), "--jobs", "1", "--smoke"])
    assert rc == 0
    csv = pd.read_csv(out / sweep.TABLE_FILE)
    assert sorted(csv.double) == [8, 10] and set(csv["info.label"]) == {"cli"} and csv.smoke.all()
    assert sweep.main([str(tiny), "--grid", "a=4", "--grid", "fail=True", "--out", str(out), "--jobs", "1"]) == 1
    with pytest.raises(SystemExit, match="unknown parameter; the notebook declares"):
        sweep.main([str(tiny), "--grid", "nope=1", "--out", str(out)])
    with pytest.raises(SystemExit, match="is not an int"):
        sweep.main([str(tiny), "--grid", "a=1.5", "--out", str(out)])
    with pytest.raises(SystemExit, match="is not a bool"):
        sweep.main([str(tiny), "--grid", "fail=maybe", "--out", str(out)])


def test_command_line_refuses_repeated_keys(tiny, tmp_path):
    out = tmp_path / "cli"
    with pytest.raises(SystemExit, match="--grid 'a' is given more than once; give all its values in one --grid a="):
        sweep.main([str(tiny), "--grid", "a=0,1", "--grid", "a=2", "--out", str(out)])
    with pytest.raises(SystemExit, match="--param 'b' is given more than once; give one --param b=VALUE"):
        sweep.main([str(tiny), "--grid", "a=0", "--param", "b=x", "--param", "b=y", "--out", str(out)])
    assert not out.exists()


def test_parse_value():
    assert sweep.parse_value("3", "int") == 3 and sweep.parse_value("1e-3", "float") == 1e-3
    assert sweep.parse_value("True", "bool") is True and sweep.parse_value("false", "bool") is False
    assert sweep.parse_value("js", "str") == "js"


def test_point_list_in_background(tiny, tmp_path):
    out = tmp_path / "bg"
    with pytest.raises(ValueError, match="unknown grid parameter"):
        sweep.start_sweep(tiny, [{"zzz": 1}], out)
    handle = sweep.start_sweep(tiny, [{"a": 1}, {"a": 1}, {"a": 7, "b": "z"}], out, jobs=1)
    table = handle.wait(timeout=120)
    assert handle.done() and table.attrs["failed"] == 0
    assert list(table["a"]) == [1, 7] and list(table["double"]) == [2, 14] and list(table["b"].fillna("")) == ["", "z"]
    assert "2 runs" in (out / "sweep.log").read_text()


def _hold_lock(out: Path, pid: int):
    """Hold ``out``'s sweep lock as another sweep would (a flock on its own open file), naming ``pid``."""
    fd = lock_file(out / sweep.LOCK_FILE, wait=False)
    assert fd is not None
    os.ftruncate(fd, 0)
    os.write(fd, str(pid).encode())
    return fd


def test_one_sweep_per_folder(tiny, tmp_path):
    out = tmp_path / "locked"
    (out / "runs").mkdir(parents=True)
    fd = _hold_lock(out, 4242)
    with pytest.raises(RuntimeError, match=r"another sweep \(process 4242\) is running in .*locked"):
        sweep.run_sweep(tiny, {"a": [1]}, out)
    with pytest.raises(RuntimeError, match="another sweep"):
        sweep.start_sweep(tiny, {"a": [1]}, out)
    os.close(fd)  # the holder ends: the folder is free at once, whatever pid the file still names
    assert sweep.run_sweep(tiny, {"a": [1]}, out, jobs=1, progress=False).attrs["failed"] == 0


def _race_for_lock(out: str, start, attempted, won) -> None:
    start.wait()
    try:
        with sweep._lock(Path(out)):
            won.put(os.getpid())
            attempted.wait()  # hold the lock until every racer has tried
    except RuntimeError:
        attempted.wait()


def test_lock_admits_one_of_many_simultaneous_sweeps(tmp_path):
    ctx = multiprocessing.get_context("fork")
    racers = 3
    for i in range(20):
        out = tmp_path / f"race{i}"
        out.mkdir()
        start, attempted, won = ctx.Barrier(racers, timeout=30), ctx.Barrier(racers, timeout=30), ctx.Queue()
        procs = [ctx.Process(target=_race_for_lock, args=(str(out), start, attempted, won)) for _ in range(racers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * racers
        winners = []
        while not won.empty():
            winners.append(won.get())
        assert len(winners) == 1, f"trial {i}: {len(winners)} sweeps got the lock"


def test_lock_is_never_stale_and_refuses_a_second_sweep_in_this_process(tmp_path):
    """A lock file left by a killed sweep (any content) is free; a held one refuses, also from this very
    process (a second sweep in another thread); leaving frees it."""
    lock = tmp_path / sweep.LOCK_FILE
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                            check=True)
    for left in (killed.stdout.strip(), "999999999", "0", "-5", "", "junk", str(os.getppid())):
        lock.write_text(left)
        with sweep._lock(tmp_path):
            assert lock.read_text() == str(os.getpid())
            with pytest.raises(RuntimeError, match=f"process {os.getpid()}"):
                with sweep._lock(tmp_path):
                    pass
    killer = subprocess.run([sys.executable, "-c", f"""import os, signal
from pathlib import Path
from fdistill_lab.course import sweep
with sweep._lock(Path({str(tmp_path)!r})):
    os.kill(os.getpid(), signal.SIGKILL)"""], capture_output=True, text=True)
    assert killer.returncode == -9 and lock.read_text() != str(os.getpid())  # died holding it
    with sweep._lock(tmp_path):  # free again: the kernel dropped the dead process's flock
        pass


DYING = '''import os, signal, time
from pathlib import Path
from fdistill_lab.course.records import record
log = Path(output_dir).parent.parent / "starts.log"
with open(log, "a") as fh:
    fh.write(f"{a}\\n")
if die:  # once the other worker is busy too, die like a worker taken by the out-of-memory killer
    while len(log.read_text().split()) < 2:
        time.sleep(0.05)
    os.kill(os.getppid(), signal.SIGKILL)
if a == 1 and log.read_text().split().count("1") == 1:
    time.sleep(60)  # its first attempt is still running when the other worker dies
record(output_dir, "a", a)'''


def test_dead_worker_fails_its_run_only(tmp_path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('a: int = 0  # a\ndie: bool = False  # d\noutput_dir: str = "o"  # o')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(DYING)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "dying.ipynb"
    nbformat.write(nb, path)
    out = tmp_path / "out"
    table = sweep.run_sweep(path, [{"a": 0, "die": True}, {"a": 1}, {"a": 2}], out, jobs=2, progress=False)
    assert table.attrs == {"skipped": 0, "ran": 3, "failed": 1}
    assert list(table.status) == ["failed", "done", "done"] and list(table["a"]) == [0, 1, 2]
    assert table.error[0] == "worker process died (killed by SIGKILL, out of memory?); rerun the sweep to retry"
    assert "worker process died" in (Path(table.run_dir[0]) / sweep.ERROR_FILE).read_text()
    assert read_records(table.run_dir[1]) == {"a": 1} and read_records(table.run_dir[2]) == {"a": 2}
    assert sorted((out / "starts.log").read_text().split()) == ["0", "1", "1", "2"]  # the interrupted run reran
    csv = pd.read_csv(out / sweep.TABLE_FILE)
    assert sorted(zip(csv.a, csv.status)) == [(0, "failed"), (1, "done"), (2, "done")]
    fd = lock_file(out / sweep.LOCK_FILE, wait=False)  # the finished sweep let go of its folder
    assert fd is not None
    os.close(fd)


def test_a_kernel_that_dies_at_start_up_is_started_again(tmp_path, monkeypatch):
    """Parallel workers can race for one TCP port when their kernels start; the loser dies before running any
    cell ("Kernel died before replying to kernel_info"). That start is retried; other errors are not."""
    import papermill as pm

    calls = []

    def flaky(notebook, output, parameters, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(sweep.KERNEL_DIED)
        record(parameters["output_dir"], "a", parameters["a"])

    monkeypatch.setattr(pm, "execute_notebook", flaky)
    nb = tmp_path / "nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), nb)
    status = sweep.execute_run(str(nb), str(tmp_path / "run"), {"a": 3}, str(tmp_path), "python3", None, {})
    assert status["status"] == "done" and len(calls) == 2 and read_records(tmp_path / "run") == {"a": 3}

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("something else")

    calls.clear()
    monkeypatch.setattr(pm, "execute_notebook", broken)
    status = sweep.execute_run(str(nb), str(tmp_path / "run"), {"a": 3}, str(tmp_path), "python3", None, {})
    assert status["status"] == "failed" and status["error"] == "RuntimeError: something else" and len(calls) == 1


def test_a_run_still_executing_elsewhere_is_left_alone(tiny, tmp_path):
    """A worker of a killed sweep may still be running a run: a new sweep leaves that folder alone (wiping it
    would mix the two runs' files) and says so; once the worker is gone, the run goes ahead."""
    import os

    from fdistill_lab.files import lock_file

    _, planned = sweep.plan(tiny, {"a": [5]}, tmp_path)
    run = planned[0][1]
    run.mkdir(parents=True)
    (run / "marker.txt").write_text("the other worker's file")
    fd = lock_file(run.with_name(run.name + sweep.RUN_LOCK_SUFFIX))  # that worker holds the run's lock
    try:
        table = sweep.run_sweep(tiny, {"a": [5]}, tmp_path, jobs=1, progress=False)
    finally:
        os.close(fd)
    assert table.status.tolist() == ["failed"] and "still running this run" in table.error[0]
    assert (run / "marker.txt").is_file() and calls(tmp_path) == []
    assert sweep.run_sweep(tiny, {"a": [5]}, tmp_path, jobs=1, progress=False).status.tolist() == ["done"]
