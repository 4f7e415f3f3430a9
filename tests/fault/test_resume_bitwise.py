"""A run killed with `kill -9` several times at random moments (some while an
asynchronous checkpoint is being written) and resumed each time ends with parameters,
optimizer state, RNG state and data iterator state bitwise equal to an uninterrupted
run of the same length (CPU: the computation is deterministic).

The CI test makes two interruptions; the soak test (`CT_RATE_SOAK=1`) runs 10 trials
of 2-4 interruptions each and prints their figures (docs/reliability.md).
"""

import json
import os
import pathlib
import random
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pretrain_runs import (REPO, TINY_MODEL, data_bindings, pretrain_args, pretrain_env,
                           run_pretrain)

FAULT_BINDINGS = ["train.zero_shot_at_end=False", "train.checkpoint_every=1",
                  "train.log_every=1", "train.keep_checkpoints=2"]
TEMPORARY = ".orbax-checkpoint-tmp"  # orbax's name for a checkpoint being written


def complete_steps(checkpoint_dir: pathlib.Path) -> list[int]:
    if not checkpoint_dir.exists():
        return []
    return sorted(int(name) for name in os.listdir(checkpoint_dir) if name.isdigit())


def torn_checkpoints(checkpoint_dir: pathlib.Path) -> list[str]:
    if not checkpoint_dir.exists():
        return []
    return sorted(name for name in os.listdir(checkpoint_dir) if TEMPORARY in name)


def run_and_kill(workdir: pathlib.Path, bindings, steps: int, moment: str,
                 rng: random.Random, log_name: str) -> dict:
    """Starts the training command and `kill -9`s it at `moment`:
      "write": as soon as a checkpoint is being written after the run made progress;
      "step": at a random time (0-0.6 s) after the run wrote a new checkpoint;
      "startup": at a random time (0.5-4 s) after the start (imports, compilation,
        restore; the run may make no progress).
    Returns what happened (the run may finish before the kill comes: "finished")."""
    checkpoint_dir = workdir / "checkpoints"
    before = (complete_steps(checkpoint_dir) or [0])[-1]
    with open(workdir.parent / log_name, "w") as log:
        process = subprocess.Popen(pretrain_args(workdir, bindings, steps), cwd=REPO,
                                   env=dict(pretrain_env(), PYTHONUNBUFFERED="1"),
                                   stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900  # a shared, loaded machine can be very slow
    try:
        if moment == "startup":
            time.sleep(rng.uniform(0.5, 4.0))
        else:
            # Progress first: a checkpoint newer than the one this run resumed from.
            while (complete_steps(checkpoint_dir) or [0])[-1] <= before:
                if process.poll() is not None:
                    break
                assert time.monotonic() < deadline, "no progress in 900 s"
                time.sleep(0.01)
            if moment == "write":
                while not torn_checkpoints(checkpoint_dir) and process.poll() is None:
                    time.sleep(0.002)
            else:
                time.sleep(rng.uniform(0.0, 0.6))
        finished = process.poll() is not None
        process.kill()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    if finished:
        assert process.returncode == 0, (workdir.parent / log_name).read_text()[-3000:]
    return {"moment": moment, "resumed_from": before, "finished": finished,
            "complete_after": complete_steps(checkpoint_dir),
            "torn_after": torn_checkpoints(checkpoint_dir)}


def read_checkpoint(step_dir: pathlib.Path) -> tuple[dict, dict, dict]:
    """({"path/of/leaf": numpy array} of the train state, data iterator state, meta)."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = checkpointer.restore(step_dir / "state",
                                     args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    leaves = {jax.tree_util.keystr(path): leaf
              for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
    data_iterator = json.loads((step_dir / "data_iterator" / "metadata").read_text())
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    return leaves, data_iterator, meta


def assert_bitwise_equal(step_dir: pathlib.Path, reference_dir: pathlib.Path) -> int:
    """Every array (model, optimizer, RNG) and the iterator state; returns the count."""
    leaves, data_iterator, meta = read_checkpoint(step_dir)
    ref_leaves, ref_data_iterator, ref_meta = read_checkpoint(reference_dir)
    assert sorted(leaves) == sorted(ref_leaves)
    # (model, optimizer): the optimizer's step count and Adam moments are compared too.
    assert any("mu" in k for k in leaves) and any("rngs" in k for k in leaves)
    differing = [k for k in leaves if leaves[k].dtype != ref_leaves[k].dtype
                 or not np.array_equal(leaves[k], ref_leaves[k])]
    assert not differing, f"{len(differing)} of {len(leaves)} arrays differ: {differing[:5]}"
    assert data_iterator == ref_data_iterator and meta == ref_meta
    return len(leaves)


def interrupted_run(workdir: pathlib.Path, bindings, steps: int, moments, rng) -> list[dict]:
    """Kills the run at each of `moments` in turn, then lets it finish; checks that
    every rerun resumed from the newest complete checkpoint."""
    workdir.mkdir(parents=True)
    kills = []
    for i, moment in enumerate(moments):
        kills.append(run_and_kill(workdir, bindings, steps, moment, rng, f"{workdir.name}-{i}.log"))
        if kills[-1]["finished"]:
            break
    final = run_pretrain(workdir, bindings, steps=steps)
    assert final.returncode == 0, final.stderr[-3000:]
    logs = [(workdir.parent / f"{workdir.name}-{i}.log").read_text() for i in range(len(kills))]
    logs.append(final.stdout)
    # The run after each kill resumed from the newest complete checkpoint (a run killed
    # during its start-up may not have got as far as saying so).
    for kill, next_kill, next_log in zip(kills, kills[1:] + [None], logs[1:]):
        newest = kill["complete_after"][-1] if kill["complete_after"] else None
        made_progress = next_kill is None or next_kill["complete_after"][-1:] != [newest]
        if newest is None:
            assert "resumed from" not in next_log
        elif made_progress or "resumed from" in next_log:
            assert f"resumed from {workdir / 'checkpoints'}/{newest}\n" in next_log, next_log
    return kills


@pytest.mark.slow
def test_kill_9_twice_then_resume_is_bitwise_equal_to_an_uninterrupted_run(
        tiny_synthetic_data, tmp_path):
    bindings = TINY_MODEL + data_bindings(tiny_synthetic_data) + FAULT_BINDINGS
    steps = 8
    straight = run_pretrain(tmp_path / "straight", bindings, steps=steps)
    assert straight.returncode == 0, straight.stderr[-3000:]
    kills = interrupted_run(tmp_path / "killed", bindings, steps, ["write", "step"],
                            random.Random(0))
    assert [k["finished"] for k in kills] == [False, False]
    assert_bitwise_equal(tmp_path / "killed" / "checkpoints" / str(steps),
                         tmp_path / "straight" / "checkpoints" / str(steps))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CT_RATE_SOAK") != "1",
                    reason="soak test (10 interrupted runs, ~10 min): set CT_RATE_SOAK=1")
def test_soak_kill_9_at_random_moments_resumes_bitwise(tiny_synthetic_data, tmp_path):
    bindings = TINY_MODEL + data_bindings(tiny_synthetic_data) + FAULT_BINDINGS
    steps, trials = 12, 10
    straight = run_pretrain(tmp_path / "straight", bindings, steps=steps)
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = tmp_path / "straight" / "checkpoints" / str(steps)
    summary = {"trials": 0, "kills": 0, "during_write": 0, "torn_left": 0,
               "finished_first": 0, "arrays": 0}
    for trial in range(trials):
        rng = random.Random(1000 + trial)
        moments = [rng.choice(["write", "write", "step", "startup"])
                   for _ in range(rng.randint(2, 4))]
        kills = interrupted_run(tmp_path / f"trial{trial}", bindings, steps, moments, rng)
        summary["arrays"] = assert_bitwise_equal(
            tmp_path / f"trial{trial}" / "checkpoints" / str(steps), reference)
        summary["trials"] += 1
        for kill in kills:
            summary["finished_first"] += kill["finished"]
            summary["kills"] += not kill["finished"]
            summary["during_write"] += kill["moment"] == "write" and not kill["finished"]
            summary["torn_left"] += bool(kill["torn_after"]) and not kill["finished"]
        print(f"trial {trial}: " + "; ".join(
            f"{k['moment']} kill after resuming from {k['resumed_from']}: complete "
            f"{k['complete_after']}, torn {k['torn_after']}"
            + (" (finished first)" if k["finished"] else "") for k in kills))
    print(f"soak summary: {summary}")
