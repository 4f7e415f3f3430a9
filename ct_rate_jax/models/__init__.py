"""Models: CT-ViT, the BERT text tower and CT-CLIP (flax.nnx)."""

from flax import nnx

# Parameters carry *logical* axis names that only mean something together with the
# rules table in `ct_rate_jax.sharding`; models are created abstractly and then
# materialised by a jitted initialiser with explicit out_shardings.  Eager sharding
# at Variable creation would need a mesh in every constructor, so it is off.
nnx.use_eager_sharding(False)
