"""`python -m experiments.pretrain` as 2 processes on 127.0.0.1 (CPU, gloo collectives).

The two processes (2 CPU devices each, one (1, 2, 2) mesh over all 4: the batch and
the fsdp-sharded parameters span both processes) must train exactly like one process
with the same global batch, write one checkpoint together, and resume from it.  Most of
the time goes into XLA compiling the train step in each process.
"""

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from pretrain_runs import REPO, TINY_MODEL, data_bindings, metrics

DEADLINE_S = 600  # per phase; a hung coordinator must not hang CI (busy machines compile slowly)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_command(workdir, steps, bindings, *extra):
    args = [sys.executable, "-m", "experiments.pretrain", "--gin",
            "experiments/configs/demo.gin", "--workdir", str(workdir), "--steps", str(steps)]
    for binding in bindings:
        args += ["--gin_param", binding]
    return args + list(extra)


@dataclasses.dataclass
class Run:
    process: subprocess.Popen
    log: object  # the file stdout and stderr go to

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def started(commands, tmp_path, name, devices, cache_dir):
    """Starts the commands together; yields their Runs; kills any left on the way out."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               # Cheaper CPU code generation: the test is about equality, not speed.
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0",
               # The resumed run finds process 0's programs in the persistent cache.
               JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    runs = []
    try:
        for i, command in enumerate(commands):
            log = open(tmp_path / f"{name}_{i}.log", "w", encoding="utf-8")
            runs.append(Run(subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                             stderr=subprocess.STDOUT), log))
        yield runs
    finally:
        for run in runs:
            if run.process.poll() is None:
                run.process.kill()
            run.process.wait()
            run.log.close()


def wait_all(runs):
    deadline = time.monotonic() + DEADLINE_S
    for run in runs:
        try:
            run.process.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pytest.fail("a training process hung:\n" + "\n---\n".join(
                r.output()[-3000:] for r in runs))
    for run in runs:
        assert run.process.returncode == 0, "\n---\n".join(r.output()[-3000:] for r in runs)


def two_processes(workdir, steps, bindings, *extra):
    port = free_port()
    return [pretrain_command(workdir, steps, bindings, "--coordinator_address",
                             f"127.0.0.1:{port}", "--num_processes", "2",
                             "--process_id", str(i), *extra) for i in range(2)]


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume(tiny_synthetic_data, tmp_path):
    bindings = TINY_MODEL + data_bindings(tiny_synthetic_data) + [
        "train.log_every=1", "train.checkpoint_every=2", "train.zero_shot_at_end=False",
        # A constant learning rate: the schedule must not depend on --steps, so that the
        # resumed run continues exactly as the 4-step reference.
        "adamw_warmup_cosine.warmup_steps=0", "adamw_warmup_cosine.end_learning_rate_fraction=1.0"]
    # The 27-tap PEG: XLA's grouped convolution mis-scales its kernel gradient on this mesh
    # (CTViTConfig.peg_impl); both runs use the taps so that they compare like with like.
    bindings += ["CTViTConfig.peg_impl='taps'"]
    multi = bindings + ["train.mesh_shape=(1, 2, 2)"]
    cache = tmp_path / "compilation_cache"

    with started(two_processes(tmp_path / "multi", 2, multi, "--profile_steps", "1:2"),
                 tmp_path, "first", 2, cache) as first:
        wait_all(first)
        out0, out1 = first[0].output(), first[1].output()
    assert "distributed: process 0 of 2, coordinator 127.0.0.1:" in out0
    assert "devices: 4 x cpu (2 process(es)), mesh {'data': 1, 'fsdp': 2, 'tensor': 2}" in out0
    assert "devices:" not in out1  # only process 0 talks, and writes metrics
    assert [m["step"] for m in metrics(tmp_path / "multi")] == [1, 2]
    state_dir = tmp_path / "multi" / "checkpoints" / "2" / "state"
    # Both processes wrote the shards they hold (fsdp spans the processes).
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
    # --profile_steps 1:2: process 0 traced the second step.
    (trace_run,) = (tmp_path / "multi" / "profile" / "plugins" / "profile").iterdir()
    assert list(trace_run.glob("*.xplane.pb"))

    # Restarted, the pair resumes; the 1-process reference (1 device, 4 steps) runs
    # alongside (process 0 finds its programs in the compilation cache and mostly waits).
    with started(two_processes(tmp_path / "multi", 4, multi), tmp_path, "resumed", 2,
                 cache) as resumed, \
            started([pretrain_command(tmp_path / "single", 4, bindings)], tmp_path, "single",
                    1, cache) as single:
        wait_all(resumed + single)
        out0 = resumed[0].output()
    assert f"resumed from {tmp_path / 'multi' / 'checkpoints'}/2" in out0

    reference = {m["step"]: m for m in metrics(tmp_path / "single")}
    logged = metrics(tmp_path / "multi")
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    for record in logged:
        expected = reference[record["step"]]
        for key in ("loss", "grad_norm", "logit_scale"):
            assert record[key] == pytest.approx(expected[key], rel=1e-5), (record["step"], key)
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["2", "4"]


def test_augmented_global_batch_does_not_depend_on_the_number_of_hosts(tiny_synthetic_data):
    """Sentence sampling draws from the global record index, not the host's."""
    from data_pipeline import input_pipeline

    config = input_pipeline.PipelineConfig(
        shard_dir=tiny_synthetic_data.shard_dir("train"),
        tokenizer_path=tiny_synthetic_data.tokenizer_path, global_batch_size=8,
        max_text_length=32, sentence_sampling_prob=1.0)
    single = iter(input_pipeline.make_train_dataset(config))
    hosts = [iter(input_pipeline.make_train_dataset(config, process_index=i, process_count=2))
             for i in range(2)]
    for _ in range(3):
        whole, halves = next(single), [next(h) for h in hosts]
        for key in ("volume_name", "input_ids", "attention_mask"):
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]),
                                          whole[key], err_msg=key)


# --- How a process decides to join (no processes started) ----------------------------

def test_clusters_are_detected_from_their_environment():
    from ct_rate_jax.training.distributed import detected_cluster

    srun = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[1-2]", "SLURM_NTASKS": "2",
            "SLURM_PROCID": "1"}
    assert detected_cluster(srun) == "slurm"
    assert detected_cluster(dict(srun, SLURM_NTASKS="1")) is None  # one task: one process
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) is None  # no step
    assert detected_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == "ompi"
    assert detected_cluster({}) is None


@pytest.mark.parametrize("settings,message", [
    (dict(num_processes=2, process_id=0), "--coordinator_address"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2), "--process_id"),
    (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), "host:port"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), "--num_processes"),
    (dict(mode="on"), "no TPU slice, SLURM step or Open MPI job"),
    (dict(mode="sometimes"), "--distributed"),
])
def test_settings_that_cannot_describe_a_run_are_refused(monkeypatch, settings, message):
    from ct_rate_jax.training import distributed

    for name in ("SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_running_on_cloud_tpu_vm", lambda: False)
    with pytest.raises(ValueError, match=message):
        distributed.initialize(distributed.DistributedSettings(**settings))
    # Nothing given and nothing detected: a single process, nothing initialised.
    assert distributed.initialize(distributed.DistributedSettings()) is None


def test_pretrain_names_the_missing_flag():
    result = subprocess.run(
        pretrain_command("/nonexistent", 1, [], "--num_processes", "2", "--process_id", "1"),
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 1
    assert "error:" in result.stderr and "--coordinator_address" in result.stderr
