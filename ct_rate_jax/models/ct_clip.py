"""CT-CLIP: a CT-ViT image tower and a BERT text tower in a shared latent space (flax.nnx).

  image: volume float[B, D, H, W] -> CT-ViT tokens [B, T, h, w, dim]
         -> mean over T (the depth axis of the token grid) -> flatten [B, h*w*dim]
         -> Linear (no bias) -> l2-normalise              image_latents [B, L]
  text:  input_ids int[B, S] -> BERT last hidden state -> [CLS] vector [B, hidden]
         -> Linear (no bias) -> l2-normalise              text_latents  [B, L]
  similarity = exp(temperature) * <text_latent, image_latent>

This is the official model's forward (CTCLIP with `use_all_token_embeds=False`);
the unused `*_extra` projections of the official code are not part of the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ct_rate_jax.models import layers
from ct_rate_jax.models.bert import BertConfig, BertModel
from ct_rate_jax.models.ctvit import CTViT, CTViTConfig


@dataclasses.dataclass(frozen=True)
class CTCLIPConfig:
    """Top-level model configuration (the thing gin binds).

    Attributes:
      ctvit: image tower; its defaults are the released v2 architecture.
      text: text tower; the defaults are CXR-BERT's (BERT-base shape, vocabulary 30,522).
      dim_latent: size of the shared latent.
      init_temperature: initial value of the learned temperature; the logit scale is
        exp(temperature), as in the official code (initialised to 1.0 there).
      max_logit_scale: optional clamp of exp(temperature) (CLIP uses 100); None keeps the
        official unclamped behaviour.
      init_logit_bias: when set, the model holds a learned scalar `logit_bias` (an
        `nnx.Param`, replicated) initialised to this value, as the SigLIP sigmoid loss
        needs (SigLIP: -10, with init_temperature = log 10).  None (the default, and
        what official-checkpoint conversion produces) means no such parameter, as in
        the official model.
      text_pooler: keep BERT's pooler weights (unused by CT-CLIP, present in HF checkpoints).
      text_pooling: "cls" (official) takes BERT's [CLS] hidden state; "mean" averages the
        hidden states of the real (unmasked) tokens.  A BERT trained from scratch starts
        with a [CLS] state that is nearly the same for every report, which stalls
        contrastive learning for many steps; the mean differs between reports from step 0.
    """

    ctvit: CTViTConfig = dataclasses.field(default_factory=CTViTConfig)
    text: BertConfig = dataclasses.field(default_factory=BertConfig)
    dim_latent: int = 512
    init_temperature: float = 1.0
    max_logit_scale: float | None = None
    init_logit_bias: float | None = None
    text_pooler: bool = False
    text_pooling: str = "cls"

    def __post_init__(self):
        if self.text_pooling not in ("cls", "mean"):
            raise ValueError("CTCLIPConfig.text_pooling must be 'cls' or 'mean', got "
                             f"{self.text_pooling!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `from_dict` inverts it exactly."""
        top = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dict(top, ctvit=dataclasses.asdict(self.ctvit), text=self.text.to_dict())

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> CTCLIPConfig:
        """Inverse of `to_dict`; unknown top-level or CT-ViT keys are an error (a config
        written by another version should fail loudly, not load as something else)."""
        known = {f.name for f in dataclasses.fields(cls)}
        ctvit_known = {f.name for f in dataclasses.fields(CTViTConfig)}
        unknown = sorted(set(config) - known) + sorted(
            f"ctvit.{k}" for k in set(config.get("ctvit", {})) - ctvit_known)
        if unknown:
            raise ValueError(f"unknown CTCLIPConfig field(s): {', '.join(unknown)}")
        values = dict(config)
        if "ctvit" in values:
            values["ctvit"] = CTViTConfig(**values["ctvit"])
        if "text" in values:
            values["text"] = BertConfig.from_dict(values["text"])
        return cls(**values)


def variant(name: str, **text_overrides: Any) -> CTCLIPConfig:
    """Named sizes, big_vision style: "v2" (released), "demo" (CPU minutes), "tiny" (tests)."""
    if name == "v2":
        return CTCLIPConfig(text=dataclasses.replace(BertConfig(), **text_overrides))
    if name == "demo":
        ctvit = CTViTConfig(dim=64, image_size=64, patch_size=8, temporal_patch_size=4,
                            spatial_depth=1, temporal_depth=1, heads=4, dim_head=16,
                            use_vq=False, temporal_peg_layout="grid")
        text = BertConfig(**{**dict(vocab_size=2048, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128,
                                    max_position_embeddings=128), **text_overrides})
        return CTCLIPConfig(ctvit=ctvit, text=text, dim_latent=64, max_logit_scale=100.0)
    if name == "tiny":
        ctvit = CTViTConfig(dim=32, image_size=16, patch_size=8, temporal_patch_size=4,
                            spatial_depth=1, temporal_depth=1, heads=2, dim_head=8,
                            codebook_size=16, use_vq=True)
        text = BertConfig(**{**dict(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=32), **text_overrides})
        return CTCLIPConfig(ctvit=ctvit, text=text, dim_latent=16)
    raise ValueError(f"unknown CT-CLIP variant {name!r} (known: 'v2', 'demo', 'tiny')")


class CTCLIP(nnx.Module):
    """The CT-CLIP model.

    dtype: the compute dtype (None = float32; bfloat16 on accelerators).  Parameters,
      and so the optimizer state, stay float32; softmax, LayerNorm statistics, the
      latents and the loss are float32.
    remat_policy: None, or a name of `layers.REMAT_POLICIES` ("full", "dots",
      "dots_no_batch"): every transformer block of both towers is rematerialised with
      that policy (activations recomputed in the backward pass instead of stored).
      Changes memory and time, not the parameters or the numbers.
    """

    def __init__(self, config: CTCLIPConfig, *, rngs: nnx.Rngs, dtype: Any = None,
                 remat_policy: str | None = None):
        self.config = config
        self.visual_transformer = CTViT(config.ctvit, rngs=rngs, dtype=dtype,
                                        remat_policy=remat_policy)
        self.text_transformer = BertModel(config.text, rngs=rngs, dtype=dtype,
                                          add_pooler=config.text_pooler,
                                          remat_policy=remat_policy)
        self.to_visual_latent = layers.linear(
            config.ctvit.pooled_features, config.dim_latent, ("image_features", "latent"),
            use_bias=False, rngs=rngs, dtype=dtype)
        self.to_text_latent = layers.linear(
            config.text.hidden_size, config.dim_latent, ("embed", "latent"), use_bias=False,
            rngs=rngs, dtype=dtype)
        self.temperature = nnx.Param(jnp.asarray(config.init_temperature, jnp.float32))
        if config.init_logit_bias is not None:  # SigLIP's learned bias; absent officially
            self.logit_bias = nnx.Param(jnp.asarray(config.init_logit_bias, jnp.float32))

    def logit_scale(self) -> jax.Array:
        scale = jnp.exp(self.temperature[...])
        if self.config.max_logit_scale is not None:
            scale = jnp.minimum(scale, self.config.max_logit_scale)
        return scale

    def encode_image(self, volume_bdhw: jax.Array, *, train: bool = False) -> jax.Array:
        """CT-ViT tokens float[B, T, h, w, dim] (vector-quantised when configured)."""
        return self.visual_transformer(volume_bdhw, train=train)

    def project_image_tokens(self, tokens_bthwd: jax.Array) -> jax.Array:
        """Token grid [B, T, h, w, dim] -> l2-normalised image latents float32[B, L]."""
        pooled = tokens_bthwd.mean(axis=1).reshape(tokens_bthwd.shape[0], -1)
        return layers.l2_normalize(self.to_visual_latent(pooled).astype(jnp.float32))

    def embed_image(self, volume_bdhw: jax.Array, *, train: bool = False) -> jax.Array:
        """Volume float[B, D, H, W] in [-1, 1] -> image latents float32[B, L], unit norm."""
        return self.project_image_tokens(self.encode_image(volume_bdhw, train=train))

    def embed_text(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                   train: bool = False) -> jax.Array:
        """Token ids int[B, S] and mask int[B, S] -> text latents float32[B, L], unit norm.

        The text feature is BERT's [CLS] state (official) or the masked token mean,
        as `CTCLIPConfig.text_pooling` says."""
        hidden = self.text_transformer(input_ids, attention_mask, deterministic=not train)
        if self.config.text_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.astype(hidden.dtype)[..., None]
            pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        return layers.l2_normalize(self.to_text_latent(pooled).astype(jnp.float32))

    def __call__(self, volume_bdhw: jax.Array, input_ids: jax.Array,
                 attention_mask: jax.Array, *, train: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
        """Returns (image_latents [B, L], text_latents [B, L])."""
        return (self.embed_image(volume_bdhw, train=train),
                self.embed_text(input_ids, attention_mask, train=train))

    def similarity(self, volume_bdhw, input_ids, attention_mask) -> jax.Array:
        """Official `CTCLIP.forward` without loss: float[B] scaled paired similarity."""
        image, text = self(volume_bdhw, input_ids, attention_mask)
        return jnp.sum(image * text, axis=-1) * self.logit_scale()
