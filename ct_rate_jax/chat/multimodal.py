"""Where the projected visual tokens enter the LLM's input sequence.

  TokenizedChat (one IMAGE_PLACEHOLDER_ID per image)
    -> `expand_image_placeholders`: each placeholder becomes n_visual positions
       (token id `fill_id`, visual_mask True, label IGNORE_INDEX), then truncation
    -> `pad_batch`: right padding to a fixed length, attention mask
    -> in the model: `insert_visual_tokens(embed(input_ids), projector(tokens), visual_mask)`

This is LLaVA's `prepare_inputs_labels_for_multimodal` made static-shaped, so that the
step jits once: the sequence length is fixed by padding and the visual positions are a
mask rather than a Python-side splice.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ct_rate_jax.chat.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, TokenizedChat


def expand_image_placeholders(chat: TokenizedChat, num_visual_tokens: int, *,
                              fill_id: int = 0, max_length: int | None = None
                              ) -> dict[str, np.ndarray]:
    """One example's arrays with every image placeholder widened to `num_visual_tokens`.

    Returns input_ids int32[S'], labels int32[S'], visual_mask bool[S'] (S' = S + images *
    (num_visual_tokens - 1), cut to `max_length` as the original truncates after splicing).
    A cut through an image would leave part of it without a place: refused.
    """
    ids, labels, visual = [], [], []
    for token, label in zip(chat.input_ids.tolist(), chat.labels.tolist()):
        if token == IMAGE_PLACEHOLDER_ID:
            ids += [fill_id] * num_visual_tokens
            labels += [IGNORE_INDEX] * num_visual_tokens
            visual += [True] * num_visual_tokens
        else:
            ids.append(token)
            labels.append(label)
            visual.append(False)
    if max_length is not None and len(ids) > max_length:
        if visual[max_length - 1] and max_length < len(visual) and visual[max_length]:
            raise ValueError(f"max_length {max_length} cuts through the visual tokens; "
                             "raise it or shorten the prompt")
        ids, labels, visual = ids[:max_length], labels[:max_length], visual[:max_length]
    return {"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32),
            "visual_mask": np.asarray(visual, bool)}


def pad_batch(examples: Sequence[dict[str, np.ndarray]], length: int, *,
              pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-pads examples to `length`: input_ids, labels (IGNORE_INDEX), visual_mask,
    attention_mask (True on real positions), positions int32[B, length]."""
    batch = {"input_ids": np.full((len(examples), length), pad_id, np.int32),
             "labels": np.full((len(examples), length), IGNORE_INDEX, np.int32),
             "visual_mask": np.zeros((len(examples), length), bool),
             "attention_mask": np.zeros((len(examples), length), bool)}
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        if n > length:
            raise ValueError(f"example {row} has {n} positions, more than the padded length "
                             f"{length}")
        for key in ("input_ids", "labels", "visual_mask"):
            batch[key][row, :n] = example[key]
        batch["attention_mask"][row, :n] = True
    batch["positions"] = np.broadcast_to(np.arange(length, dtype=np.int32),
                                         (len(examples), length)).copy()
    return batch


def insert_visual_tokens(text_embeds_bsh: jax.Array, visual_bnh: jax.Array,
                         visual_mask_bs: jax.Array) -> jax.Array:
    """Puts row b's visual tokens, in order, at the True positions of visual_mask[b].

    text_embeds_bsh float[B, S, H] (the embedded input_ids), visual_bnh float[B, N, H]
    (N = images per row x tokens per image), visual_mask_bs bool[B, S] with at most N
    True per row.  Jit-friendly: a gather and a select, no data-dependent shapes.
    """
    index_bs = jnp.clip(jnp.cumsum(visual_mask_bs, axis=1) - 1, 0, visual_bnh.shape[1] - 1)
    gathered = jnp.take_along_axis(visual_bnh, index_bs[..., None], axis=1)
    return jnp.where(visual_mask_bs[..., None], gathered.astype(text_embeds_bsh.dtype),
                     text_embeds_bsh)
