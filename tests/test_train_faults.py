"""Faults in a training run end it with its error, never hang, never lose committed work, and never go on silently:
a corrupt image read by loader workers, a full disk at a checkpoint write, a failing rank, a damaged checkpoint,
a run gone non-finite, a killed trainer's workers, a resume with other inputs, stale temporaries, bad paths."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from fdistill_lab import files
from fdistill_lab.train import cli
from fdistill_lab.train.cli import NonFiniteError, main, train
from fdistill_lab.train.run_folder import read_jsonl
from fdistill_lab.train.smoke_assets import make_smoke_assets
from fdistill_lab.train.trainer import FDistillTrainer

ROOT = Path(__file__).resolve().parents[1]
NO_FID = {"fid_every": 0, "sample_every": 0}
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_smoke_assets(tmp_path_factory.mktemp("assets"), num_images=64)


def _run(assets, out, overrides=None, data=None, teacher=None, **kw):
    return train("tiny", teacher or assets["teacher"], data or assets["data"], out, {**NO_FID, **(overrides or {})},
                 progress=False, **kw)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _latest(out: Path) -> Path:
    return out / "checkpoints" / json.loads((out / "checkpoints" / "latest.json").read_text())["file"]


def _assert_same_networks(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for name in ("student", "student_ema", "fake_score", "disc"):
        for k, v in a[name].items():
            assert torch.equal(v, b[name][k]), (name, k)


def _cli(assets, out, *extra, data=None, steps=8):
    return [sys.executable, "-m", "fdistill_lab.train", "--preset", "tiny", "--teacher", str(assets["teacher"]),
            "--data", str(data or assets["data"]), "--out", str(out), "--steps", str(steps), "--no-progress",
            "--set", "fid_every=0", "--set", "sample_every=0", "--set", "ckpt_every=1", *extra]


def _corrupt_copy(src: Path, dst: Path, member: str) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            zout.writestr(name, data[: len(data) // 2] if name == member else data)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited


def test_a_corrupt_image_read_by_loader_workers_ends_the_run_and_the_repaired_data_resumes_it(assets, tmp_path):
    """The issue's command: a truncated PNG with num_workers=2 used to print its error and then hang for ever,
    holding the run folder's lock. It must exit within seconds, non-zero, with the error on one line; after the
    image is replaced, the same command resumes and ends where an unbroken run ends."""
    bad = tmp_path / "data.zip"
    _corrupt_copy(assets["data"], bad, "00000/img00000032.png")
    args = _cli(assets, tmp_path / "run", "--set", "num_workers=2", data=bad)
    t0 = time.time()
    res = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=120)
    took = time.time() - t0
    assert res.returncode == 2, res.stdout + res.stderr
    assert took < 30, f"took {took:.0f} s"
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "cannot decode image '00000/img00000032.png'" in last, res.stderr
    failed_at = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"]
    assert 1 <= failed_at < 8
    bad.write_bytes(assets["data"].read_bytes())  # the repaired data set
    again = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "done at step 8" in again.stdout, again.stdout + again.stderr
    _run(assets, tmp_path / "ref", {"steps": 8, "ckpt_every": 1})
    _assert_same_networks(_state(_latest(tmp_path / "ref")), _state(_latest(tmp_path / "run")))


def test_disk_full_at_a_checkpoint_write_keeps_the_last_checkpoint_and_says_so(assets, tmp_path, monkeypatch,
                                                                                 capsys):
    real = cli.atomic_save_digest

    def no_space_at_step_4(obj, path):
        if path.name == "ckpt_0000004.pt":
            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")
            with monkeypatch.context() as m:
                m.setattr(files._Writer, "write", write)
                return real(obj, path)
        return real(obj, path)

    monkeypatch.setattr(cli, "atomic_save_digest", no_space_at_step_4)
    import multiprocessing
    children_before = set(multiprocessing.active_children())
    run = tmp_path / "run"
    argv = ["--preset", "tiny", "--teacher", str(assets["teacher"]), "--data", str(assets["data"]), "--out", str(run),
            "--steps", "6", "--no-progress", "--set", "fid_every=0", "--set", "sample_every=0", "--set", "ckpt_every=1",
            "--set", "num_workers=2"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no space left on the disk") and "ckpt_0000004.pt" in err[-1], err
    ckpts = run / "checkpoints"
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 3
    assert not list(ckpts.glob(".*.tmp")) and not (ckpts / "ckpt_0000004.pt").exists()
    import multiprocessing
    assert not [p for p in multiprocessing.active_children() if p not in children_before]  # loader workers gone
    monkeypatch.setattr(cli, "atomic_save_digest", real)
    assert main(argv) == 0
    _run(assets, tmp_path / "ref", {"steps": 6, "ckpt_every": 1})
    _assert_same_networks(_state(_latest(tmp_path / "ref")), _state(_latest(run)))


RANK_FAILS = """
import os, sys
import torch.multiprocessing as mp

def worker(rank, port, teacher, data, out, fail):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(1)
    from fdistill_lab.train.cli import train
    from fdistill_lab.train.trainer import FDistillTrainer
    if fail == "rank1" and rank == 1:
        real = FDistillTrainer.step
        def step(self, *a, **k):
            if self.step_count == 3:
                raise RuntimeError("injected failure on rank 1 at iteration 3")
            return real(self, *a, **k)
        FDistillTrainer.step = step
    if fail == "rank0_disk" and rank == 0:  # rank 0 alone writes files: a full disk there
        import errno
        from fdistill_lab.train import cli
        real_save = cli.atomic_save_digest
        def save(obj, path):
            if path.name == "ckpt_0000004.pt":
                raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
            return real_save(obj, path)
        cli.atomic_save_digest = save
    settings = {"fid_every": 0, "sample_every": 0, "steps": 6, "ckpt_every": 1, "num_workers": 2}
    train("tiny", teacher, data, out, settings, progress=False)

if __name__ == "__main__":
    port, teacher, data, out, fail = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    mp.start_processes(worker, args=(port, teacher, data, out, fail), nprocs=2, join=True, start_method="spawn")
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(script: Path, assets, out: Path, fail: str) -> subprocess.CompletedProcess:
    """The two-process job in its own process group, killed whole if it overruns (no rank left behind)."""
    proc = subprocess.Popen([sys.executable, str(script), str(_free_port()), str(assets["teacher"]),
                             str(assets["data"]), str(out), fail], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the two-process job ({fail}) did not end within 120 s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("fail,message,committed", [
    ("rank1", "injected failure on rank 1", 3),
    ("rank0_disk", "No space left on device (injected)", 3),
], ids=["rank-1-raises", "rank-0-disk-full"])
def test_one_failing_rank_takes_the_whole_two_process_job_down(assets, tmp_path, fail, message, committed):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(RANK_FAILS))
    t0 = time.time()
    res = _job(script, assets, tmp_path / "run", fail)
    assert res.returncode != 0 and message in res.stderr, res.stderr[-3000:]
    assert time.time() - t0 < 120
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == committed
    again = _job(script, assets, tmp_path / "run", "none")  # the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    ref = _job(script, assets, tmp_path / "ref", "none")
    assert ref.returncode == 0, ref.stderr[-3000:]
    _assert_same_networks(_state(_latest(tmp_path / "ref")), _state(_latest(tmp_path / "run")))


FORKSERVER = """
import sys
import torch.multiprocessing as mp
from fdistill_lab.train.cli import main
if __name__ == "__main__":
    mp.set_start_method("forkserver")  # Python 3.14's default on Linux
    raise SystemExit(main(sys.argv[1:]))
"""


def test_loader_workers_start_under_forkserver(assets, tmp_path):
    script = tmp_path / "fs.py"
    script.write_text(textwrap.dedent(FORKSERVER))
    args = _cli(assets, tmp_path / "run", "--set", "num_workers=2", steps=3)[3:]  # after `python -m module`
    res = subprocess.run([sys.executable, str(script), *args], env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "done at step 3" in res.stdout, res.stderr[-3000:]


def test_workers_end_even_when_starting_the_loader_fails(assets, monkeypatch):
    import multiprocessing

    from torch.utils.data import dataloader

    from fdistill_lab.train.data import EDMImageDataset
    from fdistill_lab.train.loader import open_batches, worker_init_for_this_process

    def broken_reset(self, loader, first_iter=False):
        raise RuntimeError("cannot start the pin-memory thread (injected)")

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_reset", broken_reset)
    before = set(multiprocessing.active_children())
    loader = torch.utils.data.DataLoader(EDMImageDataset(assets["data"]), batch_size=4, num_workers=2,
                                         worker_init_fn=worker_init_for_this_process())
    with pytest.raises(RuntimeError, match="injected"):
        with open_batches(loader):
            pass
    assert not [p for p in multiprocessing.active_children() if p not in before and p.is_alive()]


def _flip_a_byte_inside_a_tensor(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    head = info.header_offset  # the local header: 30 bytes, then the name and extra field (lengths at 26, 28)
    offset = head + 30 + int.from_bytes(raw[head + 26:head + 28], "little") + \
        int.from_bytes(raw[head + 28:head + 30], "little")
    raw[offset + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_in_a_checkpoint_is_refused_and_the_hint_resumes_from_the_one_before(assets, tmp_path):
    run = tmp_path / "run"
    _run(assets, run, {"steps": 4, "ckpt_every": 2})
    newest = run / "checkpoints" / "ckpt_0000004.pt"
    _flip_a_byte_inside_a_tensor(newest)
    torch.load(newest, weights_only=True)  # still loads: only the checksum can tell
    with pytest.raises(files.CheckpointError, match=r"ckpt_0000004.pt is damaged.*ckpt_0000002.pt") as err:
        _run(assets, run, {"steps": 6, "ckpt_every": 2})
    pointer = str(err.value).split("write ", 1)[1].split(" into ", 1)[0]
    (run / "checkpoints" / "latest.json").write_text(pointer)
    assert _run(assets, run, {"steps": 6, "ckpt_every": 2}).step == 6
    _run(assets, tmp_path / "ref", {"steps": 6, "ckpt_every": 2})
    _assert_same_networks(_state(_latest(tmp_path / "ref")), _state(_latest(run)))


def test_a_checkpoint_without_a_recorded_checksum_still_resumes(assets, tmp_path, capsys):
    run = tmp_path / "run"
    _run(assets, run, {"steps": 2, "ckpt_every": 2})
    pointer = run / "checkpoints" / "latest.json"
    pointer.write_text(json.dumps({"file": "ckpt_0000002.pt", "step": 2}))  # as older versions wrote it
    capsys.readouterr()
    assert _run(assets, run, {"steps": 3, "ckpt_every": 2}).step == 3
    assert "no recorded sha256" in capsys.readouterr().err


@pytest.mark.parametrize("poison", ["loss", "weights"])
def test_a_run_gone_non_finite_stops_at_once_and_keeps_the_last_finite_checkpoint(assets, tmp_path, monkeypatch,
                                                                                    poison):
    real = FDistillTrainer.step

    def step(self, *a, **k):
        logs = real(self, *a, **k)
        if self.step_count == 3:
            with torch.no_grad():
                next(self.student.parameters()).fill_(float("nan"))
                next(self.student_ema.parameters()).fill_(float("nan"))
            if poison == "loss":
                logs["loss_f"] = float("nan")
        return logs

    monkeypatch.setattr(FDistillTrainer, "step", step)
    run = tmp_path / "run"
    match = "iteration 3 gave non-finite values.*loss_f = nan" if poison == "loss" else "student.* is not finite"
    with pytest.raises(NonFiniteError, match=match):
        _run(assets, run, {"steps": 8, "ckpt_every": 1, "keep_checkpoints": 1})
    assert [p.name for p in (run / "checkpoints").glob("ckpt_*.pt")] == ["ckpt_0000002.pt"]
    state = _state(_latest(run))
    assert state["step"] == 2 and all(bool(torch.isfinite(v).all()) for v in state["student"].values())


def test_the_cli_reports_a_non_finite_run_on_one_line(assets, tmp_path, monkeypatch, capsys):
    real = FDistillTrainer.step

    def step(self, *a, **k):
        logs = real(self, *a, **k)
        if self.step_count == 2:
            logs["grad_norm_student"] = float("inf")
        return logs

    monkeypatch.setattr(FDistillTrainer, "step", step)
    argv = ["--preset", "tiny", "--teacher", str(assets["teacher"]), "--data", str(assets["data"]),
            "--out", str(tmp_path / "run"), "--no-progress", "--set", "fid_every=0", "--set", "sample_every=0"]
    assert main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "iteration 2 gave non-finite values (grad_norm_student = inf)" in err and "no checkpoint" in err


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_loader_workers_die_with_a_killed_trainer(assets, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(assets, run, "--set", "num_workers=2", steps=100000), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(read_jsonl(run / "logs" / "train.jsonl")) < 2:
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.time() + 2
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)]


def test_resume_refuses_another_teacher_data_set_or_batch_size_and_keeps_the_record(assets, tmp_path, capsys):
    run = tmp_path / "run"
    _run(assets, run, {"steps": 2})
    record = (run / "config.json").read_text()
    other_teacher = tmp_path / "teacher2.pt"
    blob = torch.load(assets["teacher"], weights_only=True)
    blob["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    torch.save(blob, other_teacher)
    other_data = make_smoke_assets(tmp_path / "small", num_images=48)["data"]
    for kw, pattern in [({"teacher": other_teacher}, "teacher: the run was trained from .*another network"),
                        ({"data": other_data}, r"data: the run was trained on .*\(64 images\).*\(48 images\)"),
                        ({"overrides": {"steps": 4, "batch_size": 16}}, "batch_size: recorded 8, now 16")]:
        kw.setdefault("overrides", {"steps": 4})
        with pytest.raises(ValueError, match=pattern + ".*init_from="):
            _run(assets, run, **kw)
        assert (run / "config.json").read_text() == record
    # the same teacher and data at other paths are the same run
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "t.pt").write_bytes(assets["teacher"].read_bytes())
    (moved / "d.zip").write_bytes(assets["data"].read_bytes())
    capsys.readouterr()
    assert _run(assets, run, {"steps": 4}, teacher=moved / "t.pt", data=moved / "d.zip").step == 4
    err = capsys.readouterr().err
    assert "same weights" in err and "data read from" in err
    assert (run / "config.json").read_text() == record
    resumes = read_jsonl(run / "logs" / "resumes.jsonl")
    assert resumes[-1]["step"] == 2 and resumes[-1]["changed"]["steps"] == [2, 4]


def test_temporaries_of_a_writer_killed_mid_write_are_removed_on_start(assets, tmp_path, capsys):
    run = tmp_path / "run"
    _run(assets, run, {"steps": 1})
    stale = run / "checkpoints" / ".ckpt_0000005.pt.0123456789abcdef.tmp"
    stale.write_bytes(b"x" * 4096)
    keep = run / "checkpoints" / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    capsys.readouterr()
    _run(assets, run, {"steps": 2})
    assert not stale.exists() and keep.exists()
    assert "removed 1 temporary file(s)" in capsys.readouterr().err


def test_path_and_device_errors_are_one_line(assets, tmp_path, capsys):
    import fcntl

    base = ["--preset", "tiny", "--teacher", str(assets["teacher"]), "--data", str(assets["data"]), "--no-progress",
            "--set", "fid_every=0", "--set", "sample_every=0"]
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main([*base, "--out", str(a_file)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {a_file} is a file, not a run folder; give a folder " \
                                              "(new or of an earlier run)"
    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / ".train.lock", "w") as other:
        other.write("4242")
        other.flush()
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        assert main([*base, "--out", str(busy)]) == 2
        err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another training job (process 4242) is using" in err
    run = tmp_path / "run"
    assert main([*base, "--out", str(run), "--steps", "1"]) == 0
    (run / "checkpoints" / "latest.json").write_text("")
    capsys.readouterr()
    assert main([*base, "--out", str(run), "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "latest.json is empty or damaged" in err and "ckpt_0000001.pt" in err
    if not torch.cuda.is_available():
        assert main([*base, "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "device 'cuda' requested" in err and "--device cpu" in err


def test_init_from_refuses_a_damaged_source_checkpoint(assets, tmp_path):
    _run(assets, tmp_path / "src", {"steps": 2, "ckpt_every": 2})
    _flip_a_byte_inside_a_tensor(tmp_path / "src" / "checkpoints" / "ckpt_0000002.pt")
    for source in (tmp_path / "src", tmp_path / "src" / "checkpoints" / "ckpt_0000002.pt"):
        with pytest.raises(files.CheckpointError, match="ckpt_0000002.pt is damaged"):
            _run(assets, tmp_path / "new", {"steps": 2, "init_from": str(source)})


def test_a_damaged_npz_batch_is_a_clear_data_error(tmp_path):
    import numpy as np

    from fdistill_lab.train.data import DatasetFormatError, ImageNetNpzDataset

    path = tmp_path / "train_data_batch_1.npz"
    np.savez(path, data=np.zeros((4, 3 * 8 * 8), np.uint8), labels=np.arange(1, 5))
    ds = ImageNetNpzDataset(path, label_map="identity")
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("data.npy")
    raw = bytearray(path.read_bytes())
    head = info.header_offset
    start = head + 30 + int.from_bytes(raw[head + 26:head + 28], "little") + \
        int.from_bytes(raw[head + 28:head + 30], "little")
    raw[start + info.file_size - 10] ^= 0xFF  # the pixels' bytes: the zip's CRC check fails on reading them
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetFormatError, match="train_data_batch_1.npz: cannot read its 'data'.*damaged"):
        ds[0]


def test_resume_with_another_per_gpu_batch_continues_and_logs_only_real_changes(assets, tmp_path, capsys):
    run = tmp_path / "run"
    _run(assets, run, {"steps": 2})
    capsys.readouterr()
    assert _run(assets, run, {"steps": 4, "per_gpu_batch": 4}).step == 4
    assert "per_gpu_batch changed on resume (0 -> 4)" in capsys.readouterr().err
    changed = read_jsonl(run / "logs" / "resumes.jsonl")[-1]["changed"]
    assert set(changed) == {"steps", "per_gpu_batch"}, changed  # no tuple-vs-list noise (extra_ema_betas)
