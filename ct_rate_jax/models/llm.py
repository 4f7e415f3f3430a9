"""A Llama-family decoder-only language model in flax.nnx (Llama 2/3.x, Vicuna, Mistral).

The module tree mirrors `transformers.LlamaForCausalLM` (``model.embed_tokens``,
``model.layers[i].self_attn.q_proj``, ``model.layers[i].mlp.gate_proj``, ``model.norm``,
``lm_head``) so that `llm_weights` maps a Hugging Face checkpoint onto it by name.

Shapes: B = batch, S = new tokens in this call, T = key/value slots (S without a cache,
the cache length with one), H = hidden size, N = query heads, K = key/value heads,
G = N / K, D = head dim, V = vocabulary.  Parameters are `param_dtype` (float32 by
default); `dtype` is the compute dtype (bf16 on accelerators); RMSNorm statistics, RoPE
angles, attention softmax and the returned logits are float32.

Padding: prompts of different lengths are left-padded with `attention_mask` 0 on the
pads.  Rotary positions count only real tokens (position = number of real tokens before
it), as `transformers.generate` does; the causal and sliding-window masks are over slot
indices, as in transformers.  With a `KVCache`, each call writes its keys and values at
`cache.index` and attends to every valid slot before it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ct_rate_jax import sharding
from ct_rate_jax.models.layers import sharded
from ct_rate_jax.models.llm_config import LLMConfig, RopeScaling  # noqa: F401  (re-export)


# --------------------------------------------------------------------------- KV cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys and values of every layer.

    keys, values: one dtype[B, K, T, D] per layer.  valid: bool[B, T], slot holds a real
    (not padding) token.  index: int32[] the next slot to write (slots >= index are free).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, config: LLMConfig, batch: int, length: int, dtype: Any = jnp.float32
               ) -> KVCache:
        shape = (batch, config.num_key_value_heads, length, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in zeros),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.valid.shape[1]


# --------------------------------------------------------------------------- layers


def _dense(config: LLMConfig, features_in: int, features_out: int,
           axes: tuple[str, str], use_bias: bool, *, rngs: nnx.Rngs, dtype: Any,
           param_dtype: Any) -> nnx.Linear:
    return nnx.Linear(features_in, features_out, use_bias=use_bias, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs,
                      kernel_init=nnx.initializers.normal(config.initializer_range),
                      kernel_metadata=sharded(*axes), bias_metadata=sharded(axes[1]))


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, statistics in float32 (as transformers' LlamaRMSNorm)."""

    def __init__(self, features: int, eps: float, *, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((features,), param_dtype), **sharded("norm"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def rotary_cos_sin(inv_freq: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32[D/2], int[B, S] -> cos, sin float32[B, S, D] (halves repeated, HF layout)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x[B, S, heads, D] rotated by the angles of its position (rotate-half form)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE (multi-head when K = N)."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        h, d = config.hidden_size, config.head_dim
        n, k = config.num_attention_heads, config.num_key_value_heads
        bias = config.attention_bias
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = _dense(config, h, n * d, ("embed", "heads"), bias, **kw)
        self.k_proj = _dense(config, h, k * d, ("embed", "kv"), bias, **kw)
        self.v_proj = _dense(config, h, k * d, ("embed", "kv"), bias, **kw)
        self.o_proj = _dense(config, n * d, h, ("heads", "embed"), bias, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, d

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array,
                 cache_kv: tuple[jax.Array, jax.Array] | None, index: jax.Array | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """float[B, S, H] -> float[B, S, H] and the layer's updated (keys, values).

        allowed: bool[B, S, T], which key slots each query may attend to.
        """
        b, s, _ = x.shape
        k_heads, groups, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = apply_rotary(self.q_proj(x).reshape(b, s, self.num_heads, d), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(b, s, k_heads, d), cos, sin)
        v = self.v_proj(x).reshape(b, s, k_heads, d)
        # Keys and values are kept [B, K, T, D] (the cache's layout), so that a decode
        # step reads the cache as it lies instead of transposing all of it.
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if cache_kv is not None:
            start = (0, 0, index, 0)
            k = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), start)
            cache_kv = (k, v)
        # Query head n = kv_head * G + g, as transformers' repeat_kv orders them.
        q = q.reshape(b, s, k_heads, groups, d)
        scores = jnp.einsum("bskgd,bktd->bkgst", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(d)
        # Masked scores get the most negative float32 (as transformers), so a fully
        # masked row (a left pad's query) becomes a harmless uniform average, not NaN.
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        context = jnp.einsum("bkgst,bktd->bskgd", probs, v.astype(q.dtype))
        return self.o_proj(context.reshape(b, s, self.num_heads * d)), cache_kv


class LMHead(nnx.Module):
    """The output projection, stored [V, H] as the embedding table (and torch's
    `lm_head.weight`) is: logits[..., v] = x[..., :] . weight[v, :].

    Not an [H, V] `nnx.Linear`: while decoding a few rows, XLA on the CPU computes the
    product against contiguous vocabulary rows in one streaming pass over the matrix
    (memory bound), which the [H, V] layout does not get (benchmarks/decode_speed.py).
    """

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        init = nnx.initializers.normal(config.initializer_range)
        self.weight = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size),
                                     param_dtype), **sharded("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """float[..., H] -> float[..., V] (compute dtype)."""
        weight = self.weight[...].astype(self.dtype)
        return jax.lax.dot_general(x.astype(self.dtype), weight,
                                   (((x.ndim - 1,), (1,)), ((), ())))


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = _dense(config, h, i, ("embed", "mlp"), bias, **kw)
        self.up_proj = _dense(config, h, i, ("embed", "mlp"), bias, **kw)
        self.down_proj = _dense(config, i, h, ("mlp", "embed"), bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = Attention(config, **kw)
        self.mlp = MLP(config, **kw)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps,
                                                param_dtype=param_dtype)

    def __call__(self, x, cos, sin, allowed, cache_kv, index):
        attended, cache_kv = self.self_attn(self.input_layernorm(x), cos, sin, allowed,
                                            cache_kv, index)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), cache_kv


class DecoderStack(nnx.Module):
    """Embedding, the decoder layers and the final norm (transformers' `LlamaModel`)."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs,
            embedding_metadata=sharded("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs, dtype=dtype,
                                             param_dtype=param_dtype)
                                for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)


class LLM(nnx.Module):
    """Causal language model: `model` (the decoder stack) and `lm_head` (None if tied).

    Args:
      config: the architecture (`LLMConfig.from_hf_config(...)`).
      rngs: initialisation (random weights; `llm_weights.load_hf_llm` fills real ones).
      dtype: compute dtype (None = float32).
      param_dtype: storage dtype of the parameters.
      remat: recompute each layer's activations in the backward pass (training memory).
    """

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs, dtype: Any = None,
                 param_dtype: Any = jnp.float32, remat: bool = False):
        self.config = config
        self.dtype = dtype or jnp.float32
        self.remat = remat
        self.model = DecoderStack(config, rngs=rngs, dtype=self.dtype, param_dtype=param_dtype)
        self.lm_head = None if config.tie_word_embeddings else LMHead(
            config, rngs=rngs, dtype=self.dtype, param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """int[B, S] -> float[B, S, H] token embeddings (compute dtype); the multimodal
        bridge splices visual tokens into this sequence and passes `inputs_embeds`."""
        # Rows first, then the cast: nnx.Embed would cast the whole table to bf16 each call.
        table = self.model.embed_tokens.embedding[...]
        return jnp.take(table, input_ids, axis=0).astype(self.dtype)

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache for `batch` rows of up to `length` tokens (prompt + new)."""
        return KVCache.create(self.config, batch, length, self.dtype)

    def _allowed(self, attention_mask: jax.Array, cache: KVCache | None):
        """Default positions int[B, S], allowed bool[B, S, T], the key slots' validity
        bool[B, T] after this call, and the first slot this call writes."""
        mask = attention_mask.astype(bool)
        s = mask.shape[1]
        if cache is None:
            prior = jnp.zeros((mask.shape[0], 1), jnp.int32)
            key_valid, first = mask, 0
        else:
            prior = jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
            first = cache.index
        positions = jnp.maximum(prior + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
        query_slot = first + jnp.arange(s)[:, None]
        key_slot = jnp.arange(key_valid.shape[1])[None, :]
        allowed = key_slot <= query_slot
        if self.config.sliding_window is not None:
            allowed &= key_slot > query_slot - self.config.sliding_window
        return positions, allowed[None] & key_valid[:, None, :], key_valid, first

    def __call__(self, input_ids: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                 cache: KVCache | None = None, last_token_only: bool = False
                 ) -> tuple[jax.Array, KVCache | None]:
        """Logits of the next token at every input position.

        Args:
          input_ids: int[B, S] tokens, or
          inputs_embeds: float[B, S, H] embeddings (e.g. text with visual tokens spliced in).
          attention_mask: int/bool[B, S], 1 = token, 0 = padding (default all 1).
          positions: int[B, S] rotary positions (default: count of real tokens before,
            continuing from the cache).
          cache: a `KVCache` to read and extend (writes at `cache.index`), or None.
          last_token_only: only the last position's logits (float32[B, 1, V]), as
            generation needs after a prefill (saves S - 1 LM-head products).

        Returns:
          float32[B, S, V] logits and the updated cache (None without one).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, s = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), bool)
        default_positions, allowed, key_valid, first = self._allowed(attention_mask, cache)
        positions = default_positions if positions is None else positions
        inv_freq = self.config.rope.inverse_frequencies(self.config.head_dim,
                                                        self.config.rope_theta)
        cos, sin = rotary_cos_sin(jnp.asarray(inv_freq), positions)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.model.layers):
            cache_kv = None if cache is None else (cache.keys[i], cache.values[i])
            if self.remat:
                x, cache_kv = nnx.remat(DecoderLayer.__call__)(layer, x, cos, sin, allowed,
                                                               cache_kv, first)
            else:
                x, cache_kv = layer(x, cos, sin, allowed, cache_kv, first)
            if cache_kv is not None:
                new_keys.append(cache_kv[0])
                new_values.append(cache_kv[1])
        x = self.model.norm(x[:, -1:] if last_token_only else x)
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        if cache is not None:
            cache = KVCache(keys=tuple(new_keys), values=tuple(new_values), valid=key_valid,
                            index=cache.index + s)
        return logits.astype(jnp.float32), cache


def init_llm(config: LLMConfig, *, seed: int = 0, dtype: Any = None,
             param_dtype: Any = jnp.float32, remat: bool = False, mesh=None) -> LLM:
    """A randomly initialised `LLM`, created by one jitted initialiser (much faster than
    eager initialisation) directly in its sharding on `mesh` (None: default device)."""
    def build():
        return LLM(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype,
                   remat=remat)

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = None if mesh is None else sharding.state_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)
