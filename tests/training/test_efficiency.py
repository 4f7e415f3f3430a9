"""bf16 compute with float32 master weights, and per-block rematerialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ct_rate_jax import sharding
from ct_rate_jax.models import ct_clip
from ct_rate_jax.training import optimizer, train_state

# The tiny variant with VQ on; BERT dropout on (the remat test must see the same masks).
CONFIG = ct_clip.variant("tiny")
BATCH = 8


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"volume": rng.uniform(-1, 1, (BATCH, 8, 16, 16)).astype(np.float32),
            "input_ids": rng.integers(5, 128, (BATCH, 12)).astype(np.int32),
            "attention_mask": np.ones((BATCH, 12), np.int32)}


def loss_and_grads(remat_policy):
    model = ct_clip.CTCLIP(CONFIG, rngs=nnx.Rngs(params=0, dropout=1),
                           remat_policy=remat_policy)
    graphdef, state = nnx.split(model)

    @jax.jit
    def compute(state, batch):
        model = nnx.merge(graphdef, state)
        (loss, _), grads = nnx.value_and_grad(train_state.clip_loss_fn, has_aux=True)(
            model, batch)
        return loss, nnx.to_pure_dict(grads), nnx.to_pure_dict(nnx.state(model, ...))

    return compute(state, make_batch())


def test_remat_gives_the_same_loss_gradients_and_state():
    """Full rematerialisation (the policy that recomputes the most) against none."""
    loss, grads, state = loss_and_grads(None)
    loss_r, grads_r, state_r = loss_and_grads("full")
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    # The same computation re-run, fused differently by XLA: equal to float32 rounding
    # (measured: at most 3e-7 relative to a tensor's largest entry).  Gradients that are
    # zero in exact arithmetic (~1e-12 of noise) are compared on the global scale.
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=0, atol=1e-5 * max(float(np.abs(b).max()), 1e-3 * largest)),
        grads_r, grads)
    # The VQ codebook EMA and the RNG counters advanced the same way.
    raw = lambda x: jax.random.key_data(x) if jnp.issubdtype(  # noqa: E731
        x.dtype, jax.dtypes.prng_key) else x
    jax.tree.map(lambda a, b: np.testing.assert_allclose(raw(a), raw(b), rtol=1e-6,
                                                         atol=1e-6), state_r, state)


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="remat_policy"):
        ct_clip.CTCLIP(CONFIG, rngs=nnx.Rngs(0), remat_policy="everything")


def test_bfloat16_step_keeps_float32_master_weights_and_matches_float32_loss():
    mesh = sharding.make_mesh()
    tx, schedule = optimizer.adamw_warmup_cosine(100, 1e-3, warmup_steps=0)
    state = train_state.TrainState.create(
        lambda rngs: ct_clip.CTCLIP(CONFIG, rngs=rngs, dtype=jnp.bfloat16), tx, mesh, seed=0)
    before = np.asarray(state.model.to_text_latent.kernel[...])
    step = train_state.make_train_step(state, schedule)
    state.state, metrics = step(state.state, sharding.host_batch_to_global(make_batch(), mesh))
    assert int(metrics["nonfinite"]) == 0
    floats = [x.dtype for x in jax.tree.leaves(state.state)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(d == jnp.float32 for d in floats)
    # An update smaller than bf16's resolution still lands in the float32 master copy.
    assert not np.array_equal(np.asarray(state.model.to_text_latent.kernel[...]), before)

    # The float32 loss of the same parameters and dropout masks (TrainState.create seeds
    # params with `seed` and dropout with `seed + 1`): only the compute dtype differs.
    f32 = ct_clip.CTCLIP(CONFIG, rngs=nnx.Rngs(params=0, dropout=1))
    loss_f32 = float(jax.jit(lambda m, b: train_state.clip_loss_fn(m, b)[0])(f32, make_batch()))
    loss_bf16 = float(metrics["loss"])
    assert loss_bf16 != loss_f32  # bf16 really was used
    assert loss_bf16 == pytest.approx(loss_f32, rel=2e-2)
