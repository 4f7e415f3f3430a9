"""The TPU and SLURM launch scripts: their dry runs print the commands they would run."""

import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TPU = REPO / "scripts" / "tpu" / "tpu.sh"
SLURM = REPO / "scripts" / "slurm" / "pretrain.sbatch"


def dry_run(script, *args, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
    result = subprocess.run(["bash", str(script), *args], cwd=REPO, capture_output=True,
                            text=True, timeout=30, env={**clean, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_tpu_dry_run_prints_the_gcloud_commands():
    env = dict(TPU_NAME="pod", ZONE="us-central2-b", ACCELERATOR="v4-64",
               RUNTIME="tpu-ubuntu2204-base", BUCKET="ctrate", SPOT="1",
               TRAIN_ARGS="--gin_param train.global_batch_size=2048")
    assert dry_run(TPU, "--dry-run", "create", **env) == [
        "gcloud compute tpus tpu-vm create pod --accelerator-type v4-64 --version "
        "tpu-ubuntu2204-base --spot --zone us-central2-b"]
    archive, copy, setup = dry_run(TPU, "--dry-run", "install", **env)
    assert archive.startswith(f"git -C {REPO} archive")
    assert copy.startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in copy
    assert setup.startswith("gcloud compute tpus tpu-vm ssh pod --worker=all --command ")
    assert "pip install -e ./ct-rate-jax" in setup
    assert "gcsfuse --implicit-dirs ctrate /gcs/ctrate" in setup
    (train,) = dry_run(TPU, "--dry-run", "train", **env)
    assert train.startswith("gcloud compute tpus tpu-vm ssh pod --worker=all --command '")
    assert ("python3 -m experiments.pretrain --gin experiments/configs/ct_clip_v2.gin "
            "--workdir /gcs/ctrate/runs/pod --gin_param train.global_batch_size=2048") in train
    (logs,) = dry_run(TPU, "--dry-run", "logs", **env)
    assert "--worker=0" in logs and "tail" in logs
    (stop,) = dry_run(TPU, "--dry-run", "stop", **env)
    assert "--worker=all" in stop and "kill -TERM" in stop
    assert dry_run(TPU, "--dry-run", "delete", **env) == [
        "gcloud compute tpus tpu-vm delete pod --quiet --zone us-central2-b"]
    # DRY_RUN=1 is the same as --dry-run; an unknown command is refused.
    assert dry_run(TPU, "delete", DRY_RUN="1", **env) == dry_run(TPU, "--dry-run", "delete",
                                                                 **env)
    assert subprocess.run(["bash", str(TPU), "--dry-run", "explode"],
                          capture_output=True).returncode == 2


@pytest.mark.parametrize("nodelist,host", [
    ("gpu[003-006]", "gpu003"), ("gpu[010,012-013],big1", "gpu010"), ("node7,node9", "node7"),
    ("single", "single")])
def test_slurm_dry_run_derives_the_coordinator_and_prints_srun(nodelist, host):
    lines = dry_run(SLURM, DRY_RUN="1", SLURM_JOB_NODELIST=nodelist, SLURM_JOB_ID="123457",
                    SLURM_NNODES="4", GPUS_PER_NODE="4", GIN="experiments/configs/demo.gin",
                    WORKDIR="/shared/run")
    port = 20000 + 123457 % 20000
    assert lines[0] == f"coordinator: {host}:{port}, 4 processes x 4 GPUs"
    assert lines[1] == (
        "srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec python -m "
        "experiments.pretrain --gin experiments/configs/demo.gin --workdir /shared/run "
        f"--coordinator_address {host}:{port} --num_processes 4 --process_id $SLURM_PROCID "
        "--local_device_ids 0,1,2,3'")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    result = subprocess.run(["shellcheck", str(TPU), str(SLURM)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
