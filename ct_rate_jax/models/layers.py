"""Small building blocks shared by the towers, each annotated with logical axis names.

Every parameter carries the logical names of its axes (``sharding`` metadata);
`ct_rate_jax.sharding.LOGICAL_AXIS_RULES` maps them to mesh axes.  The names:

  embed           the model width of a tower (CT-ViT dim, BERT hidden)
  mlp             the feed-forward hidden width
  heads           attention projections, heads x dim_head flattened
  vocab           token vocabulary
  patch           a flattened input patch (pt x p x p voxels)
  image_features  the flattened token grid fed to the visual latent projection
  latent          the shared CLIP latent
  norm            vectors of norms and biases that are never sharded
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's nn.Linear / nn.LayerNorm defaults, so that converted weights behave the same.
TORCH_LAYER_NORM_EPS = 1e-5
default_kernel_init = nnx.initializers.lecun_normal()


class Buffer(nnx.Variable):
    """State that belongs to the model but is not trained by the optimizer.

    Used for the official CT-ViT's fixed LayerNorm beta and the VQ codebook, which
    PyTorch keeps as registered buffers (they are in the state dict, not in the
    parameter list).
    """


def sharded(*axes: str | None) -> dict[str, Any]:
    """Variable metadata naming the logical axes of a parameter."""
    return {"sharding": tuple(axes)}


def linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
           rngs: nnx.Rngs, use_bias: bool = True, dtype: Any = None,
           kernel_init=default_kernel_init) -> nnx.Linear:
    """A Dense layer whose kernel [in, out] carries logical axis names `axes`."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, rngs=rngs,
        kernel_init=kernel_init, kernel_metadata=sharded(*axes),
        bias_metadata=sharded(axes[1]))


def layer_norm(features: int, *, rngs: nnx.Rngs, epsilon: float = TORCH_LAYER_NORM_EPS,
               use_bias: bool = True, dtype: Any = None, axis: str = "norm") -> nnx.LayerNorm:
    """LayerNorm over the last axis with PyTorch's epsilon by default."""
    return nnx.LayerNorm(features, epsilon=epsilon, use_bias=use_bias, dtype=dtype, rngs=rngs,
                         scale_metadata=sharded(axis), bias_metadata=sharded(axis))


class FixedBiasLayerNorm(nnx.Module):
    """LayerNorm with a learned gain and a bias that is a buffer, not a parameter.

    The official CT-ViT (and many lucidrains models) use this "bias-less" LayerNorm:
    beta is registered as a zero buffer, so it is never trained but is part of the
    state dict.  Keeping it as state lets converted checkpoints whose buffer is not
    zero reproduce the official outputs exactly.
    """

    def __init__(self, features: int, *, epsilon: float = TORCH_LAYER_NORM_EPS):
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32), **sharded("norm"))
        self.bias = Buffer(jnp.zeros((features,), jnp.float32), **sharded("norm"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps), as torch.nn.functional.normalize does.

    Written as x * rsqrt(max(||x||^2, eps^2)) (the same value) so that the gradient at
    an all-zero vector is 0, not NaN: air-only patches of a CT give exactly such vectors.
    """
    squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


# Rematerialisation policies for `remat_policy` (per transformer block): what the
# forward pass keeps for the backward pass; everything else is recomputed.
REMAT_POLICIES: dict[str, Callable[..., bool]] = {
    "full": jax.checkpoint_policies.nothing_saveable,       # keep only block inputs
    "dots": jax.checkpoint_policies.dots_saveable,          # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(policy: str | None) -> None:
    if policy is not None and policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be None or one of {sorted(REMAT_POLICIES)}, "
                         f"got {policy!r}")


def remat(fn: Callable, policy: str | None) -> Callable:
    """`fn` (a block applied as `fn(module, *arrays)`) rematerialised with the named
    policy, or `fn` itself for None.  Static (non-array) arguments must be closed over."""
    check_remat_policy(policy)
    if policy is None:
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[policy])
