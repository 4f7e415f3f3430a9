"""Running `python -m experiments.pretrain` as a user does, for the end-to-end tests
(tests/experiments, tests/fault): a tiny model, the tiny synthetic data, subprocesses."""

import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
# peg_impl='conv': the 27-tap PEG's gradient is slow to compile on the CPU (a cold tiny
# run took 111 s with it and 57 s with the grouped convolution); the two compute the same
# (tests/models/test_ctvit.py), and the taps keep their own tests (parity, sharding,
# the two-process run, which needs them: its mesh replicates the batch over `tensor`).
TINY_MODEL = [
    "CTViTConfig.peg_impl='conv'",
    "CTViTConfig.dim=32", "CTViTConfig.image_size=16", "CTViTConfig.patch_size=8",
    "CTViTConfig.temporal_patch_size=4", "CTViTConfig.heads=2", "CTViTConfig.dim_head=8",
    "BertConfig.vocab_size=320", "BertConfig.hidden_size=32", "BertConfig.num_hidden_layers=1",
    "BertConfig.num_attention_heads=2", "BertConfig.intermediate_size=64",
    "BertConfig.max_position_embeddings=32", "CTCLIPConfig.dim_latent=16",
    "train.max_text_length=32", "train.global_batch_size=8", "train.log_every=2",
    "train.checkpoint_every=3", "adamw_warmup_cosine.warmup_steps=2",
]
# demo.gin trains with single-sentence views (docs/demo_zero_shot.md); most runs test
# other things and leave them out (a smaller program to compile).  The demo-path test
# (test_pretrain.test_train_resume_and_zero_shot) and the losses' own tests keep them.
NO_SENTENCE_VIEWS = ["train.sentence_views=0"]
TINY_MODEL_WITH_VIEWS = list(TINY_MODEL)
TINY_MODEL = TINY_MODEL_WITH_VIEWS + NO_SENTENCE_VIEWS


# One XLA compilation cache for the session's runs: the tiny model's train step is
# compiled once instead of in every subprocess (the same executable either way).
COMPILATION_CACHE = tempfile.mkdtemp(prefix="ct_rate_jax_test_xla_cache_")
atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)


def pretrain_env(devices=1):
    """The environment of a `python -m experiments.pretrain` subprocess."""
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_COMPILATION_CACHE_DIR=COMPILATION_CACHE,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def pretrain_args(workdir, bindings, steps, gin_file="experiments/configs/demo.gin"):
    """The command line of `python -m experiments.pretrain`."""
    args = [sys.executable, "-m", "experiments.pretrain", "--gin", gin_file,
            "--workdir", str(workdir), "--steps", str(steps)]
    for binding in bindings:
        args += ["--gin_param", binding]
    return args


def data_bindings(data):
    return [f"train.train_data='{data.shard_dir('train')}'",
            f"train.eval_data='{data.shard_dir('valid')}'",
            f"train.tokenizer='{data.tokenizer_path}'", "train.synthetic_data=None"]


def run_pretrain(workdir, bindings, steps, gin_file="experiments/configs/demo.gin", devices=1):
    return subprocess.run(pretrain_args(workdir, bindings, steps, gin_file), cwd=REPO,
                          env=pretrain_env(devices), capture_output=True, text=True,
                          timeout=600)


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
