"""Launch :mod:`fdistill_lab.train` from a notebook (one process, or torchrun for several GPUs) and follow it.

The run is the command-line program in a child process, so a notebook run and a terminal run are the
same thing, the kernel holds no GPU memory, and rerunning resumes from the output folder. While it runs,
:func:`follow` turns the run folder into live feedback: a tqdm.auto bar from ``logs/train.jsonl``, each
new sample grid and FID value as it appears. Interrupting the kernel sends SIGTERM, so the child saves a
checkpoint before it stops. torchrun forwards that signal to its workers and kills them after
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (30 by default), too short to finish a step, an FID evaluation
and a 10 GB ImageNet checkpoint, so :func:`follow` gives them :data:`SHUTDOWN_GRACE_S` unless you set it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import divergences
from .cli import EXIT_INTERRUPTED
from .presets import PRESETS, get_preset
from .run_folder import read_jsonl

__all__ = ["train_command", "follow", "check_inputs", "overrides_from_text", "LaunchError", "SHUTDOWN_GRACE_S"]

SHUTDOWN_GRACE_S = 1800  # seconds torchrun lets workers save after SIGTERM (newer torch reads it; older: 30 s)


class LaunchError(RuntimeError):
    """The training process failed; the message holds the end of its output."""


def overrides_from_text(text: str) -> dict[str, str]:
    """``"lr=1e-5; bin_ema=0"`` -> {"lr": "1e-5", "bin_ema": "0"} (``;`` separates, values may hold commas)."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"overrides must be 'key=value; key=value'; got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def check_inputs(preset: str, div: str, files: dict[str, str]) -> None:
    """Validate a notebook's choices before anything runs: preset and divergence names, and that each file
    in ``files`` ({role: path}; roles teacher, data, fid_detector, fid_ref) exists, saying what to download."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    divergences.canonical_name(div)
    hints = get_preset(preset)
    how = {"teacher": hints.teacher_hint, "data": hints.data_hint,
           "fid_detector": "python -m fdistill_lab.download fid --root downloads/edm -> inception-2015-12-05.pt",
           "fid_ref": "python -m fdistill_lab.download fid --root downloads/edm -> imagenet-64x64.npz "
                      "(cifar10-32x32.npz for CIFAR-10)"}
    missing = [f"  {role}: {path!r} (resolved {Path(path).resolve()}) not found. Get it with: {how.get(role, '')}"
               for role, path in files.items() if not Path(path).exists()]
    if missing:
        raise FileNotFoundError("missing input file(s); paths are relative to the notebook folder:\n"
                                + "\n".join(missing) + "\nSee docs/imagenet64_training.md, or run with -p smoke True.")


def train_command(preset: str, teacher: str | Path, data: str | Path, out: str | Path, overrides: dict[str, Any],
                  gpus: int = 1, python: str = sys.executable) -> list[str]:
    """Command line for one process (``gpus`` <= 1) or ``torchrun --standalone --nproc_per_node gpus``."""
    if gpus < 0:
        raise ValueError(f"gpus must be >= 0; got {gpus}")
    args = ["--preset", preset, "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--no-progress"]
    for k, v in overrides.items():
        args += ["--set", f"{k}={v}"]
    if gpus > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m",
                "fdistill_lab.train", *args]
    return [python, "-m", "fdistill_lab.train", *args]


def follow(cmd: list[str], out: str | Path, total_steps: int, on_sample: Callable[[Path], None] | None = None,
           on_fid: Callable[[dict[str, Any]], None] | None = None, poll_s: float = 0.5,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (a :func:`train_command`) and report progress from ``out`` until it exits.

    Returns {"returncode", "status", "log"}; raises :class:`LaunchError` with the output's tail on failure.
    The child's output goes to ``<out>/launcher.log``.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "launcher.log"
    seen_samples: set[Path] = set(out.glob("samples/*.png"))
    seen_fid = len(read_jsonl(out / "logs" / "fid.jsonl"))
    with open(log_file, "a") as log:
        child_env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SHUTDOWN_GRACE_S), **os.environ, **(env or {})}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env)
        bar = tqdm(total=total_steps, desc="training (child process)")
        try:
            while True:
                code = proc.poll()
                rows = read_jsonl(out / "logs" / "train.jsonl")
                if rows:
                    bar.n = int(rows[-1]["step"])
                    if "loss_f" in rows[-1] or "images_per_s" in rows[-1]:
                        bar.set_postfix(img_s=f"{rows[-1].get('images_per_s', 0):.0f}", refresh=False)
                    bar.refresh()
                for p in sorted(set(out.glob("samples/*.png")) - seen_samples):
                    seen_samples.add(p)
                    if on_sample is not None:
                        on_sample(p)
                fids = read_jsonl(out / "logs" / "fid.jsonl")
                for row in fids[seen_fid:]:
                    if on_fid is not None:
                        on_fid(row)
                seen_fid = len(fids)
                if code is not None:
                    break
                time.sleep(poll_s)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)  # the trainer saves a checkpoint, then exits
            proc.wait()
            raise
        finally:
            bar.close()
    status = {0: "done", EXIT_INTERRUPTED: "interrupted"}.get(code)
    if status is None:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-40:])
        raise LaunchError(f"training exited with code {code}; end of {log_file}:\n{tail}")
    return {"returncode": code, "status": status, "log": str(log_file)}
