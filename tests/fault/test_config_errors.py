"""A configuration that cannot work stops `experiments.pretrain` before training starts:
non-zero exit, one line naming the setting or file, nothing written to the workdir.

The command's `main` runs in this process (as `python -m experiments.pretrain` would
run it, flags and gin included), so that each case costs a gin parse and the checks,
not a subprocess.
"""

import os
import pathlib

import gin
import pytest
from flax import nnx

from ct_rate_jax import checkpoint_io
from ct_rate_jax.models.ct_clip import CTCLIP
from ct_rate_jax.training import checkpoints, optimizer
from experiments import gin_setup, pretrain
from pretrain_runs import REPO, TINY_MODEL, data_bindings

DEMO_GIN = str(REPO / "experiments" / "configs" / "demo.gin")


def run_main(workdir, bindings, steps=2) -> str:
    """Runs the command's main in-process; returns its exit message (it must exit)."""
    argv = ["pretrain", "--gin", DEMO_GIN, "--workdir", str(workdir), "--steps", str(steps)]
    for binding in bindings:
        argv += ["--gin_param", binding]
    pretrain.FLAGS(argv)
    try:
        with pytest.raises(SystemExit) as exit_info:
            pretrain.main([])
    finally:
        pretrain.FLAGS.unparse_flags()
        gin.clear_config()
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: "), message  # exit 1
    return message


def snapshot(root: pathlib.Path) -> dict:
    """{path: (size, modification time)} of every file and folder under root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def model_config(bindings):
    """The CTCLIPConfig that demo.gin and `bindings` describe."""
    gin_setup.parse_gin([DEMO_GIN], bindings)
    try:
        return gin.query_parameter("train.model").scoped_configurable_fn()
    finally:
        gin.clear_config()


@pytest.fixture
def base(tiny_synthetic_data):
    return TINY_MODEL + data_bindings(tiny_synthetic_data) + ["train.zero_shot_at_end=False"]


@pytest.mark.parametrize("extra, steps, named", [
    (["train.not_a_setting=3"], 2, "--gin_param train.not_a_setting=3"),
    (["CTViTConfig.dimm=3"], 2, "'dimm'"),
    (["train.train_data='/no/such/shards'"], 2, "train.train_data = '/no/such/shards'"),
    (["train.tokenizer='/no/such/tokenizer.json'"], 2, "/no/such/tokenizer.json"),
    (["train.init_checkpoint='/no/such/model'"], 2, "/no/such/model"),
    ([], -1, "train.num_steps (--steps) must be >= 0, got -1"),
    (["train.global_batch_size=6"], 2, "train.global_batch_size = 6 is not divisible"),
    (["train.mesh_shape=(3, 1, 1)"], 2, "train.mesh_shape = (3, 1, 1)"),
    (["adamw_warmup_cosine.learning_rate=0.0"], 2, "adamw_warmup_cosine.learning_rate"),
    (["adamw_warmup_cosine.learning_rate=-1e-3"], 2, "adamw_warmup_cosine.learning_rate"),
    (["train.loss='hinge'"], 2, "train.loss must be one of"),
    (["train.loss='sigmoid'"], 2, "CTCLIPConfig.init_logit_bias"),
    (["train.nonfinite='ignore'"], 2, "train.nonfinite"),
    (["train.bad_records='ignore'"], 2, "train.bad_records"),
    (["train.checkpoint_every=0"], 2, "train.checkpoint_every must be >= 1"),
    (["train.keep_checkpoints=0"], 2, "train.keep_checkpoints must be >= 1"),
    (["train.grad_accum_steps=3"], 2, "train.grad_accum_steps"),
    (["train.sentence_sampling_prob=1.5"], 2, "train.sentence_sampling_prob"),
    (["train.sentence_keys='labels'"], 2, "train.sentence_keys"),
    (["train.sentence_views=2", "train.sentence_view_length=64"], 2,
     "train.sentence_view_length = 64"),
    (["train.compute_dtype='float8'"], 2, "train.compute_dtype"),
    (["CTViTConfig.image_size=32"], 2, "CTViTConfig.image_size"),
    (["BertConfig.vocab_size=100"], 2, "BertConfig.vocab_size"),
])
def test_bad_setting_is_one_line_naming_it_and_nothing_is_written(base, tmp_path, extra,
                                                                   steps, named):
    workdir = tmp_path / "run"
    message = run_main(workdir, base + extra, steps)
    assert named in message and "\n" not in message, message
    assert not workdir.exists()


@pytest.mark.slow
def test_checkpoint_of_another_model_stops_before_anything_is_written(base, tmp_path):
    """`train.init_checkpoint` of another size in a fresh workdir, and a workdir whose
    checkpoint was written by another model: the first line names the directory, the
    differing weights follow; the workdir is left exactly as it was."""
    other = model_config(TINY_MODEL + ["CTCLIPConfig.dim_latent=24"])
    model = CTCLIP(other, rngs=nnx.Rngs(0))
    model_dir = tmp_path / "other_model"
    checkpoint_io.save_converted(model_dir, model)
    fresh = tmp_path / "fresh"
    message = run_main(fresh, base + [f"train.init_checkpoint='{model_dir}'"])
    first, *differences = message.splitlines()
    assert str(model_dir) in first and "do not fit the model" in first, message
    assert any("to_text_latent" in line for line in differences), message
    assert not fresh.exists()

    # A workdir written by another model: its checkpoint, metrics and config stay as
    # they were.
    resumed = tmp_path / "resumed"
    tx, _ = optimizer.adamw_warmup_cosine(total_steps=2, warmup_steps=2)
    saver = checkpoints.Checkpointer(str(resumed / "checkpoints"), async_save=False)
    saver.save(1, nnx.state((model, nnx.Optimizer(model, tx, wrt=nnx.Param))), {}, {})
    saver.close()
    (resumed / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (resumed / "config.gin").write_text("# the first run's config\n")
    before = snapshot(resumed)
    message = run_main(resumed, base)
    first, *differences = message.splitlines()
    assert f"checkpoint {resumed / 'checkpoints'}/1 does not match the model" in first, message
    assert any("to_text_latent" in line for line in differences), message
    assert snapshot(resumed) == before
    assert os.listdir(resumed / "checkpoints") == ["1"]
