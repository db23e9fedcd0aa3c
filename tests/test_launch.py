"""The notebook launcher's child environment (fdistill_lab.train.launch.follow)."""

import sys

import pytest

from fdistill_lab.train import launch


def _expect_env(value: str) -> list[str]:
    check = f"import os, sys; sys.exit(os.environ.get('TORCH_ELASTIC_SHUTDOWN_TIMEOUT') != {value!r})"
    return [sys.executable, "-c", check]


def test_follow_gives_torchrun_workers_time_to_save_a_checkpoint(tmp_path, monkeypatch):
    """torchrun kills its workers 30 s after SIGTERM unless told otherwise: too short for a 10 GB checkpoint."""
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert launch.SHUTDOWN_GRACE_S >= 600
    res = launch.follow(_expect_env(str(launch.SHUTDOWN_GRACE_S)), tmp_path, total_steps=1, poll_s=0.05)
    assert res["status"] == "done"
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "45")  # a user's own setting wins
    assert launch.follow(_expect_env("45"), tmp_path, total_steps=1, poll_s=0.05)["status"] == "done"
    with pytest.raises(launch.LaunchError, match="exited with code 1"):
        launch.follow(_expect_env("999"), tmp_path, total_steps=1, poll_s=0.05)
