"""Contrastive losses over the global batch.

Under `jax.jit` with the batch sharded over the mesh, the [B, B] logit matrix below
is computed over the *global* batch: every volume is contrasted with every report on
every device (XLA gathers the latents), unlike the official PyTorch trainer, whose
negatives come from one GPU's batch only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def clip_logits(image_latents_bd: jax.Array, text_latents_bd: jax.Array,
                logit_scale: jax.Array) -> jax.Array:
    """float32[B_image, B_text] = logit_scale * image_latents @ text_latents.T."""
    return logit_scale * jnp.einsum("id,td->it", image_latents_bd.astype(jnp.float32),
                                    text_latents_bd.astype(jnp.float32))


def clip_softmax_loss(image_latents_bd: jax.Array, text_latents_bd: jax.Array,
                      logit_scale: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropies.

    The i-th image and i-th text are the positive pair; all other pairs of the batch
    are negatives.  Equals the official CT-CLIP loss
    (text_to_image_loss + image_to_text_loss) / 2 for unit-norm latents.

    Returns:
      loss: float32 scalar.
      metrics: image->text and text->image top-1 accuracy within the batch.
    """
    logits_it = clip_logits(image_latents_bd, text_latents_bd, logit_scale)
    targets = jnp.arange(logits_it.shape[0])
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits_it, targets)
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits_it.T, targets)
    loss = 0.5 * (image_to_text.mean() + text_to_image.mean())
    metrics = {
        "image_to_text_accuracy": jnp.mean(jnp.argmax(logits_it, axis=1) == targets),
        "text_to_image_accuracy": jnp.mean(jnp.argmax(logits_it, axis=0) == targets),
    }
    return loss, metrics
