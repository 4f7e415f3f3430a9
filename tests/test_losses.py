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
