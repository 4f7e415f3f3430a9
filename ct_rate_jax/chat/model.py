"""CT-CHAT as one trainable flax.nnx model: (CT-ViT) -> Projector -> LLM.

  volume_bdhw float[B, D, H, W]  --vision (CT-ViT, optional)-->  tokens_bthwd [B, T, h, w, E]
  (or precomputed tokens_bthwd, e.g. `load_encoding`)
  tokens_bthwd --projector-->  visual_bnh [B, n_queries, H]
  input_ids int[B, S] --llm.embed--> [B, S, H], visual tokens put at `visual_mask`
  (`multimodal.insert_visual_tokens`) --llm--> logits float32[B, S, V]

The batch is what `multimodal.pad_batch` builds (input_ids, labels, visual_mask,
attention_mask; `positions` is not used: right padding needs none) plus either
`volume` float[B, D, H, W] (live encoder) or `tokens` float[B, T, h, w, E].  `loss` is the
next-token cross-entropy over the assistant tokens only (labels != IGNORE_INDEX, shifted
by one), averaged over those tokens in the batch, as LLaVA trains.

Attribute names matter: `lora.trainable_filter` selects `projector` and `llm`;
`vision` is frozen unless the trainer adds it (`vision_filter`).  Every parameter carries
the logical axes of its module (CT-ViT, projector, LLM), so
`sharding.state_shardings` lays the model out on the mesh like the rest of the project.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ct_rate_jax.chat.conversation import IGNORE_INDEX
from ct_rate_jax.chat.multimodal import insert_visual_tokens
from ct_rate_jax.chat.projector import Projector, ProjectorConfig
from ct_rate_jax.models.ctvit import CTViT, CTViTConfig
from ct_rate_jax.models.llm import LLM, LLMConfig


@dataclasses.dataclass(frozen=True)
class CTChatConfig:
    """The three parts' shapes.

    Attributes:
      llm: the language model.
      projector: its `hidden_size` must be `llm.hidden_size` and its `mm_context_size`
        the vision tokens' width (`ctvit.dim` with a live encoder).
      ctvit: the live CT-ViT encoder, or None when the model reads precomputed tokens.
      quantize: pass the encoder's tokens through its VQ codebook (the official encode
        script does; only matters with `ctvit.use_vq`).
    """

    llm: LLMConfig
    projector: ProjectorConfig
    ctvit: CTViTConfig | None = None
    quantize: bool = True

    def __post_init__(self):
        if self.projector.hidden_size != self.llm.hidden_size:
            raise ValueError(f"CTChatConfig: projector.hidden_size {self.projector.hidden_size}"
                             f" != llm.hidden_size {self.llm.hidden_size}")
        if self.ctvit is not None and self.ctvit.dim != self.projector.mm_context_size:
            raise ValueError(f"CTChatConfig: ctvit.dim {self.ctvit.dim} != "
                             f"projector.mm_context_size {self.projector.mm_context_size}")

    @property
    def num_visual_tokens(self) -> int:
        return self.projector.n_queries


class CTChat(nnx.Module):
    """Vision encoder (optional) + projector + LLM; see the module docstring.

    `dtype` is the compute dtype (bf16 on accelerators); parameters stay in
    `param_dtype` (float32 by default, what the optimiser updates).
    """

    def __init__(self, config: CTChatConfig, *, rngs: nnx.Rngs, dtype: Any = None,
                 param_dtype: Any = jnp.float32, remat: bool = False):
        self.config = config
        self.vision = None if config.ctvit is None else CTViT(config.ctvit, rngs=rngs,
                                                              dtype=dtype)
        self.projector = Projector(config.projector, rngs=rngs, dtype=dtype)
        self.llm = LLM(config.llm, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                       remat=remat)

    @classmethod
    def from_parts(cls, config: CTChatConfig, *, llm: LLM, projector: Projector,
                   vision: CTViT | None = None) -> CTChat:
        """A CTChat around already built (e.g. loaded) parts; nothing is initialised."""
        if (vision is None) != (config.ctvit is None):
            raise ValueError("CTChat.from_parts: pass a vision encoder exactly when "
                             "config.ctvit is set")
        model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))  # abstract shell
        model.llm, model.projector, model.vision = llm, projector, vision
        return model

    def visual_tokens(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """visual_bnh float[B, n_queries, H] from batch["tokens"] or batch["volume"]."""
        if "tokens" in batch:
            tokens = batch["tokens"]
        elif "volume" in batch:
            if self.vision is None:
                raise ValueError("this CT-CHAT model has no vision encoder: pass precomputed "
                                 "'tokens' (CT-ViT encodings), not a 'volume'")
            tokens = self.vision(batch["volume"], quantize=self.config.quantize)
        else:
            raise ValueError("the batch needs 'tokens' (CT-ViT encodings) or 'volume'")
        return self.projector(tokens)

    def input_embeddings(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """float[B, S, H]: token embeddings with the visual tokens at `visual_mask`."""
        text = self.llm.embed(batch["input_ids"])
        return insert_visual_tokens(text, self.visual_tokens(batch), batch["visual_mask"])

    def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Next-token logits float32[B, S, V]."""
        logits, _ = self.llm(inputs_embeds=self.input_embeddings(batch),
                             attention_mask=batch["attention_mask"])
        return logits

    def loss(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean cross-entropy over the assistant tokens, and metrics (token accuracy,
        number of assistant tokens)."""
        return next_token_loss(self(batch), batch["labels"])


def next_token_loss(logits_bsv: jax.Array, labels_bs: jax.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Position s predicts labels[s + 1]; IGNORE_INDEX targets do not count."""
    logits, targets = logits_bsv[:, :-1], labels_bs[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = jnp.where(mask, targets, 0)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                safe)
    count = jnp.sum(mask)
    denominator = jnp.maximum(count, 1).astype(jnp.float32)
    loss = jnp.sum(jnp.where(mask, per_token, 0.0)) / denominator
    correct = jnp.sum(jnp.where(mask, jnp.argmax(logits, -1) == safe, False))
    return loss, {"loss": loss, "token_accuracy": correct / denominator,
                  "answer_tokens": count.astype(jnp.float32)}


def vision_filter(vision: str = "vision"):
    """The encoder's parameters (to train it jointly with a stage's filter)."""
    return nnx.All(nnx.Param, nnx.PathContains(vision))
