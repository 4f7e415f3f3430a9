"""The contrastive loss against a plain numpy implementation."""

import jax.numpy as jnp
import numpy as np

from ct_rate_jax import losses


def numpy_clip_loss(image, text, scale):
    """Official CT-CLIP formula: mean(-log(exp(pos) / sum exp)) in both directions."""
    logits = scale * image @ text.T  # [image, text]

    def ce(rows):
        rows = rows - rows.max(axis=1, keepdims=True)
        log_softmax = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return -np.diag(log_softmax).mean()

    return 0.5 * (ce(logits) + ce(logits.T))


def unit_rows(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_clip_softmax_loss_matches_numpy():
    rng = np.random.default_rng(0)
    image, text = unit_rows(rng, (12, 16)), unit_rows(rng, (12, 16))
    for scale in (1.0, np.e, 30.0):
        loss, _ = losses.clip_softmax_loss(jnp.asarray(image), jnp.asarray(text),
                                           jnp.asarray(scale))
        np.testing.assert_allclose(float(loss), numpy_clip_loss(image, text, scale), rtol=1e-5)


def test_perfectly_aligned_pairs_have_low_loss_and_full_accuracy():
    rng = np.random.default_rng(1)
    latents = jnp.asarray(unit_rows(rng, (8, 64)))
    loss, metrics = losses.clip_softmax_loss(latents, latents, jnp.asarray(100.0))
    assert float(loss) < 1e-3
    assert float(metrics["image_to_text_accuracy"]) == 1.0
    assert float(metrics["text_to_image_accuracy"]) == 1.0


def test_shuffled_pairs_have_chance_level_loss_at_small_scale():
    rng = np.random.default_rng(2)
    image, text = unit_rows(rng, (16, 8)), unit_rows(rng, (16, 8))
    loss, _ = losses.clip_softmax_loss(jnp.asarray(image), jnp.asarray(text), jnp.asarray(1e-4))
    np.testing.assert_allclose(float(loss), np.log(16), rtol=1e-3)


# --- SigLIP sigmoid loss and the chunked (shard_map, ring) losses ------------------------

import re  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from ct_rate_jax import sharding  # noqa: E402


def numpy_sigmoid_loss(image, text, scale, bias):
    """SigLIP: -(1/B) sum_ij log sigmoid(z_ij (s <i, t> + b)), z = +1 on the diagonal."""
    logits = scale * image @ text.T + bias
    labels = 2 * np.eye(len(image)) - 1
    return np.sum(np.logaddexp(0.0, -labels * logits)) / len(image)


def test_sigmoid_loss_matches_numpy():
    rng = np.random.default_rng(3)
    image, text = unit_rows(rng, (12, 16)), unit_rows(rng, (12, 16))
    for scale, bias in ((1.0, 0.0), (10.0, -10.0), (30.0, 2.5)):
        loss, _ = losses.sigmoid_loss(jnp.asarray(image), jnp.asarray(text),
                                      jnp.asarray(scale), jnp.asarray(bias))
        np.testing.assert_allclose(float(loss), numpy_sigmoid_loss(image, text, scale, bias),
                                   rtol=1e-5)


def correlated_pairs(rng, batch, dim=16):
    """Unit image/text latents whose pairs are similar, so accuracies are non-trivial."""
    image = unit_rows(rng, (batch, dim))
    text = image + 1.5 * rng.normal(size=image.shape) / np.sqrt(dim)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32)


def loss_and_grads(loss_fn, *args):
    """(loss, metrics), grads w.r.t. every argument."""
    return jax.jit(jax.value_and_grad(loss_fn, argnums=tuple(range(len(args))),
                                      has_aux=True))(*args)


def assert_same_loss_and_grads(reference, chunked):
    (ref_loss, ref_metrics), ref_grads = reference
    (loss, metrics), grads = chunked
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for key in ref_metrics:
        np.testing.assert_allclose(float(metrics[key]), float(ref_metrics[key]))
    for grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1)])
def test_chunked_losses_equal_unchunked_in_value_and_gradients(mesh_shape):
    mesh = sharding.make_mesh(*mesh_shape)
    image, text = correlated_pairs(np.random.default_rng(4), batch=32)
    image, text = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in (image, text))
    scale, bias = jnp.asarray(10.0), jnp.asarray(-3.0)

    assert_same_loss_and_grads(
        loss_and_grads(losses.clip_softmax_loss, image, text, scale),
        loss_and_grads(lambda i, t, s: losses.chunked_softmax_loss(i, t, s, mesh),
                       image, text, scale))
    reference = loss_and_grads(losses.sigmoid_loss, image, text, scale, bias)
    for accuracy in reference[0][1].values():
        assert 0.0 < float(accuracy) < 1.0  # the accuracy comparison is a real check
    assert_same_loss_and_grads(
        reference,
        loss_and_grads(lambda i, t, s, b: losses.chunked_sigmoid_loss(i, t, s, b, mesh),
                       image, text, scale, bias))


def test_chunked_losses_never_hold_the_global_logit_matrix():
    """Global batch 64 over 8 devices: the compiled per-device programs (forward and
    backward) hold [8, 8] logit blocks and no array with a global-batch (64) dimension.

    The unchunked loss on the same sharded batch is partitioned by XLA into [8, 64] row
    strips (each device gathers all texts) and, on the replicated batch, the whole
    [64, 64]; both are caught by the same search.
    """
    mesh = sharding.make_mesh(8, 1, 1)
    image, text = correlated_pairs(np.random.default_rng(5), batch=64)
    image, text = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in (image, text))
    scale, bias = jnp.asarray(10.0), jnp.asarray(-10.0)

    def compiled_text(loss_fn, *args):
        grad_fn = jax.value_and_grad(loss_fn, argnums=tuple(range(len(args))), has_aux=True)
        return jax.jit(grad_fn).lower(*args).compile().as_text()

    global_batch_shape = re.compile(r"f32\[(64,\d+|\d+,64)\]")
    assert global_batch_shape.search(compiled_text(losses.clip_softmax_loss, image, text, scale))
    replicated = compiled_text(losses.clip_softmax_loss, *(np.asarray(x) for x in (image, text)),
                               scale)
    assert "f32[64,64]" in replicated
    for hlo in (
        compiled_text(lambda i, t, s: losses.chunked_softmax_loss(i, t, s, mesh),
                      image, text, scale),
        compiled_text(lambda i, t, s, b: losses.chunked_sigmoid_loss(i, t, s, b, mesh),
                      image, text, scale, bias),
    ):
        assert "f32[8,8]" in hlo
        assert global_batch_shape.search(hlo) is None, global_batch_shape.search(hlo)


def test_chunked_loss_rejects_a_batch_the_mesh_does_not_divide():
    mesh = sharding.make_mesh(8, 1, 1)
    latents = jnp.zeros((12, 4))
    with pytest.raises(ValueError, match="divide"):
        losses.chunked_softmax_loss(latents, latents, jnp.asarray(1.0), mesh)


# --- Multi-positive InfoNCE (single-sentence text views) ----------------------------------


def numpy_multi_positive_loss(image, text, positives, scale):
    """Per image: -mean of log softmax over texts at its positives; per text likewise over
    images; the two means averaged."""
    logits = scale * image @ text.T

    def log_softmax(rows):
        rows = rows - rows.max(axis=1, keepdims=True)
        return rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))

    rows = [-log_softmax(logits)[i, positives[i]].mean() for i in range(len(image))]
    cols = [-log_softmax(logits.T)[k, positives[:, k]].mean() for k in range(len(text))]
    return 0.5 * (np.mean(rows) + np.mean(cols))


def test_multi_positive_loss_matches_numpy():
    rng = np.random.default_rng(7)
    image, text = unit_rows(rng, (6, 16)), unit_rows(rng, (18, 16))
    positives = rng.random((6, 18)) < 0.3
    positives[np.arange(18) // 3, np.arange(18)] = True  # each text's own image
    for scale in (1.0, 14.3, 50.0):
        loss, metrics = losses.multi_positive_softmax_loss(
            jnp.asarray(image), jnp.asarray(text), jnp.asarray(positives), jnp.asarray(scale))
        np.testing.assert_allclose(float(loss),
                                   numpy_multi_positive_loss(image, text, positives, scale),
                                   rtol=1e-5)
        logits = image @ text.T
        np.testing.assert_allclose(
            float(metrics["image_to_text_accuracy"]),
            positives[np.arange(6), logits.argmax(1)].mean())


def test_multi_positive_loss_with_one_positive_each_is_infonce():
    rng = np.random.default_rng(8)
    image, text = unit_rows(rng, (10, 8)), unit_rows(rng, (10, 8))
    got, _ = losses.multi_positive_softmax_loss(jnp.asarray(image), jnp.asarray(text),
                                                jnp.eye(10, dtype=bool), jnp.asarray(20.0))
    want, _ = losses.clip_softmax_loss(jnp.asarray(image), jnp.asarray(text), jnp.asarray(20.0))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def numpy_supervised_contrastive_loss(latents, keys, scale):
    """Per anchor with another latent of its key: -mean log softmax (self left out) over
    those positives; averaged over such anchors."""
    logits = scale * latents @ latents.T
    per_anchor = []
    for k in range(len(latents)):
        others = [j for j in range(len(latents)) if j != k]
        row = logits[k, others]
        log_p = row - row.max() - np.log(np.exp(row - row.max()).sum())
        positives = [i for i, j in enumerate(others) if keys[j] == keys[k]]
        if positives:
            per_anchor.append(-log_p[positives].mean())
    return np.mean(per_anchor)


def test_supervised_contrastive_loss_matches_numpy():
    rng = np.random.default_rng(9)
    latents = unit_rows(rng, (14, 8))
    keys = rng.integers(0, 6, 14)
    keys[-1] = 99  # an anchor without positives is left out
    for scale in (1.0, 14.3):
        loss, metrics = losses.supervised_contrastive_loss(jnp.asarray(latents),
                                                           jnp.asarray(keys), jnp.asarray(scale))
        np.testing.assert_allclose(float(loss),
                                   numpy_supervised_contrastive_loss(latents, keys, scale),
                                   rtol=1e-5)
    with_positive = np.mean([np.sum(keys == k) > 1 for k in keys])
    assert float(metrics["anchors"]) == pytest.approx(with_positive)
