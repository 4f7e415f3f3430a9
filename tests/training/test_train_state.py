"""Train step on 1 and 8 devices, sharding by logical names, learning, checkpoints."""

import dataclasses

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


def loss_and_grads(mesh, return_state=False):
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
    return (float(loss), flat, state) if return_state else (float(loss), flat)


@pytest.fixture(scope="module")
def single_device_reference():
    return loss_and_grads(sharding.make_mesh(devices=jax.devices()[:1]))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (1, 4, 2)])
def test_eight_devices_match_one_device(single_device_reference, mesh_shape):
    assert jax.device_count() == 8
    reference_loss, reference_grads = single_device_reference
    mesh = sharding.make_mesh(*mesh_shape)
    loss, grads, state = loss_and_grads(mesh, return_state=True)
    assert_placed_as_the_rules_say(state, mesh)
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


RULES = dict(sharding.LOGICAL_AXIS_RULES)


def rule_shard_shape(names, shape, mesh):
    """What one device holds of a parameter with these logical axis names: each dimension
    divided by the sizes of the mesh axes its rule names (replicated when they do not
    divide it)."""
    held = []
    for dim, name in zip(shape, names):
        axes = RULES[name] if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in axes]))
        held.append(dim // size if dim % size == 0 else dim)
    return tuple(held)


def assert_placed_as_the_rules_say(state, mesh):
    """Every parameter, and its Adam moments, lies on the devices in the shards that its
    logical axis names and the rules table give."""
    model, optimizer_ = nnx.merge(state.graphdef, state.state)
    adam = state.state[1]["opt_state"][1][0]
    moments = {name: {jax.tree_util.keystr(p): v for p, v in
                      jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(tree))[0]}
               for name, tree in (("mu", adam.mu), ("nu", adam.nu))}
    split = 0
    for path, variable in jax.tree_util.tree_flatten_with_path(
            nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        value = variable.get_value()
        names = variable.get_metadata().get("out_sharding") or (None,) * value.ndim
        want = rule_shard_shape(names, value.shape, mesh)
        key = jax.tree_util.keystr(path)
        assert value.addressable_shards[0].data.shape == want, (key, names)
        assert len(value.addressable_shards) == mesh.size
        for name, by_key in moments.items():
            moment = by_key[key]
            assert moment.addressable_shards[0].data.shape == want, (name, key)
            assert moment.sharding.is_equivalent_to(value.sharding, value.ndim), (name, key)
        split += want != value.shape
    # Meshes with fsdp or tensor > 1 split most weights; pure data parallel none.
    assert (split > 0) == (mesh.shape["fsdp"] * mesh.shape["tensor"] > 1)


def test_v2_sized_weights_are_split_as_the_rules_say():
    """The released model's shapes, abstractly (nothing allocated), on fsdp=4 x tensor=2:
    the 294,912 x 512 visual projection is split 4 ways over its input features, the
    vocabulary over tensor, and the feed-forward width 1365 (odd) stays whole."""
    abstract = nnx.eval_shape(lambda: ct_clip.CTCLIP(ct_clip.variant("v2"), rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh(1, 4, 2)
    shardings = sharding.state_shardings(nnx.state(abstract), mesh)
    kernel = shardings["to_visual_latent"]["kernel"].get_value()
    assert abstract.to_visual_latent.kernel.shape == (294_912, 512)
    assert tuple(kernel.spec) == ("fsdp", None)
    assert kernel.shard_shape((294_912, 512)) == (73_728, 512)
    words = shardings["text_transformer"]["embeddings"]["word_embeddings"]["embedding"]
    assert words.get_value().shard_shape((30_522, 768)) == (15_261, 192)
    ff = shardings["visual_transformer"]["enc_spatial_transformer"]["layers"][0]["ff"]
    proj_in, proj_out = ff["proj_in"]["kernel"].get_value(), ff["proj_out"]["kernel"].get_value()
    assert proj_in.shard_shape((512, 2 * 1365)) == (128, 1365)  # 2730 splits over tensor
    assert tuple(proj_out.spec) == (None, "fsdp")  # 1365 does not: replicated over tensor
    assert proj_out.shard_shape((1365, 512)) == (1365, 128)


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


# --- Loss selection, SigLIP's bias, gradient accumulation ------------------------------

SIGLIP = dataclasses.replace(CONFIG, init_logit_bias=-10.0, init_temperature=float(np.log(10)))
# Exact big-batch equality needs the same dropout masks, i.e. dropout off.
NO_DROPOUT = dataclasses.replace(CONFIG, text=dataclasses.replace(
    CONFIG.text, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
ACCUM_BATCH = 32  # micro-batches of 8 and 16 rows, divisible over 8 devices
# A per-head bias added to every attention logit cancels in the softmax: its gradient
# is mathematically zero, and what is computed is cancellation noise.
ZERO_GRADIENT = "['visual_transformer']['spatial_rel_pos_bias']['to_heads']['bias']"


def test_logit_bias_is_a_parameter_only_when_configured():
    assert not hasattr(ct_clip.CTCLIP(CONFIG, rngs=nnx.Rngs(0)), "logit_bias")
    model = ct_clip.CTCLIP(SIGLIP, rngs=nnx.Rngs(0))
    assert isinstance(model.logit_bias, nnx.Param) and float(model.logit_bias[...]) == -10.0
    assert ct_clip.CTCLIPConfig.from_dict(SIGLIP.to_dict()) == SIGLIP
    assert ct_clip.CTCLIPConfig.from_dict(
        {k: v for k, v in CONFIG.to_dict().items() if k != "init_logit_bias"}) == CONFIG
    _, abstract = train_state.TrainState.abstract(
        lambda rngs: ct_clip.CTCLIP(SIGLIP, rngs=rngs), optimizer.adamw_warmup_cosine(10)[0])
    shardings = sharding.state_shardings(abstract, sharding.make_mesh(2, 2, 2))
    assert tuple(shardings[0]["logit_bias"].get_value().spec) == ()  # replicated


def test_sigmoid_loss_needs_the_bias_and_unknown_settings_fail():
    with pytest.raises(ValueError, match="init_logit_bias"):
        train_state.check_loss_settings(CONFIG, "sigmoid")
    train_state.check_loss_settings(SIGLIP, "sigmoid", grad_accum_steps=4)
    with pytest.raises(ValueError, match="train.loss"):
        train_state.check_loss_settings(CONFIG, "hinge")
    with pytest.raises(ValueError, match="train.grad_accum_steps"):
        train_state.check_loss_settings(CONFIG, "softmax", grad_accum_steps=0)


def test_sigmoid_loss_with_accumulation_and_dropout_decreases():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    tx, schedule = optimizer.adamw_warmup_cosine(100, 3e-3, warmup_steps=0)
    state = train_state.TrainState.create(lambda rngs: ct_clip.CTCLIP(SIGLIP, rngs=rngs), tx,
                                          mesh)
    step = train_state.make_train_step(state, schedule, loss="sigmoid", grad_accum_steps=2)
    batches = [sharding.host_batch_to_global(make_batch(s), mesh) for s in range(2)]
    losses, biases = [], []
    for i in range(12):
        state.state, metrics = step(state.state, batches[i % 2])
        losses.append(float(metrics["loss"]))
        biases.append(float(metrics["logit_bias"]))
    assert np.all(np.isfinite(losses)) and biases[-1] != biases[0]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:2])


def accumulated_loss_and_grads(mesh, steps, chunked=False):
    """Loss and gradients of one [ACCUM_BATCH] batch over `steps` micro-batches."""
    tx = optimizer.adamw_warmup_cosine(10)[0]
    state = train_state.TrainState.create(lambda rngs: ct_clip.CTCLIP(NO_DROPOUT, rngs=rngs),
                                          tx, mesh)
    graphdef = state.graphdef

    @jax.jit
    def compute(state_, batch):
        model, _ = nnx.merge(graphdef, state_)
        if steps == 1:
            (loss, _), grads = nnx.value_and_grad(train_state.clip_loss_fn, has_aux=True)(
                model, batch)
        else:
            (loss, _), grads = train_state.accumulated_loss_and_grads(
                model, batch, steps, mesh, chunked=chunked)
        return loss, nnx.to_pure_dict(grads)

    rng = np.random.default_rng(5)
    batch = {"volume": rng.uniform(-1, 1, (ACCUM_BATCH, 8, 16, 16)).astype(np.float32),
             "input_ids": rng.integers(5, 128, (ACCUM_BATCH, 12)).astype(np.int32),
             "attention_mask": (np.arange(12) < rng.integers(4, 13, (ACCUM_BATCH, 1))
                                ).astype(np.int32)}
    loss, grads = compute(state.state, sharding.host_batch_to_global(batch, mesh))
    return float(loss), {jax.tree_util.keystr(p): np.asarray(g)
                         for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}


@pytest.fixture(scope="module")
def big_batch_reference():
    return accumulated_loss_and_grads(sharding.make_mesh(devices=jax.devices()[:1]), 1)


@pytest.mark.parametrize("mesh_shape,steps", [
    (None, 4), ((2, 4, 1), 2),
])
def test_gradient_accumulation_equals_the_big_batch(big_batch_reference, mesh_shape, steps):
    mesh = (sharding.make_mesh(*mesh_shape) if mesh_shape
            else sharding.make_mesh(devices=jax.devices()[:1]))
    reference_loss, reference_grads = big_batch_reference
    # On the mesh, also with the chunked (shard_map) loss on the global latents.
    loss, grads = accumulated_loss_and_grads(mesh, steps, chunked=mesh_shape is not None)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    largest = max(np.abs(g).max() for g in reference_grads.values())
    for key, grad in grads.items():
        if key == ZERO_GRADIENT:  # float noise ~1e-3 of the largest: any order differs
            assert np.abs(grad).max() < 1e-2 * largest
            continue
        scale = max(np.abs(reference_grads[key]).max(), 1e-3 * largest)
        np.testing.assert_allclose(grad / scale, reference_grads[key] / scale, atol=1e-5,
                                   err_msg=key)


def test_nonfinite_step_leaves_the_state_unchanged():
    """A NaN in the batch (or an update that overflows) is flagged and not applied."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    tx, schedule = optimizer.adamw_warmup_cosine(100, 1e-3, warmup_steps=0)
    state = train_state.TrainState.create(factory, tx, mesh, seed=0)
    step = train_state.make_train_step(state, schedule)
    before = params(state)
    poisoned = make_batch(0)
    poisoned["volume"][0, 0, 0, 0] = np.nan
    state.state, metrics = step(state.state, sharding.host_batch_to_global(poisoned, mesh))
    assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    after = params(state)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert int(state.state[1]["step"][...]) == 0  # the optimizer did not count it
    state.state, metrics = step(state.state, sharding.host_batch_to_global(make_batch(0), mesh))
    assert int(metrics["nonfinite"]) == 0
    assert any(not np.array_equal(before[k], v) for k, v in params(state).items())


def sentence_view_batch(seed=0, views=2):
    """make_batch plus 2 sentence views per row; statements repeat across rows (and so
    across devices), which makes positives off the diagonal."""
    rng = np.random.default_rng(seed)
    statements = rng.integers(0, 5, (BATCH, 4)).astype(np.int32)  # 4 per report, of 5
    picked = statements[:, :views]
    return dict(make_batch(seed),
                sentence_ids=rng.integers(5, 128, (BATCH, views, 6)).astype(np.int32),
                sentence_mask=np.ones((BATCH, views, 6), np.int32),
                sentence_keys=picked, report_keys=statements)


# Deterministic (no dropout, no VQ), so that the latents can be recomputed outside the step.
# The grouped-convolution PEG compiles faster on the CPU (the meshes here shard only the
# batch, where it partitions correctly; CTViTConfig.peg_impl).
SENTENCE_CONFIG = dataclasses.replace(
    ct_clip.variant("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    ctvit=dataclasses.replace(CONFIG.ctvit, use_vq=False, peg_impl="conv"))


def sentence_loss_and_grads(mesh):
    tx = optimizer.adamw_warmup_cosine(10)[0]
    state = train_state.TrainState.create(lambda rngs: ct_clip.CTCLIP(SENTENCE_CONFIG, rngs=rngs),
                                          tx, mesh, seed=0)
    graphdef = state.graphdef
    loss_fn = train_state.make_loss_fn(sentence_loss_weight=0.5)

    @jax.jit
    def compute(state_, batch):
        model, _ = nnx.merge(graphdef, state_)
        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
        return loss, metrics, nnx.to_pure_dict(grads)

    loss, metrics, grads = compute(state.state, sharding.host_batch_to_global(
        sentence_view_batch(), mesh))
    return float(loss), jax.device_get(metrics), jax.tree.leaves(grads), state


def test_sentence_view_loss_is_over_the_global_batch():
    """Report loss + 0.5 x multi-positive loss of the sentence views, the positives taken
    from statements shared anywhere in the global batch; 8 devices = 1 device."""
    loss1, metrics1, grads1, state = sentence_loss_and_grads(
        sharding.make_mesh(devices=jax.devices()[:1]))
    loss8, _, grads8, _ = sentence_loss_and_grads(sharding.make_mesh(8, 1, 1))
    assert loss8 == pytest.approx(loss1, rel=1e-5)
    largest = max(np.abs(g).max() for g in grads1)
    for g1, g8 in zip(grads1, grads8):
        np.testing.assert_allclose(g8 / largest, g1 / largest, atol=1e-4)
    # The same value from the latents, with the positives built in numpy.
    batch, model = sentence_view_batch(), state.model
    image = np.asarray(nnx.jit(lambda m, v: m.embed_image(v))(model, batch["volume"]))
    text = np.asarray(nnx.jit(lambda m, i, a: m.embed_text(i, a))(
        model, batch["sentence_ids"].reshape(-1, 6), batch["sentence_mask"].reshape(-1, 6)))
    keys = batch["sentence_keys"].reshape(-1)
    positives = np.array([[k in row for k in keys] for row in batch["report_keys"]])
    assert positives.sum() > 2 * len(keys)  # shared statements: more than the own rows
    scale = float(model.logit_scale())
    logits = scale * image @ text.T
    log_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    log_cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    want = 0.5 * (np.mean([-log_rows[i, positives[i]].mean() for i in range(BATCH)])
                  + np.mean([-log_cols[positives[:, k], k].mean() for k in range(len(keys))]))
    assert float(metrics1["sentence_loss"]) == pytest.approx(want, rel=1e-4)
    assert loss1 == pytest.approx(float(metrics1["report_loss"]) + 0.5 * want, rel=1e-4)


def test_sentence_views_refuse_gradient_accumulation():
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train_state.check_loss_settings(CONFIG, "softmax", 2, sentence_loss_weight=1.0)
