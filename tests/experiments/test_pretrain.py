"""`python -m experiments.pretrain` end to end, as a user runs it (subprocesses)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pretrain_runs import (REPO, TINY_MODEL, TINY_MODEL_WITH_VIEWS, data_bindings,  # noqa: F401
                           metrics, run_pretrain)


@pytest.mark.slow
def test_train_resume_and_zero_shot(tiny_synthetic_data, tmp_path):
    # The demo's recipe, sentence views included.
    bindings = TINY_MODEL_WITH_VIEWS + data_bindings(tiny_synthetic_data)
    first = run_pretrain(tmp_path / "resumed", bindings, steps=3)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Zero-shot abnormality detection" in first.stdout and "mean" in first.stdout
    second = run_pretrain(tmp_path / "resumed", bindings, steps=6)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout

    logged = metrics(tmp_path / "resumed")
    assert [m["step"] for m in logged] == [2, 3, 4, 6]
    for record in logged:
        for key in ("loss", "learning_rate", "volumes_per_s", "grad_norm",
                    "tflops_per_device", "mfu", "data_wait_fraction"):
            assert key in record
        assert record["tflops_per_device"] > 0 and 0 < record["mfu"] < 1.5
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3", "6"]
    assert os.listdir(tmp_path / "resumed" / "tensorboard")
    zero_shot = json.loads((tmp_path / "resumed" / "zero_shot.json").read_text())
    assert len(zero_shot["auroc"]) == 18 and zero_shot["num_volumes"] > 0

    # The same 6 steps without interruption, on 8 devices: same losses, same data order.
    straight = run_pretrain(tmp_path / "straight", bindings + ["train.mesh_shape=(2, 4, 1)"],
                            steps=6, devices=8)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "'data': 2, 'fsdp': 4" in straight.stdout
    by_step = {m["step"]: m["loss"] for m in metrics(tmp_path / "straight")}
    assert sorted(by_step) == [2, 4, 6]
    for record in logged:
        if record["step"] in by_step:
            assert record["loss"] == pytest.approx(by_step[record["step"]], rel=1e-5)


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(tiny_synthetic_data, tmp_path):
    bindings = TINY_MODEL + data_bindings(tiny_synthetic_data) + ["train.zero_shot_at_end=False"]
    assert run_pretrain(tmp_path, bindings, steps=1).returncode == 0
    other = run_pretrain(tmp_path, bindings + ["CTCLIPConfig.dim_latent=24"], steps=2)
    assert other.returncode != 0
    assert "does not match the model" in other.stderr and "to_text_latent" in other.stderr


def test_clear_errors_for_bad_configuration(tiny_synthetic_data, tmp_path):
    missing_file = run_pretrain(tmp_path, [], 1, gin_file="no/such.gin")
    assert missing_file.returncode != 0 and "no/such.gin" in missing_file.stderr
    unknown = run_pretrain(tmp_path, ["train.not_a_setting=3"], 1)
    assert unknown.returncode != 0 and "not_a_setting" in unknown.stderr
    missing_data = run_pretrain(tmp_path, TINY_MODEL + [
        "train.synthetic_data=None", "train.train_data='/no/such/shards'",
        f"train.tokenizer='{tiny_synthetic_data.tokenizer_path}'"], 1)
    assert missing_data.returncode != 0 and "/no/such/shards" in missing_data.stderr
    wrong_shape = run_pretrain(tmp_path, TINY_MODEL + data_bindings(tiny_synthetic_data)
                               + ["CTViTConfig.image_size=32"], 1)
    assert wrong_shape.returncode != 0 and "image_size" in wrong_shape.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(tiny_synthetic_data, tmp_path):
    """A preempted run (SIGTERM) stops after the running step with a checkpoint on disk,
    exits 0, and the same command resumes from that step."""
    bindings = TINY_MODEL + data_bindings(tiny_synthetic_data) + [
        "train.zero_shot_at_end=False", "train.checkpoint_every=1000", "train.log_every=1"]
    args = [sys.executable, "-m", "experiments.pretrain", "--gin", "experiments/configs/demo.gin",
            "--workdir", str(tmp_path), "--steps", "100000"]
    for binding in bindings:
        args += ["--gin_param", binding]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    match = re.search(r"stopped at step (\d+) on SIGTERM", stdout)
    assert match, stdout[-2000:]
    stop_step = int(match.group(1))
    assert os.listdir(tmp_path / "checkpoints") == [str(stop_step)]
    assert metrics(tmp_path)[-1]["step"] == stop_step  # the last step's metrics were kept

    resumed = run_pretrain(tmp_path, bindings, steps=stop_step + 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints'}/{stop_step}" in resumed.stdout
    assert metrics(tmp_path)[-1]["step"] == stop_step + 2


@pytest.mark.slow
def test_nonfinite_updates_are_skipped_or_stop_the_run(tiny_synthetic_data, tmp_path):
    # A learning rate of 1e400 (inf) makes every update overflow.
    bindings = TINY_MODEL + data_bindings(tiny_synthetic_data) + [
        "train.zero_shot_at_end=False", "train.log_every=1",
        "adamw_warmup_cosine.learning_rate=1e400"]
    skipped = run_pretrain(tmp_path / "skip", bindings, steps=2)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "step 1: loss" in skipped.stdout and "the update was not applied" in skipped.stdout
    assert metrics(tmp_path / "skip")[-1]["nonfinite_steps"] == 2
    stopped = run_pretrain(tmp_path / "stop", bindings + ["train.nonfinite='stop'"], steps=2)
    assert stopped.returncode != 0
    assert "error: step 1: loss" in stopped.stderr and "train.nonfinite='skip'" in stopped.stderr
