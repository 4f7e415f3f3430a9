"""VocabFine: end-to-end fine-tuning of CT-CLIP on the per-abnormality prompt pairs.

For volume b and abnormality c the model scores the pair
("{name} is present.", "{name} is not present.") exactly as zero-shot detection does,
p_bc = softmax(s <i_b, t+_c>, s <i_b, t-_c>)_0, and the loss pulls p_bc to the label:

    loss = mean over (b, c) with a known label of (p_bc - y_bc)^2.

Why this is the official loss (scripts/ct_vocabfine_train.py): for each class it
orders the pair so that the *true* statement comes first, takes the softmax over the
pair and the MSE against [1, 0]; with q the probability of the true statement that is
((q - 1)^2 + ((1 - q) - 0)^2) / 2 = (1 - q)^2 = (p - y)^2.  It averages over groups of
6 classes and calls backward once per group (3 groups, gradients summed), so its
gradient is 3x the gradient of this mean over 18 classes; with Adam the factor only
interacts with eps.  It runs one volume per step and re-encodes the volume for every
class; we encode each volume and the 36 prompts once per step (the same gradient;
dropout masks differ).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ct_rate_jax import sharding
from ct_rate_jax.finetune.classfine import official_adamw
from ct_rate_jax.training.train_state import _all_finite


def pair_probabilities(image_latents_bl, positive_cl, negative_cl, logit_scale):
    """float[B, C] P(present) = softmax over the pair, first entry (= sigmoid of the
    scaled difference)."""
    difference = image_latents_bl @ (positive_cl - negative_cl).T
    return jax.nn.sigmoid(logit_scale * difference)


def vocabfine_loss(image_latents_bl, positive_cl, negative_cl, logit_scale, labels_bc):
    """(loss, metrics): mean squared error of P(present) against the known labels."""
    p = pair_probabilities(image_latents_bl, positive_cl, negative_cl, logit_scale)
    known = (labels_bc == 0) | (labels_bc == 1)
    error = jnp.where(known, (p - labels_bc) ** 2, 0.0)
    count = jnp.maximum(known.sum(), 1)
    loss = error.sum() / count
    accuracy = jnp.where(known, (p >= 0.5) == (labels_bc == 1), False).sum() / count
    return loss, {"pair_accuracy": accuracy, "known_labels": known.sum()}


def make_optimizer(learning_rate: float = 1e-5, weight_decay: float = 0.1,
                   warmup_steps: int = 10000, total_steps: int = 1,
                   grad_clip_norm: float | None = None) -> optax.GradientTransformation:
    """The official VocabFine optimizer: AdamW on every parameter under `cosine_lr`,
    no clipping (`grad_clip_norm` adds it)."""
    return official_adamw(learning_rate, weight_decay, warmup_steps, total_steps,
                          grad_clip_norm)


class VocabFineTrainer:
    """The model and its optimizer replicated over this process's devices; `step`
    takes a host batch (volume float[B, D, H, W], labels float[B, C]) split over them.

    The prompt token ids (int[2C, S], positives then negatives) are fixed for the run.
    A step whose loss, gradient norm or new parameters are not finite leaves the state
    unchanged and reports `nonfinite` = 1.
    """

    def __init__(self, model, tx: optax.GradientTransformation, prompt_ids: np.ndarray,
                 prompt_mask: np.ndarray, mesh):
        self.mesh = mesh
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))
        self.graphdef = graphdef
        replicated = sharding.replicated(mesh)
        self.state = jax.device_put(state, replicated)
        self._prompts = jax.device_put((np.asarray(prompt_ids), np.asarray(prompt_mask)),
                                       replicated)
        classes = len(prompt_ids) // 2

        def loss_fn(model, volume, labels, ids, mask):
            image = model.embed_image(volume, train=True)
            text = model.embed_text(ids, mask, train=True)
            return vocabfine_loss(image, text[:classes], text[classes:],
                                  model.logit_scale(), labels)

        def step(state, volume, labels, prompts):
            previous = jax.tree.leaves(state)
            model, optimizer = nnx.merge(graphdef, state)
            (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
                model, volume, labels, *prompts)
            optimizer.update(model, grads)
            grad_norm = optax.global_norm(grads)
            finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                      & _all_finite(nnx.state(model, nnx.Param)))
            leaves, treedef = jax.tree.flatten(nnx.state((model, optimizer)))
            kept = jax.lax.cond(finite, lambda: leaves, lambda: previous)
            return jax.tree.unflatten(treedef, kept), dict(
                metrics, loss=loss, grad_norm=grad_norm, nonfinite=(~finite).astype(jnp.int32))

        batch = sharding.batch_sharding(mesh)
        self._step = jax.jit(step, in_shardings=(replicated, batch, batch, replicated),
                             out_shardings=(replicated, replicated), donate_argnums=0)

    def step(self, volume_bdhw: np.ndarray, labels_bc: np.ndarray) -> dict:
        arrays = sharding.host_batch_to_global({"volume": volume_bdhw, "labels": labels_bc},
                                               self.mesh)
        self.state, metrics = self._step(self.state, arrays["volume"], arrays["labels"],
                                         self._prompts)
        return metrics

    @property
    def model(self):
        model, _ = nnx.merge(self.graphdef, self.state)
        return model
