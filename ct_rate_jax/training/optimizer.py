"""AdamW with linear warmup and cosine decay (the optimizer gin binds)."""

from __future__ import annotations

import jax
import optax


def warmup_cosine_schedule(learning_rate: float, total_steps: int, warmup_steps: int,
                           end_learning_rate_fraction: float = 0.0) -> optax.Schedule:
    """0 -> learning_rate linearly over warmup_steps, then cosine to the end fraction."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=learning_rate * end_learning_rate_fraction)


def _decay_mask(params):
    # Weight decay on matrices and tensors only: not on biases, norm gains, the q/k
    # scales or the temperature.
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def adamw_warmup_cosine(total_steps: int, learning_rate: float = 1e-4,
                        warmup_steps: int = 500, end_learning_rate_fraction: float = 0.0,
                        weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-8, grad_clip_norm: float | None = 1.0
                        ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, schedule).  Defaults follow the official trainer's AdamW
    (no weight decay) with the usual warmup and global-norm clipping added."""
    # `not x > 0` also refuses NaN (an infinite rate is allowed: it tests the
    # non-finite step policy).
    if not learning_rate > 0:
        raise ValueError(f"adamw_warmup_cosine.learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0 or not weight_decay >= 0:
        raise ValueError("adamw_warmup_cosine.warmup_steps and weight_decay must be >= 0, got "
                         f"{warmup_steps} and {weight_decay}")
    schedule = warmup_cosine_schedule(learning_rate, total_steps, warmup_steps,
                                      end_learning_rate_fraction)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=_decay_mask)
    if grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw), schedule
    return adamw, schedule
