"""kill -9 at an arbitrary moment, checkpoints being written every step: the next run
resumes from the newest complete checkpoint and ends where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pretrain_runs import REPO, TINY_MODEL, data_bindings, metrics, run_pretrain

FAULT_BINDINGS = ["train.zero_shot_at_end=False", "train.checkpoint_every=1",
                  "train.log_every=1", "train.keep_checkpoints=2"]


@pytest.mark.slow
def test_kill_9_while_checkpointing_resumes_from_a_complete_checkpoint(
        tiny_synthetic_data, tmp_path):
    bindings = TINY_MODEL + data_bindings(tiny_synthetic_data) + FAULT_BINDINGS
    steps = 12
    args = [sys.executable, "-m", "experiments.pretrain", "--gin",
            "experiments/configs/demo.gin", "--workdir", str(tmp_path / "killed"),
            "--steps", str(steps)]
    for binding in bindings:
        args += ["--gin_param", binding]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint_dir = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    # Kill while the run is checkpointing every step (an asynchronous write is very
    # likely in flight), after at least three checkpoints exist.
    while not (checkpoint_dir.exists() and len(os.listdir(checkpoint_dir)) >= 3):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    resumed = run_pretrain(tmp_path / "killed", bindings, steps=steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    straight = run_pretrain(tmp_path / "straight", bindings, steps=steps)
    assert straight.returncode == 0, straight.stderr[-3000:]
    final = {m["step"]: m["loss"] for m in metrics(tmp_path / "killed")}[steps]
    assert final == {m["step"]: m["loss"] for m in metrics(tmp_path / "straight")}[steps]
