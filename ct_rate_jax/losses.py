"""Contrastive losses over the global batch.

Under `jax.jit` with the batch sharded over the mesh, the [B, B] logit matrix below
is computed over the *global* batch: every volume is contrasted with every report on
every device (XLA gathers the latents), unlike the official PyTorch trainer, whose
negatives come from one GPU's batch only.

`clip_softmax_loss` (InfoNCE), `multi_positive_softmax_loss` (InfoNCE with several
positives per row and column, for single-sentence text views) and `sigmoid_loss`
(SigLIP) build that matrix whole (`supervised_contrastive_loss` is the text-text
companion of the sentence views);
`chunked_softmax_loss` and `chunked_sigmoid_loss` give the same values and gradients
with per-device code (`jax.shard_map`) that holds one [B/n, B/n] block at a time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from ct_rate_jax import sharding


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



def multi_positive_softmax_loss(image_latents_bd: jax.Array, text_latents_kd: jax.Array,
                                positives_bk: jax.Array, logit_scale: jax.Array
                                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE where a pair is positive wherever `positives_bk` says so.

    For single-sentence text views: text k is one sentence of one report, and image i
    and text k are a positive pair when image i's report makes the statement of
    sentence k (so "No pleural effusion was detected." is a positive for every volume
    of the batch whose report says so, not only for the volume it was drawn from, which
    the one-positive softmax would punish).  With logits l = s * image @ text.T:

      image->text, per image i:  -mean over k in P(i) of log softmax_k(l[i, :])
      text->image, per text k:   -mean over i in P(k) of log softmax_i(l[:, k])
      loss = (mean_i image->text + mean_k text->image) / 2

    the "outside" form of the supervised contrastive loss (Khosla et al. 2020), which
    pulls a text towards the mean of all its positive images.  With B == K and
    `positives_bk` the identity it is `clip_softmax_loss`.  Like the other unchunked
    losses it is computed over the global batch under jit.

    Args:
      image_latents_bd: float[B, D] unit-norm image latents.
      text_latents_kd: float[K, D] unit-norm text latents.
      positives_bk: bool or 0/1 [B, K]; every row and every column needs at least one
        positive (a text view is always positive for the image it was drawn from).
      logit_scale: scalar.

    Returns:
      loss: float32 scalar.
      metrics: image_to_text / text_to_image accuracy, the share of rows (columns)
        whose highest logit is a positive.
    """
    logits = clip_logits(image_latents_bd, text_latents_kd, logit_scale)
    positives = positives_bk.astype(jnp.float32)
    log_p_image_to_text = jax.nn.log_softmax(logits, axis=1)
    log_p_text_to_image = jax.nn.log_softmax(logits, axis=0)
    image_to_text = -jnp.sum(positives * log_p_image_to_text, axis=1) / jnp.sum(positives, 1)
    text_to_image = -jnp.sum(positives * log_p_text_to_image, axis=0) / jnp.sum(positives, 0)
    loss = 0.5 * (image_to_text.mean() + text_to_image.mean())
    hit = lambda axis: jnp.take_along_axis(  # noqa: E731
        positives, jnp.expand_dims(jnp.argmax(logits, axis=axis), axis), axis=axis)
    metrics = {"image_to_text_accuracy": jnp.mean(hit(1)),
               "text_to_image_accuracy": jnp.mean(hit(0))}
    return loss, metrics



def supervised_contrastive_loss(latents_kd: jax.Array, keys_k: jax.Array,
                                logit_scale: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SupCon (Khosla et al. 2020) among K latents of one modality, positives by key.

    For the single-sentence text views: views with the same statement key
    ("No pleural effusion was detected." and "Pleural effusion is not present.") are
    positives, every other view of the batch a negative, so that the text tower learns
    that the negated and the positive statement of a finding are different texts.  With
    l = s * latents @ latents.T and the diagonal left out of every softmax:

      per anchor k with at least one positive:  -mean over p in P(k) of log softmax_j(l[k, :])[p]
      loss = mean over those anchors (0 when no anchor has a positive)

    Args:
      latents_kd: float[K, D] unit-norm latents.
      keys_k: int[K]; equal keys mark positives.
      logit_scale: scalar (the model's, shared with the image-text loss).

    Returns:
      loss: float32 scalar.
      metrics: anchors: the share of views that have a positive.
    """
    count = latents_kd.shape[0]
    self_pair = jnp.eye(count, dtype=bool)
    logits = logit_scale * jnp.einsum("kd,jd->kj", latents_kd.astype(jnp.float32),
                                      latents_kd.astype(jnp.float32))
    log_p = jax.nn.log_softmax(jnp.where(self_pair, -jnp.inf, logits), axis=1)
    positives = ((keys_k[:, None] == keys_k[None, :]) & ~self_pair).astype(jnp.float32)
    per_anchor = jnp.sum(positives * jnp.where(self_pair, 0.0, log_p), axis=1)
    num_positives = jnp.sum(positives, axis=1)
    has_positive = num_positives > 0
    loss = -jnp.sum(jnp.where(has_positive, per_anchor / jnp.maximum(num_positives, 1), 0.0)
                    ) / jnp.maximum(jnp.sum(has_positive), 1)
    return loss, {"anchors": jnp.mean(has_positive)}


def sigmoid_loss(image_latents_bd: jax.Array, text_latents_bd: jax.Array,
                 logit_scale: jax.Array, logit_bias: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP pairwise sigmoid loss (Zhai et al. 2023) over the global batch.

    logits_ij = s * <image_i, text_j> + b and z_ij = +1 for i == j, -1 otherwise;
    loss = -(1 / B) * sum_ij log sigmoid(z_ij * logits_ij), i.e. the sum over all
    B texts averaged over the B images (SigLIP's normalisation by batch size, not
    by the B^2 pairs).

    `logit_bias` is a learned scalar, like `logit_scale`.  A model carrying it
    would hold an `nnx.Param` scalar next to its logit scale, initialised as in
    SigLIP to b = -10 with s = 10 (log-scale log 10), so that the B - 1 negatives
    of each row do not dominate the first steps.

    Returns:
      loss: float32 scalar.
      metrics: image->text and text->image top-1 accuracy within the batch (the
        bias shifts all logits alike, so these equal clip_softmax_loss's).
    """
    logits_it = clip_logits(image_latents_bd, text_latents_bd, logit_scale) + logit_bias
    batch = logits_it.shape[0]
    labels_it = 2.0 * jnp.eye(batch, dtype=jnp.float32) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(labels_it * logits_it)) / batch
    targets = jnp.arange(batch)
    metrics = {
        "image_to_text_accuracy": jnp.mean(jnp.argmax(logits_it, axis=1) == targets),
        "text_to_image_accuracy": jnp.mean(jnp.argmax(logits_it, axis=0) == targets),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------
# Chunked losses: per-device code under `jax.shard_map`.
#
# Each of the n = |data| x |fsdp| devices holds b = B / n images and their b texts.  The
# text chunks travel around a ring (device i sends to i + 1) with `ppermute`, n - 1 hops,
# so that at hop k device i scores its images against the texts of device i - k: one
# [b, b] block at a time, never the global [B, B] matrix.  Hop 0 (the device's own
# texts) is the only block that holds positive pairs, on its diagonal.
#
# Per-image ("row") statistics stay on the device that owns the images.  Per-text
# ("column") statistics travel with their text chunk and are updated by every device it
# visits; after n - 1 hops the chunk of device i + 1 sits on device i with complete
# column statistics, and one last hop sends those statistics (2b floats, not the texts)
# home.  This avoids a second ring of the image latents for the text->image direction.
# ---------------------------------------------------------------------------------------


def _batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over (the project's batch sharding)."""
    axes = sharding.batch_sharding(mesh).spec[0]
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _ring_over_text_chunks(text_bd, step_fn, axes: tuple[str, ...], n: int):
    """Runs `step_fn(text_chunk, row, col, positive) -> (row, col)` over all n text chunks.

    `row` and `col` are pytrees of per-device statistics, created by the first call
    (row=None, col=None, positive=True: the device's own texts); `col` rides along with
    its text chunk and is returned to the device that owns those texts.
    """
    row, col = step_fn(text_bd, None, None, True)
    ring = [(i, (i + 1) % n) for i in range(n)]

    def hop(_, carry):
        text, row, col = carry
        text, col = jax.lax.ppermute((text, col), axes, ring)
        row, col = step_fn(text, row, col, False)
        return text, row, col

    # A loop rather than n unrolled steps: the program size does not grow with the mesh.
    _, row, col = jax.lax.fori_loop(1, n, hop, (text_bd, row, col))
    col = jax.lax.ppermute(col, axes, ring)  # device i holds the texts of i + 1: send home
    return row, col


def _update_max(running, logits, axis):
    block_max = jax.lax.stop_gradient(jnp.max(logits, axis=axis))
    return block_max if running is None else jnp.maximum(running, block_max)


def _update_logsumexp(running, logits, axis):
    """Online log-sum-exp: (max, sum exp(x - max)) merged with one more block.

    The max is a stop-gradient shift; the gradient flows through the sums alone, and
    d(max + log sum)/dx is then exactly the softmax.
    """
    if running is None:
        new_max = _update_max(None, logits, axis)
        total = jnp.zeros_like(new_max)
    else:
        old_max, total = running
        new_max = _update_max(old_max, logits, axis)
        total = total * jnp.exp(old_max - new_max)
    total = total + jnp.sum(jnp.exp(logits - jnp.expand_dims(new_max, axis)), axis=axis)
    return new_max, total


def _shard_batch(loss_fn, mesh, axes, num_scalars):
    spec = jax.sharding.PartitionSpec(axes)
    scalar = jax.sharding.PartitionSpec()
    return jax.shard_map(loss_fn, mesh=mesh, in_specs=(spec, spec) + (scalar,) * num_scalars,
                         out_specs=scalar)


def _check_batch(image_latents_bd, text_latents_bd, n):
    batch = image_latents_bd.shape[0]
    if text_latents_bd.shape[0] != batch or batch % n:
        raise ValueError(f"chunked loss: {batch} images and {text_latents_bd.shape[0]} texts; "
                         f"both must equal and divide over the {n} batch shards")
    return batch


def chunked_sigmoid_loss(image_latents_bd: jax.Array, text_latents_bd: jax.Array,
                         logit_scale: jax.Array, logit_bias: jax.Array,
                         mesh: jax.sharding.Mesh) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`sigmoid_loss` computed block by block with a ring of text chunks (see above).

    Same value, gradients and metrics as `sigmoid_loss` on the same global batch; each
    device only ever holds [B / n, B / n] logits, n = the batch shards of `mesh`.
    """
    axes = _batch_axes(mesh)
    n = math.prod(mesh.shape[a] for a in axes)
    batch = _check_batch(image_latents_bd, text_latents_bd, n)

    def per_device(image_bd, text_bd, scale, bias):
        def step(text_chunk, row, col, positive):
            logits = clip_logits(image_bd, text_chunk, scale) + bias
            labels = (2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0 if positive
                      else -1.0)
            block_loss_b = -jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=1)
            if row is None:  # the own texts: the positives are this block's diagonal
                return ({"loss": block_loss_b, "max": _update_max(None, logits, 1),
                         "positive": jnp.diagonal(logits)},
                        {"max": _update_max(None, logits, 0)})
            return ({"loss": row["loss"] + block_loss_b,
                     "max": _update_max(row["max"], logits, 1), "positive": row["positive"]},
                    {"max": _update_max(col["max"], logits, 0)})

        row, col = _ring_over_text_chunks(text_bd, step, axes, n)
        total = lambda x: jax.lax.psum(jnp.sum(x), axes) / batch  # noqa: E731
        return total(row["loss"]), {
            "image_to_text_accuracy": total(row["positive"] >= row["max"]),
            "text_to_image_accuracy": total(row["positive"] >= col["max"]),
        }

    return _shard_batch(per_device, mesh, axes, 2)(
        image_latents_bd, text_latents_bd, jnp.asarray(logit_scale, jnp.float32),
        jnp.asarray(logit_bias, jnp.float32))


def chunked_softmax_loss(image_latents_bd: jax.Array, text_latents_bd: jax.Array,
                         logit_scale: jax.Array, mesh: jax.sharding.Mesh
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`clip_softmax_loss` computed block by block with a ring of text chunks.

    Image->text: each device keeps a running (max, sum exp) per image row while the
    text chunks pass.  Text->image: each text chunk carries its running column
    (max, sum exp) around the ring and takes them home at the end (see above).  The
    cross-entropies are then log-sum-exp minus the positive logit, the diagonal of
    each device's own block.  Same value, gradients and metrics as
    `clip_softmax_loss` on the same global batch (up to ties in the accuracies).
    """
    axes = _batch_axes(mesh)
    n = math.prod(mesh.shape[a] for a in axes)
    batch = _check_batch(image_latents_bd, text_latents_bd, n)

    def per_device(image_bd, text_bd, scale):
        def step(text_chunk, row, col, positive):
            logits = clip_logits(image_bd, text_chunk, scale)
            # The own texts come first: the positives are that block's diagonal.
            positive_b = jnp.diagonal(logits) if positive else row[2]
            return ((*_update_logsumexp(None if row is None else row[:2], logits, 1), positive_b),
                    _update_logsumexp(col, logits, 0))

        (row_max, row_sum, positive_logits_b), (col_max, col_sum) = _ring_over_text_chunks(
            text_bd, step, axes, n)
        image_to_text_b = row_max + jnp.log(row_sum) - positive_logits_b
        text_to_image_b = col_max + jnp.log(col_sum) - positive_logits_b
        total = lambda x: jax.lax.psum(jnp.sum(x), axes) / batch  # noqa: E731
        return 0.5 * (total(image_to_text_b) + total(text_to_image_b)), {
            "image_to_text_accuracy": total(positive_logits_b >= row_max),
            "text_to_image_accuracy": total(positive_logits_b >= col_max),
        }

    return _shard_batch(per_device, mesh, axes, 1)(
        image_latents_bd, text_latents_bd, jnp.asarray(logit_scale, jnp.float32))
