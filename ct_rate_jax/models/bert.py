"""The BERT text tower of CT-CLIP in flax.nnx, laid out like Hugging Face's `BertModel`.

CT-CLIP encodes a radiology report with a pretrained BERT (CXR-BERT in the paper) and
projects the [CLS] hidden state into the shared latent.  The module and attribute names
below mirror `transformers.BertModel` (``embeddings.word_embeddings``,
``encoder.layer[i].attention.self.query`` ...) so that `bert_weights` can map a
Hugging Face state dict onto this model mechanically.

Shapes: B = batch, S = sequence length, H = hidden size, N = heads, D = H / N.
Parameters are float32; `dtype` is the compute dtype of the matmuls (bf16 on
accelerators), while the attention softmax and every LayerNorm run in float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ct_rate_jax.models import layers
from ct_rate_jax.models.layers import layer_norm, linear, sharded

# Hugging Face `model_type`s whose checkpoints hold a plain BERT encoder with absolute
# position embeddings.  CXR-BERT ("cxr-bert") is the text encoder CT-CLIP starts from.
BERT_LIKE_MODEL_TYPES = frozenset({"bert", "cxr-bert"})

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf form, as torch's default
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The Hugging Face `BertConfig` fields that determine the encoder's computation."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Unsupported hidden_act {self.hidden_act!r}; "
                             f"expected one of {sorted(ACTIVATIONS)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, hf_config: Mapping[str, Any]) -> BertConfig:
        """Builds a config from a Hugging Face `config.json` dict; unknown keys are ignored."""
        model_type = hf_config.get("model_type", "bert")
        if model_type not in BERT_LIKE_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a BERT encoder; supported: "
                             f"{sorted(BERT_LIKE_MODEL_TYPES)}.")
        position_type = hf_config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type {position_type!r} is not supported; "
                             "only 'absolute' position embeddings are implemented.")
        names = {field.name for field in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf_config.items() if k in names and v is not None}
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> BertConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face compatible config dict (model_type bert)."""
        return {"model_type": "bert", "position_embedding_type": "absolute",
                **dataclasses.asdict(self)}

    # Named variants.  `base` has the shape of BERT-base, PubMedBERT and CXR-BERT.
    @classmethod
    def tiny(cls, vocab_size: int = 1000, **overrides) -> BertConfig:
        """2 layers of width 64: fast tests and the synthetic demo."""
        return cls(**{**dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=128,
                             max_position_embeddings=128), **overrides})

    @classmethod
    def mini(cls, vocab_size: int = 30522, **overrides) -> BertConfig:
        """6 layers of width 384, the shape of MiniLM-L6-H384."""
        return cls(**{**dict(vocab_size=vocab_size, hidden_size=384, num_hidden_layers=6,
                             num_attention_heads=12, intermediate_size=1536), **overrides})

    @classmethod
    def base(cls, vocab_size: int = 30522, **overrides) -> BertConfig:
        """12 layers of width 768 (BERT-base, CXR-BERT)."""
        return cls(**{**dict(vocab_size=vocab_size), **overrides})


def _normal(config: BertConfig):
    # Hugging Face initialises every Linear and Embedding with N(0, initializer_range).
    return nnx.initializers.normal(stddev=config.initializer_range)


def _dense(config: BertConfig, in_features: int, out_features: int,
           axes: tuple[str | None, str | None], *, rngs: nnx.Rngs, dtype: Any) -> nnx.Linear:
    return linear(in_features, out_features, axes, rngs=rngs, dtype=dtype,
                  kernel_init=_normal(config))


def _layer_norm(config: BertConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # dtype=float32 makes nnx promote bf16 inputs, so the statistics are float32.
    return layer_norm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=jnp.float32,
                      rngs=rngs)


class BertEmbeddings(nnx.Module):
    """word + absolute position + token type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        self.config = config
        self.dtype = dtype
        # Tables are looked up in float32; the sum is cast to `dtype` after the LayerNorm.
        def table(rows: int, row_axis: str | None) -> nnx.Embed:
            return nnx.Embed(rows, config.hidden_size, embedding_init=_normal(config),
                             rngs=rngs, embedding_metadata=sharded(row_axis, "embed"))

        self.word_embeddings = table(config.vocab_size, "vocab")
        self.position_embeddings = table(config.max_position_embeddings, None)
        self.token_type_embeddings = table(config.type_vocab_size, None)
        self.LayerNorm = _layer_norm(config, rngs=rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, *,
                 deterministic: bool) -> jax.Array:
        """int[B, S] ids and token types -> float[B, S, H]."""
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(f"Sequence length {seq_len} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}.")
        positions = jnp.arange(seq_len)[None, :]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        x = self.LayerNorm(x).astype(self.dtype or jnp.float32)
        return self.dropout(x, deterministic=deterministic)


class BertSelfAttention(nnx.Module):
    """Multi-head scaled dot-product attention with q/k/v projections (with biases)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = _dense(config, h, h, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.key = _dense(config, h, h, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.value = _dense(config, h, h, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.dropout = nnx.Dropout(config.attention_probs_dropout_prob, rngs=rngs)

    def __call__(self, x: jax.Array, mask_bias: jax.Array, *, deterministic: bool) -> jax.Array:
        """float[B, S, H], additive float32[B, 1, 1, S] -> float[B, S, N*D] (heads merged)."""
        b, s, _ = x.shape

        def split_heads(t: jax.Array) -> jax.Array:  # [B, S, N*D] -> [B, S, N, D]
            return t.reshape(b, s, self.num_heads, self.head_dim)

        q, k, v = (split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(self.head_dim) + mask_bias
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        probs = self.dropout(probs, deterministic=deterministic)
        context = jnp.einsum("bnqk,bknd->bqnd", probs, v)
        return context.reshape(b, s, self.num_heads * self.head_dim)


class BertSelfOutput(nnx.Module):
    """Attention output projection, dropout, residual and LayerNorm."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        h = config.hidden_size
        self.dense = _dense(config, h, h, ("heads", "embed"), rngs=rngs, dtype=dtype)
        self.LayerNorm = _layer_norm(config, rngs=rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, context: jax.Array, residual: jax.Array, *,
                 deterministic: bool) -> jax.Array:
        """float[B, S, N*D], float[B, S, H] -> float[B, S, H]."""
        y = self.dropout(self.dense(context), deterministic=deterministic)
        return self.LayerNorm(y + residual).astype(residual.dtype)


class BertAttention(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        # `self.self` is Hugging Face's attribute name (attention.self.query ...).
        self.self = BertSelfAttention(config, rngs=rngs, dtype=dtype)
        self.output = BertSelfOutput(config, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask_bias: jax.Array, *, deterministic: bool) -> jax.Array:
        """float[B, S, H] -> float[B, S, H]."""
        context = self.self(x, mask_bias, deterministic=deterministic)
        return self.output(context, x, deterministic=deterministic)


class BertIntermediate(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        self.dense = _dense(config, config.hidden_size, config.intermediate_size,
                            ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.hidden_act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """float[B, S, H] -> float[B, S, I]."""
        return ACTIVATIONS[self.hidden_act](self.dense(x))


class BertOutput(nnx.Module):
    """Feed-forward output projection, dropout, residual and LayerNorm."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        self.dense = _dense(config, config.intermediate_size, config.hidden_size,
                            ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.LayerNorm = _layer_norm(config, rngs=rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, hidden: jax.Array, residual: jax.Array, *,
                 deterministic: bool) -> jax.Array:
        """float[B, S, I], float[B, S, H] -> float[B, S, H]."""
        y = self.dropout(self.dense(hidden), deterministic=deterministic)
        return self.LayerNorm(y + residual).astype(residual.dtype)


class BertLayer(nnx.Module):
    """One post-LayerNorm transformer block."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        self.attention = BertAttention(config, rngs=rngs, dtype=dtype)
        self.intermediate = BertIntermediate(config, rngs=rngs, dtype=dtype)
        self.output = BertOutput(config, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask_bias: jax.Array, *, deterministic: bool) -> jax.Array:
        """float[B, S, H] -> float[B, S, H]."""
        x = self.attention(x, mask_bias, deterministic=deterministic)
        return self.output(self.intermediate(x), x, deterministic=deterministic)


class BertEncoder(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any = None,
                 remat_policy: str | None = None):
        self.layer = nnx.List([BertLayer(config, rngs=rngs, dtype=dtype)
                               for _ in range(config.num_hidden_layers)])
        layers.check_remat_policy(remat_policy)
        self.remat_policy = remat_policy

    def __call__(self, x: jax.Array, mask_bias: jax.Array, *, deterministic: bool) -> jax.Array:
        apply = layers.remat(
            lambda block, x, mask_bias: block(x, mask_bias, deterministic=deterministic),
            self.remat_policy)
        for block in self.layer:
            x = apply(block, x, mask_bias)
        return x


class BertPooler(nnx.Module):
    """dense + tanh on the [CLS] hidden state (the next-sentence-prediction pooler)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        h = config.hidden_size
        # Output axis unnamed: a PartitionSpec may not use the same mesh axis twice.
        self.dense = _dense(config, h, h, ("embed", None), rngs=rngs, dtype=dtype)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """float[B, S, H] -> float[B, H]."""
        return jnp.tanh(self.dense(hidden[:, 0]))


class BertModel(nnx.Module):
    """The BERT encoder; returns the last hidden state (and optionally the pooler output).

    Args:
      config: the architecture.
      rngs: `nnx.Rngs` for initialisation; dropout draws from its "dropout" stream
        (falling back to the default stream when there is none).
      dtype: compute dtype of the matmuls and activations (None = float32).  Parameters
        stay float32.
      add_pooler: also create the dense+tanh pooler (see `pool`).
      remat_policy: None, or a name of `layers.REMAT_POLICIES`: each layer is
        rematerialised with it.
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any = None,
                 add_pooler: bool = False, remat_policy: str | None = None):
        self.config = config
        self.dtype = dtype
        self.embeddings = BertEmbeddings(config, rngs=rngs, dtype=dtype)
        self.encoder = BertEncoder(config, rngs=rngs, dtype=dtype, remat_policy=remat_policy)
        self.pooler = BertPooler(config, rngs=rngs, dtype=dtype) if add_pooler else None

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, *,
                 deterministic: bool = True) -> jax.Array:
        """int[B, S] input_ids, int[B, S] attention_mask (1 = token, 0 = padding),
        int[B, S] token_type_ids -> float[B, S, H] last hidden state (compute dtype)."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        # Padding keys get the most negative float32 added to their scores, as Hugging Face
        # does with finfo(dtype).min: exp() underflows to exactly 0, and a row with no
        # valid key degrades to a uniform average instead of NaN.
        keep = attention_mask.astype(bool)[:, None, None, :]
        mask_bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic)
        return self.encoder(x, mask_bias, deterministic=deterministic)

    def pool(self, last_hidden_state: jax.Array) -> jax.Array:
        """float[B, S, H] -> float[B, H] pooler output; needs add_pooler=True."""
        if self.pooler is None:
            raise ValueError("This BertModel was created with add_pooler=False.")
        return self.pooler(last_hidden_state)
