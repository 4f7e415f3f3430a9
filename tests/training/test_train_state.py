"""Train step on 1 and 8 devices, sharding by logical names, learning, checkpoints."""

import jax
import numpy as np
import pytest
from flax import nnx

from ct_rate_jax import sharding
from ct_rate_jax.models import ct_clip
from ct_rate_jax.training import checkpoints, optimizer, train_state

CONFIG = ct_clip.variant("tiny")
BATCH = 8


def factory(rngs):
    return ct_clip.CTCLIP(CONFIG, rngs=rngs)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"volume": rng.uniform(-1, 1, (BATCH, 8, 16, 16)).astype(np.float32),
            "input_ids": rng.integers(5, 128, (BATCH, 12)).astype(np.int32),
            "attention_mask": np.ones((BATCH, 12), np.int32)}


def run_steps(mesh, num_steps, batches=None, learning_rate=1e-3):
    tx, schedule = optimizer.adamw_warmup_cosine(100, learning_rate, warmup_steps=0)
    state = train_state.TrainState.create(factory, tx, mesh, seed=0)
    step = train_state.make_train_step(state, schedule)
    losses = []
    for i in range(num_steps):
        batch = sharding.host_batch_to_global((batches or [make_batch(0)])[i % len(batches or [0])],
                                              mesh)
        state.state, metrics = step(state.state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def params(state):
    model = state.model
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]}


def loss_and_grads(mesh):
    """Loss and parameter gradients of one global batch at the initial parameters."""
    tx = optimizer.adamw_warmup_cosine(10)[0]
    state = train_state.TrainState.create(factory, tx, mesh, seed=0)
    graphdef = state.graphdef

    @jax.jit
    def compute(state_, batch):
        model, _ = nnx.merge(graphdef, state_)
        (loss, _), grads = nnx.value_and_grad(train_state.clip_loss_fn, has_aux=True)(
            model, batch)
        return loss, nnx.to_pure_dict(grads)

    loss, grads = compute(state.state, sharding.host_batch_to_global(make_batch(0), mesh))
    flat = {jax.tree_util.keystr(p): np.asarray(g)
            for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    return float(loss), flat


@pytest.fixture(scope="module")
def single_device_reference():
    return loss_and_grads(sharding.make_mesh(devices=jax.devices()[:1]))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (1, 4, 2)])
def test_eight_devices_match_one_device(single_device_reference, mesh_shape):
    assert jax.device_count() == 8
    reference_loss, reference_grads = single_device_reference
    mesh = sharding.make_mesh(*mesh_shape)
    loss, grads = loss_and_grads(mesh)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    largest = max(np.abs(g).max() for g in reference_grads.values())
    for key, grad in grads.items():
        # Some gradients are mathematically zero (a per-head bias added to every
        # attention logit cancels in the softmax) and only float noise: compare those
        # on the scale of the largest gradient.
        scale = max(np.abs(reference_grads[key]).max(), 1e-3 * largest)
        np.testing.assert_allclose(grad / scale, reference_grads[key] / scale, atol=1e-4,
                                   err_msg=key)
    # Several optimizer steps on 8 devices: tests/experiments/test_pretrain.py.


def test_parameters_are_sharded_as_the_rules_say():
    state = train_state.TrainState.create(
        factory, optimizer.adamw_warmup_cosine(10)[0], sharding.make_mesh(2, 2, 2))
    model_state = state.state[0]
    spec = lambda v: tuple(v.get_value().sharding.spec)  # noqa: E731
    assert spec(model_state["to_visual_latent"]["kernel"]) == ("fsdp", None)
    attn = model_state["visual_transformer"]["enc_spatial_transformer"]["layers"][0]["attn"]
    assert spec(attn["to_q"]["kernel"]) == ("fsdp", "tensor")
    assert spec(attn["to_out"]["kernel"]) == ("tensor", "fsdp")
    words = model_state["text_transformer"]["embeddings"]["word_embeddings"]["embedding"]
    assert spec(words) == ("tensor", "fsdp")
    shard_shape = words.get_value().addressable_shards[0].data.shape
    assert shard_shape == (128 // 2, 32 // 2)
    # Adam moments follow their parameters.
    mu = state.state[1]["opt_state"][1][0].mu["to_visual_latent"]["kernel"]
    assert spec(mu) == ("fsdp", None)


def test_loss_decreases_when_fitting_a_few_batches():
    batches = [make_batch(s) for s in range(2)]
    _, losses = run_steps(sharding.make_mesh(devices=jax.devices()[:1]), 30, batches,
                          learning_rate=3e-3)
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:2])


def test_checkpoint_restore_gives_the_identical_next_step(tmp_path):
    mesh = sharding.make_mesh(4, 2, 1)
    tx, schedule = optimizer.adamw_warmup_cosine(100, 1e-3, warmup_steps=0)
    state = train_state.TrainState.create(factory, tx, mesh)
    step = train_state.make_train_step(state, schedule)
    batch = sharding.host_batch_to_global(make_batch(3), mesh)
    state.state, _ = step(state.state, batch)
    checkpointer = checkpoints.Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(1, state.state, {"position": 7}, {"note": "test"})
    checkpointer.wait_until_finished()
    state.state, expected = step(state.state, batch)
    expected_params = params(state)

    _, abstract = train_state.TrainState.abstract(factory, tx)
    restored, data_state, meta = checkpoints.Checkpointer(str(tmp_path / "ckpt")).restore(
        1, abstract, state.shardings)
    assert data_state == {"position": 7} and meta["step"] == 1
    state.state, metrics = step(restored, batch)
    assert float(metrics["loss"]) == float(expected["loss"])
    for key, value in params(state).items():
        np.testing.assert_array_equal(value, expected_params[key], err_msg=key)


def test_restoring_into_another_model_names_the_mismatch(tmp_path):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    tx = optimizer.adamw_warmup_cosine(10)[0]
    state = train_state.TrainState.create(factory, tx, mesh)
    checkpointer = checkpoints.Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(0, state.state, {}, {})
    checkpointer.wait_until_finished()
    bigger = ct_clip.variant("tiny")
    bigger = ct_clip.CTCLIPConfig(ctvit=bigger.ctvit, text=bigger.text, dim_latent=24)
    other = lambda rngs: ct_clip.CTCLIP(bigger, rngs=rngs)  # noqa: E731
    _, abstract = train_state.TrainState.abstract(other, tx)
    shardings = sharding.state_shardings(abstract, mesh)
    with pytest.raises(checkpoints.CheckpointMismatchError, match="to_text_latent"):
        checkpointer.restore(0, abstract, shardings)
