"""ct-rate-jax: CT-CLIP and CT-CHAT in JAX/Flax (nnx)."""

__version__ = "0.1.0"
