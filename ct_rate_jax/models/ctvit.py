"""CT-ViT: the 3D patch transformer that encodes a CT volume for CT-CLIP (flax.nnx).

Architecture of the official encoder (CT-CLIP's `transformer_maskgit.CTViT`, used
with `return_encoded_tokens=True`):

  volume float[B, D, H, W] in [-1, 1]
    -> patches [B, T, h, w, pt*p*p]           T = D/pt, h = H/p, w = W/p
    -> LayerNorm -> Linear -> LayerNorm        tokens [B, T, h, w, dim]
    -> spatial transformer over each (b, t) slab of h*w tokens, with a continuous
       position bias
    -> temporal transformer over each (b, y, x) column of T tokens
    -> optional vector quantisation (cosine-similarity codebook lookup)
  -> tokens float[B, T, h, w, dim]

Each transformer layer is PEG (depthwise 3x3x3 conv, causal on T) -> cosine-sim
attention with learned q/k scales and a fixed scale of 8 -> GEGLU feed-forward,
all residual; each transformer ends with a bias-free LayerNorm.  Parameter names
follow the official state dict where that keeps conversion obvious.  Two quirks of
the released model are reproduced on purpose (tests/models/test_ctvit.py checks the
outputs against the official model to float32 precision): keys and values are
projected from the tokens *before* the attention LayerNorm, and the temporal PEG
sees a scrambled grid (see `CTViTConfig.temporal_peg_layout`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ct_rate_jax.models import layers

# The official attention multiplies cosine similarities by this constant.
COSINE_ATTENTION_SCALE = 8.0
PEG_IMPLS = ("taps", "conv")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class CTViTConfig:
    """Constructor arguments of the official CTViT (same names), plus our options.

    Attributes:
      temporal_peg_layout: "official" reproduces the released model's temporal PEG,
        which reinterprets the `(b h w) t d` token buffer as `(b, t, h, w, d)` without
        permuting it (so the depthwise conv mixes unrelated tokens); needed to run the
        released weights.  "grid" permutes to the real (t, h, w) grid first.
      vq_decay: EMA decay of codebook updates in training (vector-quantize-pytorch's
        default, which the official code uses).
      patch_input_norm: the official patch embedding LayerNorms each flattened patch
        before projecting it, which removes the patch's mean and spread: absolute HU
        (air vs fluid vs soft tissue in a uniform patch) is lost.  False projects the
        raw [-1, 1] voxels instead (the LayerNorm after the projection stays).
      peg_impl: how the PEG's depthwise 3x3x3 convolution is computed (same parameters
        and outputs either way).  "taps": 27 shifted multiply-adds, which partition
        correctly on every mesh.  "conv": XLA's grouped convolution (cuDNN on GPUs), whose
        kernel gradient is one convolution instead of 27 full-size reductions; XLA's SPMD
        partitioner mis-scales that gradient when the batch is sharded over one mesh axis
        and replicated over another (seen with fsdp=4 x tensor=2), so "conv" is for
        data-parallel meshes.
      attention_impl: "einsum" (explicit similarity matrix, float32 softmax) or
        "xla" / "cudnn": `jax.nn.dot_product_attention` with that implementation
        ("cudnn" is the fused flash-attention kernel of NVIDIA GPUs and needs a bfloat16
        or float16 compute dtype).  The cosine-similarity normalisation and learned
        scales are applied to q and k first, so all give the same attention.
    """

    dim: int = 512
    codebook_size: int = 8192
    image_size: int = 480
    patch_size: int = 20
    temporal_patch_size: int = 10
    spatial_depth: int = 4
    temporal_depth: int = 4
    dim_head: int = 32
    heads: int = 8
    channels: int = 1
    ff_mult: float = 4.0
    use_vq: bool = True
    vq_decay: float = 0.8
    temporal_peg_layout: str = "official"
    patch_input_norm: bool = True
    peg_impl: str = "taps"
    attention_impl: str = "einsum"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"CTViTConfig: image_size {self.image_size} is not divisible by "
                             f"patch_size {self.patch_size}")
        if self.temporal_peg_layout not in ("official", "grid"):
            raise ValueError("CTViTConfig.temporal_peg_layout must be 'official' or 'grid', "
                             f"got {self.temporal_peg_layout!r}")
        if self.peg_impl not in PEG_IMPLS:
            raise ValueError(f"CTViTConfig.peg_impl must be one of {PEG_IMPLS}, "
                             f"got {self.peg_impl!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"CTViTConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        if self.channels != 1:
            raise ValueError("CTViTConfig.channels: only single-channel CT volumes are supported")

    @property
    def grid_hw(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def patch_dim(self) -> int:
        return self.channels * self.temporal_patch_size * self.patch_size**2

    @property
    def ff_inner_dim(self) -> int:
        # The official FeedForward truncates mult * 2/3 * dim (e.g. 1365 for dim 512).
        return int(self.ff_mult * (2 / 3) * self.dim)

    @property
    def pooled_features(self) -> int:
        """Size of the flattened depth-averaged token grid: h * w * dim (294,912 for v2)."""
        h, w = self.grid_hw
        return h * w * self.dim

    def num_frames_ok(self, depth: int) -> bool:
        return depth % self.temporal_patch_size == 0


class PatchEmbedding(nnx.Module):
    """Volume float[B, D, H, W] -> tokens float[B, T, h, w, dim]."""

    def __init__(self, config: CTViTConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        self.config = config
        self.norm_in = (layers.layer_norm(config.patch_dim, rngs=rngs, dtype=dtype)
                        if config.patch_input_norm else None)
        self.proj = layers.linear(config.patch_dim, config.dim, ("patch", "embed"), rngs=rngs,
                                  dtype=dtype)
        self.norm_out = layers.layer_norm(config.dim, rngs=rngs, dtype=dtype)

    def __call__(self, volume_bdhw: jax.Array) -> jax.Array:
        cfg = self.config
        b, d, h, w = volume_bdhw.shape
        pt, p = cfg.temporal_patch_size, cfg.patch_size
        if d % pt or h % p or w % p:
            raise ValueError(f"volume shape (D, H, W) = {(d, h, w)} is not divisible by the "
                             f"patch sizes ({pt}, {p}, {p})")
        x = volume_bdhw.reshape(b, d // pt, pt, h // p, p, w // p, p)
        # Flatten each patch in (pt, p1, p2) order, as the official rearrange does.
        x = x.transpose(0, 1, 3, 5, 2, 4, 6).reshape(b, d // pt, h // p, w // p, cfg.patch_dim)
        if self.norm_in is not None:
            x = self.norm_in(x)
        return self.norm_out(self.proj(x))


class DepthwiseConv3d(nnx.Module):
    """A 3x3x3 depthwise convolution: kernel [3, 3, 3, 1, dim], bias [dim].

    impl "taps" writes it as 27 shifted multiply-adds, "conv" as XLA's grouped
    convolution (`CTViTConfig.peg_impl` says when to use which).
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: Any = None, impl: str = "taps"):
        self.dtype = dtype
        self.impl = impl
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4)
        self.kernel = nnx.Param(init(rngs.params(), (3, 3, 3, 1, dim), jnp.float32),
                                **layers.sharded(None, None, None, None, None))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), **layers.sharded(None))

    def __call__(self, padded_bthwd: jax.Array) -> jax.Array:
        """float[B, T + 2, H + 2, W + 2, C] (already padded) -> float[B, T, H, W, C]."""
        dtype = self.dtype or padded_bthwd.dtype
        x = padded_bthwd.astype(dtype)
        kernel = self.kernel[...].astype(dtype)
        if self.impl == "conv":
            out = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(1, 1, 1), padding="VALID",
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                feature_group_count=x.shape[-1])
            return out + self.bias[...].astype(dtype)
        t, h, w = (n - 2 for n in x.shape[1:4])
        out = jnp.zeros(x.shape[:1] + (t, h, w) + x.shape[4:], dtype)
        for dt in range(3):
            for dh in range(3):
                for dw in range(3):
                    out = out + x[:, dt:dt + t, dh:dh + h, dw:dw + w] * kernel[dt, dh, dw, 0]
        return out + self.bias[...].astype(dtype)


class PEG(nnx.Module):
    """Position generator: a depthwise 3x3x3 conv over the token grid, causal in T."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: Any = None, impl: str = "taps"):
        self.dsconv = DepthwiseConv3d(dim, rngs=rngs, dtype=dtype, impl=impl)

    def __call__(self, grid_bthwd: jax.Array) -> jax.Array:
        # Two frames of zero padding before T and none after: position t only sees t-2..t.
        padded = jnp.pad(grid_bthwd, ((0, 0), (2, 0), (1, 1), (1, 1), (0, 0)))
        return self.dsconv(padded)


class Attention(nnx.Module):
    """Cosine-similarity multi-head self-attention with learned per-dim q/k scales."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, rngs: nnx.Rngs,
                 dtype: Any = None, impl: str = "einsum"):
        inner = heads * dim_head
        self.heads, self.dim_head, self.impl = heads, dim_head, impl
        self.norm = layers.FixedBiasLayerNorm(dim)
        self.to_q = layers.linear(dim, inner, ("embed", "heads"), use_bias=False, rngs=rngs,
                                  dtype=dtype)
        self.to_kv = layers.linear(dim, 2 * inner, ("embed", "heads"), use_bias=False,
                                   rngs=rngs, dtype=dtype)
        self.q_scale = nnx.Param(jnp.ones((dim_head,), jnp.float32), **layers.sharded("norm"))
        self.k_scale = nnx.Param(jnp.ones((dim_head,), jnp.float32), **layers.sharded("norm"))
        self.to_out = layers.linear(inner, dim, ("heads", "embed"), use_bias=False, rngs=rngs,
                                    dtype=dtype)

    def __call__(self, x_bnd: jax.Array, attn_bias_hnn: jax.Array | None = None) -> jax.Array:
        b, n, _ = x_bnd.shape
        # The official layer normalises only the queries' input: keys and values are
        # projected from the un-normalised tokens (its `kv_input` is taken before the norm).
        q = self.to_q(self.norm(x_bnd))
        k, v = jnp.split(self.to_kv(x_bnd), 2, axis=-1)
        q, k, v = (t.reshape(b, n, self.heads, self.dim_head) for t in (q, k, v))
        q = layers.l2_normalize(q.astype(jnp.float32)) * self.q_scale[...]
        k = layers.l2_normalize(k.astype(jnp.float32)) * self.k_scale[...]
        if self.impl != "einsum":
            bias = None if attn_bias_hnn is None else attn_bias_hnn[None].astype(v.dtype)
            out = jax.nn.dot_product_attention(
                q.astype(v.dtype), k.astype(v.dtype), v, bias=bias,
                scale=COSINE_ATTENTION_SCALE, implementation=self.impl)
            return self.to_out(out.reshape(b, n, self.heads * self.dim_head))
        sim_bhij = jnp.einsum("bihd,bjhd->bhij", q.astype(v.dtype), k.astype(v.dtype))
        sim_bhij = sim_bhij.astype(jnp.float32) * COSINE_ATTENTION_SCALE
        if attn_bias_hnn is not None:
            sim_bhij = sim_bhij + attn_bias_hnn
        attn = jax.nn.softmax(sim_bhij, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhij,bjhd->bihd", attn, v).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class FeedForward(nnx.Module):
    """LayerNorm -> Linear(dim, 2 * inner) -> GEGLU -> Linear(inner, dim), no biases."""

    def __init__(self, dim: int, inner_dim: int, *, rngs: nnx.Rngs, dtype: Any = None):
        self.norm = layers.layer_norm(dim, rngs=rngs, dtype=dtype)
        self.proj_in = layers.linear(dim, 2 * inner_dim, ("embed", "mlp"), use_bias=False,
                                     rngs=rngs, dtype=dtype)
        self.proj_out = layers.linear(inner_dim, dim, ("mlp", "embed"), use_bias=False,
                                      rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(self.proj_in(self.norm(x)), 2, axis=-1)
        return self.proj_out(jax.nn.gelu(gate, approximate=False) * hidden)


class ContinuousPositionBias(nnx.Module):
    """Attention bias float[heads, n, n] for an h x w grid from an MLP over log distances."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, num_layers: int = 2):
        widths = [2] + [dim] * num_layers
        self.hidden = nnx.List([
            layers.linear(i, o, (None, None), rngs=rngs) for i, o in zip(widths, widths[1:])])
        self.to_heads = layers.linear(dim, heads, (None, None), rngs=rngs)

    def __call__(self, h: int, w: int) -> jax.Array:
        ys, xs = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
        grid = jnp.stack([ys.reshape(-1), xs.reshape(-1)], axis=-1).astype(jnp.float32)
        rel = grid[:, None, :] - grid[None, :, :]
        rel = jnp.sign(rel) * jnp.log1p(jnp.abs(rel))
        for layer in self.hidden:
            rel = jax.nn.leaky_relu(layer(rel), negative_slope=0.1)
        return self.to_heads(rel).transpose(2, 0, 1)


class TransformerLayer(nnx.Module):
    def __init__(self, config: CTViTConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        self.peg = PEG(config.dim, rngs=rngs, dtype=dtype, impl=config.peg_impl)
        self.attn = Attention(config.dim, config.heads, config.dim_head, rngs=rngs, dtype=dtype,
                              impl=config.attention_impl)
        self.ff = FeedForward(config.dim, config.ff_inner_dim, rngs=rngs, dtype=dtype)


class Transformer(nnx.Module):
    """A stack of PEG -> attention -> feed-forward layers and a final LayerNorm.

    The caller supplies `to_grid` / `from_grid`, which turn the attention layout
    (sequences x tokens x dim) into the PEG's (b, t, h, w, dim) grid and back; this is
    where the spatial and temporal transformers (and the official temporal quirk) differ.
    """

    def __init__(self, config: CTViTConfig, depth: int, *, rngs: nnx.Rngs, dtype: Any = None,
                 remat_policy: str | None = None):
        self.layers = nnx.List([TransformerLayer(config, rngs=rngs, dtype=dtype)
                                for _ in range(depth)])
        self.norm_out = layers.FixedBiasLayerNorm(config.dim)
        layers.check_remat_policy(remat_policy)
        self.remat_policy = remat_policy

    def __call__(self, x_bnd, to_grid, from_grid, attn_bias=None):
        def block(layer, x_bnd, attn_bias):
            x_bnd = from_grid(layer.peg(to_grid(x_bnd))) + x_bnd
            x_bnd = layer.attn(x_bnd, attn_bias) + x_bnd
            return layer.ff(x_bnd) + x_bnd

        block = layers.remat(block, self.remat_policy)
        for layer in self.layers:
            x_bnd = block(layer, x_bnd, attn_bias)
        return self.norm_out(x_bnd)


class VectorQuantizer(nnx.Module):
    """Cosine-similarity codebook lookup (vector-quantize-pytorch 1.1.2 semantics).

    The nearest code is chosen by cosine similarity, but the *raw* codebook row is
    returned, as the official library does.  In training the output is straight-
    through (forward value = code, gradient flows to the input) and the codebook is
    updated by an exponential moving average of the l2-normalised inputs assigned to
    each code, computed over the whole global batch.
    """

    def __init__(self, dim: int, codebook_size: int, *, decay: float, rngs: nnx.Rngs):
        self.decay = decay
        init = jax.random.uniform(rngs.params(), (codebook_size, dim), jnp.float32, -1.0, 1.0)
        self.codebook = layers.Buffer(layers.l2_normalize(init), **layers.sharded(None, "embed"))
        self.cluster_size = layers.Buffer(jnp.zeros((codebook_size,), jnp.float32),
                                          **layers.sharded(None))

    def lookup(self, x_nd: jax.Array) -> jax.Array:
        """Returns int32[N] codebook indices of the nearest codes by cosine similarity."""
        codes = layers.l2_normalize(self.codebook[...])
        sim = layers.l2_normalize(x_nd.astype(jnp.float32)) @ codes.T
        return jnp.argmax(sim, axis=-1)

    def __call__(self, x_nd: jax.Array, *, train: bool = False) -> jax.Array:
        codebook = self.codebook[...]
        indices = self.lookup(jax.lax.stop_gradient(x_nd))
        quantized = jnp.take(codebook, indices, axis=0).astype(x_nd.dtype)
        if not train:
            return quantized
        self._ema_update(jax.lax.stop_gradient(x_nd), indices)
        return x_nd + jax.lax.stop_gradient(quantized - x_nd)

    def _ema_update(self, x_nd: jax.Array, indices: jax.Array):
        # Per-code counts and sums as scatter-adds: a one-hot [N, codebook] matrix would be
        # 3.6 GB at the v2 size (N = 8 x 13,824 tokens, 8,192 codes).
        codes = self.codebook.shape[0]
        bins = jax.ops.segment_sum(jnp.ones(indices.shape, jnp.float32), indices, codes)
        self.cluster_size[...] = self.cluster_size[...] * self.decay + bins * (1 - self.decay)
        sums = jax.ops.segment_sum(layers.l2_normalize(x_nd.astype(jnp.float32)), indices,
                                   codes)
        means = layers.l2_normalize(sums / jnp.maximum(bins, 1.0)[:, None])
        old = layers.l2_normalize(self.codebook[...])
        # Unused codes keep their (normalised) value, as in the official update.
        target = jnp.where(bins[:, None] == 0, old, means)
        self.codebook[...] = self.codebook[...] * self.decay + target * (1 - self.decay)


class CTViT(nnx.Module):
    """The CT-ViT encoder: volume float[B, D, H, W] -> tokens float[B, T, h, w, dim].

    dtype: compute dtype (parameters stay float32).  remat_policy: None, or a name of
    `layers.REMAT_POLICIES`: each transformer layer is rematerialised with it.
    """

    def __init__(self, config: CTViTConfig, *, rngs: nnx.Rngs, dtype: Any = None,
                 remat_policy: str | None = None):
        self.config = config
        self.to_patch_emb = PatchEmbedding(config, rngs=rngs, dtype=dtype)
        self.spatial_rel_pos_bias = ContinuousPositionBias(config.dim, config.heads, rngs=rngs)
        self.enc_spatial_transformer = Transformer(config, config.spatial_depth, rngs=rngs,
                                                   dtype=dtype, remat_policy=remat_policy)
        self.enc_temporal_transformer = Transformer(config, config.temporal_depth, rngs=rngs,
                                                    dtype=dtype, remat_policy=remat_policy)
        self.vq = (VectorQuantizer(config.dim, config.codebook_size, decay=config.vq_decay,
                                   rngs=rngs) if config.use_vq else None)

    def encode(self, tokens_bthwd: jax.Array) -> jax.Array:
        """Spatial then temporal transformer; tokens keep their shape [B, T, h, w, dim]."""
        b, t, h, w, d = tokens_bthwd.shape

        # Spatial: one sequence of h*w tokens per (b, t).
        x = tokens_bthwd.reshape(b * t, h * w, d)
        bias = self.spatial_rel_pos_bias(h, w)
        x = self.enc_spatial_transformer(
            x, to_grid=lambda s: s.reshape(b, t, h, w, d),
            from_grid=lambda g: g.reshape(b * t, h * w, d), attn_bias=bias)

        # Temporal: one sequence of t tokens per (b, y, x).
        x = x.reshape(b, t, h, w, d).transpose(0, 2, 3, 1, 4).reshape(b * h * w, t, d)
        if self.config.temporal_peg_layout == "official":
            # The released model reshapes the (b h w) t d buffer straight to
            # (b, t, h, w, d): the conv then runs over a scrambled grid.  Kept for parity.
            to_grid = lambda s: s.reshape(b, t, h, w, d)  # noqa: E731
            from_grid = lambda g: g.reshape(b * h * w, t, d)  # noqa: E731
        else:
            to_grid = lambda s: s.reshape(b, h, w, t, d).transpose(0, 3, 1, 2, 4)  # noqa: E731
            from_grid = lambda g: g.transpose(0, 2, 3, 1, 4).reshape(b * h * w, t, d)  # noqa: E731
        x = self.enc_temporal_transformer(x, to_grid=to_grid, from_grid=from_grid)
        return x.reshape(b, h, w, t, d).transpose(0, 3, 1, 2, 4)

    def __call__(self, volume_bdhw: jax.Array, *, train: bool = False,
                 quantize: bool = True) -> jax.Array:
        """Returns tokens float[B, T, h, w, dim], vector-quantised when configured."""
        tokens = self.encode(self.to_patch_emb(volume_bdhw))
        if self.vq is None or not quantize:
            return tokens
        shape = tokens.shape
        flat = self.vq(tokens.reshape(-1, shape[-1]), train=train)
        return flat.reshape(shape)
