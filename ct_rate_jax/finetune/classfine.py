"""ClassFine (the paper's linear probe, released as CT-LiPro) on frozen image latents.

    head = train_head(train_latents, train_labels, ClassFineSettings(), val=...)
    probabilities = head_probabilities(head, latents)

The model is the official `ImageLatentsClassifier` (scripts/ct_lipro_train.py):
image latent (unit norm) -> ReLU -> dropout(0.3) -> Linear(L, C), trained with
`BCEWithLogitsLoss(pos_weight)`, AdamW (lr 1e-5, weight decay 0.1 on every weight),
global-norm clipping at 1.0, linear warmup then cosine decay, batch 8, 10 epochs.
The encoder is frozen, so the latents are computed once per volume (the caller does
that) and only the head trains here.  The head is a dict in torch layout,
{"classifier.weight": float32[C, L], "classifier.bias": float32[C]}, the `extras` of
a LiPro model directory (`ct_rate_jax.checkpoint_io`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ct_rate_jax.evaluation.zero_shot import auroc_per_class

WEIGHT, BIAS = "classifier.weight", "classifier.bias"


@dataclasses.dataclass(frozen=True)
class ClassFineSettings:
    """Training settings; the defaults are the official script's."""

    learning_rate: float = 1e-5
    weight_decay: float = 0.1
    epochs: int = 10
    batch_size: int = 8
    warmup_steps: int = 10000
    dropout: float = 0.3
    grad_clip_norm: float | None = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise ValueError("epochs and batch size must be >= 1 and warmup steps >= 0")
        if not 0.0 <= self.dropout < 1.0 or self.learning_rate <= 0:
            raise ValueError("dropout must be in [0, 1) and the learning rate positive")


def positive_weights(labels: np.ndarray) -> np.ndarray:
    """float32[C] BCE positive weights: negatives / positives per class, over the known
    (0/1) labels.  The official script hard-codes these ratios for CT-RATE's training
    labels; we compute them from the labels it trains on.

    Raises:
      ValueError: a class without positives or without negatives (the ratio is undefined).
    """
    labels = np.asarray(labels)
    positives = (labels == 1).sum(0)
    negatives = (labels == 0).sum(0)
    bad = np.flatnonzero((positives == 0) | (negatives == 0))
    if bad.size:
        raise ValueError(f"class column(s) {bad.tolist()} have no positive or no negative "
                         "training label: the BCE positive weight (negatives / positives) is "
                         "undefined")
    return (negatives / positives).astype(np.float32)


def init_head(latent_dim: int, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """torch.nn.Linear's initialisation: weight and bias ~ U(-1/sqrt(L), 1/sqrt(L))."""
    bound = 1.0 / math.sqrt(latent_dim)
    rng = np.random.default_rng(seed)
    return {WEIGHT: rng.uniform(-bound, bound, (num_classes, latent_dim)).astype(np.float32),
            BIAS: rng.uniform(-bound, bound, (num_classes,)).astype(np.float32)}


def head_logits(head, latents_bl, *, dropout: float = 0.0, key=None):
    """float[B, C] logits = dropout(relu(latents)) @ W.T + b (dropout only with a key)."""
    hidden = jnp.maximum(latents_bl, 0.0)
    if key is not None and dropout > 0:
        keep = jax.random.bernoulli(key, 1.0 - dropout, hidden.shape)
        hidden = jnp.where(keep, hidden / (1.0 - dropout), 0.0)
    return hidden @ head[WEIGHT].T + head[BIAS]


def head_probabilities(head: dict[str, np.ndarray], latents_bl: np.ndarray) -> np.ndarray:
    """float64[N, C] sigmoid of the logits, in numpy (evaluation; no dropout)."""
    hidden = np.maximum(np.asarray(latents_bl, np.float64), 0.0)
    logits = hidden @ np.asarray(head[WEIGHT], np.float64).T + np.asarray(head[BIAS],
                                                                           np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * logits))


def weighted_bce(logits_bc, labels_bc, pos_weight_c):
    """Mean over the known (0/1) labels of
    -[w_c y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]  (torch's BCEWithLogitsLoss
    with pos_weight, mean reduction, when every label is known)."""
    known = (labels_bc == 0) | (labels_bc == 1)
    y = jnp.where(known, labels_bc, 0.0)
    per_entry = -(pos_weight_c * y * jax.nn.log_sigmoid(logits_bc)
                  + (1.0 - y) * jax.nn.log_sigmoid(-logits_bc))
    return jnp.sum(jnp.where(known, per_entry, 0.0)) / jnp.maximum(known.sum(), 1)


def official_schedule(learning_rate: float, warmup_steps: int, total_steps: int):
    """The official `cosine_lr`: lr (step + 1) / warmup during warmup, then
    0.5 (1 + cos(pi (step - warmup) / (total - warmup))) lr."""
    def schedule(step):
        warm = learning_rate * (step + 1) / max(warmup_steps, 1)
        span = max(total_steps - warmup_steps, 1)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * (step - warmup_steps) / span)) * learning_rate
        return jnp.where(step < warmup_steps, warm, cosine)
    return schedule


def official_adamw(learning_rate: float, weight_decay: float, warmup_steps: int,
                   total_steps: int, grad_clip_norm: float | None):
    """torch AdamW (betas 0.9/0.999, eps 1e-8, decoupled decay on every parameter)
    under the official schedule, after global-norm clipping."""
    adamw = optax.adamw(official_schedule(learning_rate, warmup_steps, total_steps),
                        b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw) \
        if grad_clip_norm else adamw


@dataclasses.dataclass
class ClassFineResult:
    head: dict[str, np.ndarray]
    positive_weights: np.ndarray  # float32[C]
    history: list[dict]  # per epoch: train loss (mean over steps), val loss / AUROC
    steps: int


def train_head(latents: np.ndarray, labels: np.ndarray,
               settings: ClassFineSettings = ClassFineSettings(), *,
               val: tuple[np.ndarray, np.ndarray] | None = None,
               log: Callable[[str], None] = lambda message: None) -> ClassFineResult:
    """Trains the head on precomputed latents float[N, L] and labels float[N, C].

    Every epoch visits the rows in a fresh random order in batches of
    `settings.batch_size` (the last one may be smaller, as torch's DataLoader).
    `val` = (latents, labels) adds the validation loss and mean AUROC to each epoch's
    record; it selects nothing (the official script keeps the last epoch).
    """
    settings.check()
    latents = np.asarray(latents, np.float32)
    labels = np.asarray(labels, np.float32)
    if latents.ndim != 2 or labels.ndim != 2 or len(latents) != len(labels):
        raise ValueError(f"latents [N, L] and labels [N, C] must have the same N, got "
                         f"{latents.shape} and {labels.shape}")
    weights = positive_weights(labels)
    steps_per_epoch = -(-len(latents) // settings.batch_size)
    total = steps_per_epoch * settings.epochs
    tx = official_adamw(settings.learning_rate, settings.weight_decay,
                        settings.warmup_steps, total, settings.grad_clip_norm)
    head = jax.tree.map(jnp.asarray, init_head(latents.shape[1], labels.shape[1],
                                               settings.seed))
    opt_state = tx.init(head)
    pos_weight = jnp.asarray(weights)

    @jax.jit
    def step(head, opt_state, x, y, key):
        def loss_fn(h):
            return weighted_bce(head_logits(h, x, dropout=settings.dropout, key=key), y,
                                pos_weight)
        loss, grads = jax.value_and_grad(loss_fn)(head)
        updates, opt_state = tx.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state, loss

    @jax.jit
    def evaluate_loss(head, x, y):
        return weighted_bce(head_logits(head, x), y, pos_weight)

    rng = np.random.default_rng(settings.seed)
    key = jax.random.key(settings.seed)
    history = []
    for epoch in range(settings.epochs):
        order = rng.permutation(len(latents))
        losses = []
        for start in range(0, len(order), settings.batch_size):
            rows = order[start:start + settings.batch_size]
            key, sub = jax.random.split(key)
            head, opt_state, loss = step(head, opt_state, latents[rows], labels[rows], sub)
            losses.append(loss)
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(jax.device_get(losses)))}
        if val is not None:
            val_latents, val_labels = (np.asarray(a, np.float32) for a in val)
            record["val_loss"] = float(evaluate_loss(head, val_latents, val_labels))
            auroc = auroc_per_class(val_labels, head_probabilities(
                jax.device_get(head), val_latents))
            record["val_mean_auroc"] = (float(np.nanmean(auroc))
                                        if not np.isnan(auroc).all() else None)
        history.append(record)
        log(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in record.items()))
    final = {k: np.asarray(v, np.float32) for k, v in jax.device_get(head).items()}
    return ClassFineResult(final, weights, history, total)
