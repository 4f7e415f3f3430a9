"""The CT-CHAT projector: CT-ViT token grid -> a fixed number of LLM-width tokens (flax.nnx).

  tokens_bthwd float[B, T, H, W, E]  (CT-ViT output before the CLIP latent projection;
                                      official 24 x 24 x 24 x 512)
    -> flatten                       [B, N = T*H*W, E]
    -> attention pooling             n_queries learned queries (official 256, 8 heads)
                                     attend to LayerNorm(tokens)       [B, n_queries, E]
    -> LayerNorm -> Linear(E, H) -> (GELU -> Linear(H, H)) x (depth - 1)
  -> visual_bnh float[B, n_queries, H]  (H = the LLM's hidden size)

This is the official `mm_projector_type = "attn_pool+mlp2x_gelu"` (CT-CHAT's
`AttentionalPoolProjector`); "attn_pool+mlpNx_gelu" and "attn_pool+linear" differ only in
the MLP.  The pooler's queries pass through their own LayerNorm and are projected with
`to_q`; keys and values come from LayerNorm(tokens) through one `to_kv`; softmax scale
dim_head^-0.5; no biases in the pooler.  The 256 output tokens replace the `<image>`
placeholder of the prompt (see `ct_rate_jax.chat.multimodal`).

State-dict keys (below `model.mm_projector.`; `load_projector_state_dict` finds that
prefix wherever it sits, e.g. `base_model.model.model.mm_projector.` in a PEFT save):
  attn_pool.query [n, E], attn_pool.{ln_q, ln_k}.{weight, bias},
  attn_pool.{to_q [E, E], to_kv [2E, Ec], to_out [E, E]}.weight,
  ln.{weight, bias}, proj.{0, 2, 4, ...}.{weight, bias}   ("proj.{weight, bias}" for linear)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ct_rate_jax.models import layers
from ct_rate_jax.models.weight_io import (Slot, export_state_dict, linear_kernel,
                                          load_state_dict, plain)

OFFICIAL_PROJECTOR_TYPE = "attn_pool+mlp2x_gelu"
_TYPE_PATTERN = re.compile(r"^attn_pool\+(?:mlp(\d+)x_gelu|linear)$")
STATE_DICT_MARKER = "mm_projector."


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """The projector's shape; field names follow the LLaVA config where it has them.

    Attributes:
      mm_projector_type: "attn_pool+mlp{N}x_gelu" (official: mlp2x) or "attn_pool+linear".
      mm_hidden_size: width E of the pooled tokens (the pooler's d_model; official 512).
      mm_context_size: width of the input tokens (the CT-ViT dim; official 512).
      hidden_size: the LLM's hidden size H.
      n_queries: learned queries = visual tokens per volume (official 256).
      n_heads: heads of the pooling attention (official 8).
    """

    hidden_size: int
    mm_projector_type: str = OFFICIAL_PROJECTOR_TYPE
    mm_hidden_size: int = 512
    mm_context_size: int = 512
    n_queries: int = 256
    n_heads: int = 8

    def __post_init__(self):
        if not _TYPE_PATTERN.match(self.mm_projector_type):
            raise ValueError(f"ProjectorConfig.mm_projector_type {self.mm_projector_type!r} is "
                             "not supported; expected 'attn_pool+mlp<N>x_gelu' or "
                             "'attn_pool+linear'")
        if self.mlp_depth < 1:
            raise ValueError(f"ProjectorConfig.mm_projector_type {self.mm_projector_type!r}: "
                             "the MLP needs at least one layer")
        if self.mm_hidden_size % self.n_heads:
            raise ValueError(f"ProjectorConfig: mm_hidden_size {self.mm_hidden_size} is not "
                             f"divisible by n_heads {self.n_heads}")
        for name in ("hidden_size", "mm_hidden_size", "mm_context_size", "n_queries", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProjectorConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def mlp_depth(self) -> int:
        depth = _TYPE_PATTERN.match(self.mm_projector_type).group(1)
        return 1 if depth is None else int(depth)

    @classmethod
    def from_llava_config(cls, config: Mapping[str, Any]) -> ProjectorConfig:
        """From a LLaVA / CT-CHAT `config.json` dict.

        The official code builds the pooler with its defaults (256 queries, 8 heads)
        whatever the config says; `n_queries` / `n_heads` are read when present.
        """
        if "hidden_size" not in config:
            raise ValueError("LLaVA config has no 'hidden_size' (the LLM width)")
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{name: int(config[name]) if kinds[name] == "int" else config[name]
                      for name in kinds if name in config})


class AttentionalPooler(nnx.Module):
    """n_queries learned queries attend to the tokens: [B, N, Ec] -> [B, n_queries, E]."""

    def __init__(self, config: ProjectorConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        e, ec = config.mm_hidden_size, config.mm_context_size
        self.heads = config.n_heads
        self.dtype = dtype
        self.query = nnx.Param(jax.random.normal(rngs.params(), (config.n_queries, e)),
                               **layers.sharded(None, None))
        self.ln_q = layers.layer_norm(e, rngs=rngs)
        self.ln_k = layers.layer_norm(ec, rngs=rngs)
        # The pooler is small (~1 M parameters at 512 wide): replicated.
        self.to_q = layers.linear(e, e, (None, None), use_bias=False, rngs=rngs, dtype=dtype)
        self.to_kv = layers.linear(ec, 2 * e, (None, None), use_bias=False, rngs=rngs,
                                   dtype=dtype)
        self.to_out = layers.linear(e, e, (None, None), use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, tokens_bnd: jax.Array) -> jax.Array:
        b, n, _ = tokens_bnd.shape
        queries, width = self.query.shape
        dim_head = width // self.heads
        q = self.to_q(self.ln_q(self.query[...]))  # identical for every volume
        k, v = jnp.split(self.to_kv(self.ln_k(tokens_bnd)), 2, axis=-1)
        q = q.reshape(queries, self.heads, dim_head)
        k, v = (t.reshape(b, n, self.heads, dim_head) for t in (k, v))
        sim_bhqn = jnp.einsum("qhd,bnhd->bhqn", q, k).astype(jnp.float32) * dim_head**-0.5
        attn = jax.nn.softmax(sim_bhqn, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqn,bnhd->bqhd", attn, v).reshape(b, queries, width)
        return self.to_out(out)


class Projector(nnx.Module):
    """CT-ViT tokens float[B, T, H, W, Ec] (or [B, N, Ec]) -> visual_bnh float[B, n_queries, H]."""

    def __init__(self, config: ProjectorConfig, *, rngs: nnx.Rngs, dtype: Any = None):
        self.config = config
        self.attn_pool = AttentionalPooler(config, rngs=rngs, dtype=dtype)
        self.ln = layers.layer_norm(config.mm_hidden_size, rngs=rngs)
        widths = [config.mm_hidden_size] + [config.hidden_size] * config.mlp_depth
        axes = [(None, "embed")] + [("mlp", "embed")] * (config.mlp_depth - 1)
        self.proj = nnx.List([layers.linear(i, o, a, rngs=rngs, dtype=dtype)
                              for i, o, a in zip(widths, widths[1:], axes)])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim == 5:
            tokens = flatten_token_grid(tokens)
        if tokens.ndim != 3 or tokens.shape[-1] != self.config.mm_context_size:
            raise ValueError(f"projector input shape {tokens.shape}: expected [B, T, H, W, "
                             f"{self.config.mm_context_size}] or [B, N, "
                             f"{self.config.mm_context_size}]")
        x = self.ln(self.attn_pool(tokens))
        for i, layer in enumerate(self.proj):
            if i:
                x = jax.nn.gelu(x, approximate=False)  # torch nn.GELU() is the erf form
            x = layer(x)
        return x


def flatten_token_grid(tokens_bthwd: jax.Array) -> jax.Array:
    """[B, T, H, W, E] -> [B, T*H*W, E] in (t, h, w) order, as the original's flatten(1, 3)."""
    b, t, h, w, e = tokens_bthwd.shape
    return tokens_bthwd.reshape(b, t * h * w, e)


# ----------------------------------------------------------------------------------
# Official weights
# ----------------------------------------------------------------------------------


def projector_table(model: Projector) -> dict[str, Slot]:
    """State-dict key below `mm_projector.` -> slot in `model`."""
    pool = model.attn_pool
    table = {"attn_pool.query": plain(pool.query)}
    for name in ("ln_q", "ln_k"):
        norm = getattr(pool, name)
        table[f"attn_pool.{name}.weight"] = plain(norm.scale)
        table[f"attn_pool.{name}.bias"] = plain(norm.bias)
    for name in ("to_q", "to_kv", "to_out"):
        table[f"attn_pool.{name}.weight"] = linear_kernel(getattr(pool, name).kernel)
    table["ln.weight"], table["ln.bias"] = plain(model.ln.scale), plain(model.ln.bias)
    linear_only = model.config.mm_projector_type.endswith("+linear")
    for i, layer in enumerate(model.proj):
        # nn.Sequential numbers the GELUs too: Linear layers sit at 0, 2, 4, ...
        key = "proj" if linear_only else f"proj.{2 * i}"
        table[f"{key}.weight"] = linear_kernel(layer.kernel)
        table[f"{key}.bias"] = plain(layer.bias)
    return table


def projector_state_dict_prefix(state_dict: Mapping[str, Any]) -> str:
    """The prefix ending in `mm_projector.` under which `state_dict` holds the projector.

    LLaVA saves `model.mm_projector.*` (mm_projector.bin, non_lora_trainables.bin after
    its own renaming); PEFT-wrapped saves carry `base_model.model.model.mm_projector.*`.
    """
    prefixes = {key[:key.index(STATE_DICT_MARKER) + len(STATE_DICT_MARKER)]
                for key in state_dict if STATE_DICT_MARKER in key}
    if len(prefixes) != 1:
        found = sorted(prefixes) or "none"
        raise ValueError(f"expected the projector weights under one '...{STATE_DICT_MARKER}' "
                         f"prefix, found {found}")
    return prefixes.pop()


def projector_from_state_dict(model: Projector, state_dict: Mapping[str, Any]) -> Projector:
    """Loads official projector weights into `model` in place; other keys (LLM rows,
    embeddings) are left for the LLM converter."""
    prefix = projector_state_dict_prefix(state_dict)
    load_state_dict(projector_table(model), state_dict, prefix=prefix, what="CT-CHAT projector")
    return model


def projector_to_state_dict(model: Projector,
                            prefix: str = "model.mm_projector.") -> dict[str, np.ndarray]:
    """The model's weights under the official names and layouts."""
    return export_state_dict(projector_table(model), prefix)


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """`mm_projector.bin` / `non_lora_trainables.bin` as float32 numpy arrays.

    Loaded with `weights_only=True` (no pickled code runs); bf16 / fp16 tensors are
    upcast, as numpy has no bfloat16.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"projector weights not found: {path}")
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"reading {path} needs PyTorch (pip install 'ct-rate-jax[convert]')"
                          ) from error
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state_dict).__name__})")
    return {key: value.float().numpy() if value.is_floating_point() else value.numpy()
            for key, value in state_dict.items()}


def load_projector(path: str | os.PathLike, config: ProjectorConfig, *,
                   rngs: nnx.Rngs | None = None, dtype: Any = None) -> Projector:
    """A Projector holding the weights of an official `mm_projector.bin` or
    `non_lora_trainables.bin`."""
    model = Projector(config, rngs=rngs or nnx.Rngs(0), dtype=dtype)
    return projector_from_state_dict(model, read_torch_state_dict(path))


# ----------------------------------------------------------------------------------
# Precomputed encodings
# ----------------------------------------------------------------------------------


def encoding_path(folder: str | os.PathLike, image: str) -> str:
    """Where the original looks for a record's encoding: `image` (a VolumeName such as
    "train_1_a_1.nii.gz") with ".nii.gz" replaced by ".npz", inside `folder`."""
    return os.path.join(folder, image.replace(".nii.gz", ".npz"))


def load_encoding(path: str | os.PathLike, context_size: int | None = None) -> np.ndarray:
    """A precomputed CT-ViT encoding as float32[1, T, H, W, E].

    The original stores `np.savez(..., arr=tokens)` with tokens [1, 24, 24, 24, 512];
    a [T, H, W, E] array (no batch axis) is accepted too.  `context_size`, when given,
    is checked against E.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoding not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        if "arr" not in data.files:
            raise ValueError(f"{path} has no 'arr' array (keys: {sorted(data.files)}); "
                             "CT-CHAT encodings are saved as np.savez(path, arr=tokens)")
        tokens = np.asarray(data["arr"], np.float32)
    if tokens.ndim == 4:
        tokens = tokens[None]
    if tokens.ndim != 5 or tokens.shape[0] != 1:
        raise ValueError(f"{path}: 'arr' has shape {tokens.shape}; expected [1, T, H, W, E] "
                         "(e.g. (1, 24, 24, 24, 512))")
    if context_size is not None and tokens.shape[-1] != context_size:
        raise ValueError(f"{path}: token width {tokens.shape[-1]} != the projector's "
                         f"mm_context_size {context_size}")
    return tokens


def save_encoding(path: str | os.PathLike, tokens_thwd: np.ndarray) -> None:
    """Writes tokens [T, H, W, E] or [1, T, H, W, E] in the original's npz form (key `arr`)."""
    tokens = np.asarray(tokens_thwd, np.float32)
    if tokens.ndim == 4:
        tokens = tokens[None]
    if tokens.ndim != 5 or tokens.shape[0] != 1:
        raise ValueError(f"encoding shape {tokens.shape}: expected [T, H, W, E] or [1, T, H, W, E]")
    np.savez(path, arr=tokens)
