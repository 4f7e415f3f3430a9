"""The configuration of a Llama-family decoder, read from a Hugging Face `config.json`.

Covers the `model_type`s "llama" (Llama 1/2/3.x, Vicuna, CodeLlama, ...) and "mistral".
Both spellings of the rotary settings are accepted: transformers 4's `rope_theta` +
`rope_scaling` (`type` or `rope_type`) and transformers 5's `rope_parameters`.

    config.json                         LLMConfig
    hidden_size, intermediate_size      same
    num_attention_heads                 num_attention_heads (N)
    num_key_value_heads (or N)          num_key_value_heads (K; K < N: grouped-query)
    head_dim (or hidden / N)            head_dim (D)
    rope_theta, rope_scaling            rope_theta, rope (RopeScaling: default|linear|llama3)
    sliding_window (mistral only)       sliding_window (None = full causal attention)
    tie_word_embeddings                 same (LM head = embedding matrix transposed)
    attention_bias, mlp_bias            same
    eos_token_id (int or list)          eos_token_ids (tuple)
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# transformers' MistralConfig default: a config.json without the key means 4096.
MISTRAL_DEFAULT_SLIDING_WINDOW = 4096


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How the rotary inverse frequencies are rescaled for long contexts.

    default: none.  linear: every frequency divided by `factor` (e.g. Vicuna 16k).
    llama3: Llama 3.1's frequency-dependent scaling (low frequencies divided by
    `factor`, high ones kept, a smooth blend between).
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported; supported: "
                             f"{list(SUPPORTED_ROPE_TYPES)}")

    def inverse_frequencies(self, head_dim: int, theta: float) -> np.ndarray:
        """float32[D / 2], computed in float32 as transformers does."""
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
        if self.rope_type == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            old_context = self.original_max_position_embeddings
            low_wavelen = old_context / self.low_freq_factor
            high_wavelen = old_context / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = ((old_context / wavelen - self.low_freq_factor)
                      / (self.high_freq_factor - self.low_freq_factor))
            blended = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, blended, scaled).astype(np.float32)
        return inv_freq


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """(theta, scaling) from either the transformers 4 or 5 spelling."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**legacy, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    kwargs = {k: v for k, v in merged.items() if k in fields and v is not None}
    if rope_type == "llama3" and "original_max_position_embeddings" not in kwargs:
        kwargs["original_max_position_embeddings"] = hf.get("max_position_embeddings", 8192)
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """The fields of a Llama / Mistral `config.json` that determine the computation."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope: RopeScaling = RopeScaling()
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: "
                             f"{list(SUPPORTED_MODEL_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")

    @property
    def num_query_groups(self) -> int:
        """Query heads per key/value head (1 = multi-head, N = multi-query)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> LLMConfig:
        """From a Hugging Face `config.json` dict; fields that do not change the math are
        ignored, settings we cannot reproduce raise ValueError naming the key."""
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json: model_type {model_type!r} is not a supported "
                             f"decoder; supported: {list(SUPPORTED_MODEL_TYPES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act {act!r}; only 'silu' (SwiGLU) is "
                             "supported")
        heads = hf["num_attention_heads"]
        theta, rope = _rope_from_hf(hf)
        window = None
        if model_type == "mistral":
            window = hf.get("sliding_window", MISTRAL_DEFAULT_SLIDING_WINDOW)
        eos = hf.get("eos_token_id", 2)
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope=rope,
            sliding_window=window, tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id"), model_type=model_type)

    @classmethod
    def from_json_file(cls, path: str | Path) -> LLMConfig:
        try:
            hf = json.loads(Path(path).read_text())
            return cls.from_hf_config(hf)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    def to_hf_config(self) -> dict[str, Any]:
        """A `config.json` dict (transformers 4 spelling, which version 5 also reads)."""
        rope = dataclasses.asdict(self.rope)
        hf = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name not in ("rope", "eos_token_ids")}
        hf.update(hidden_act="silu", eos_token_id=list(self.eos_token_ids),
                  rope_scaling=None if self.rope.rope_type == "default" else rope,
                  architectures=["MistralForCausalLM" if self.model_type == "mistral"
                                 else "LlamaForCausalLM"])
        if self.model_type == "llama":
            del hf["sliding_window"]
        return hf

    # Named variants for tests, the synthetic demo and benchmarks (random weights).
    @classmethod
    def tiny(cls, vocab_size: int = 512, **overrides) -> LLMConfig:
        """2 layers of width 64, grouped-query attention (4 query, 2 key/value heads)."""
        return cls(**{**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, max_position_embeddings=2048), **overrides})

    @classmethod
    def small(cls, vocab_size: int = 32000, **overrides) -> LLMConfig:
        """4 layers of width 512 (8 query, 4 key/value heads): the decode benchmark."""
        return cls(**{**dict(vocab_size=vocab_size, hidden_size=512, intermediate_size=1408,
                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                             head_dim=64, max_position_embeddings=4096), **overrides})
