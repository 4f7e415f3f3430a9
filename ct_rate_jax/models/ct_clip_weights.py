"""The official CTCLIP state dict (PyTorch) <-> `ct_rate_jax.models.ct_clip.CTCLIP`.

  visual_transformer.*      CT-ViT (`ctvit_weights`)
  text_transformer.*        Hugging Face BertModel (`bert_weights`); the released files
                            carry `embeddings.position_ids`, dropped; the pooler is
                            dropped unless the model keeps one (`text_pooler`)
  to_visual_latent.weight   [latent, h*w*dim]  -> kernel [h*w*dim, latent]
  to_text_latent.weight     [latent, hidden]   -> kernel [hidden, latent]
  temperature               scalar
The official model also holds `to_{text,visual}_latent_extra` (CLOOB projections that
CT-CLIP never uses); they are ignored on load.  `official_unused_entries` makes
placeholders for those and for the CT-ViT's unused entries, so that an exported state
dict loads into the official module with its default `load_state_dict(strict=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ct_rate_jax.models import bert_weights, ctvit_weights
from ct_rate_jax.models.ct_clip import CTCLIP, CTCLIPConfig
from ct_rate_jax.models.weight_io import (Slot, StateDictMismatchError, export_state_dict,
                                          linear_kernel, load_state_dict, plain)

_IGNORED_TOP_LEVEL = ("to_text_latent_extra.", "to_visual_latent_extra.")


def _projection_table(model: CTCLIP) -> dict[str, Slot]:
    return {"to_visual_latent.weight": linear_kernel(model.to_visual_latent.kernel),
            "to_text_latent.weight": linear_kernel(model.to_text_latent.kernel),
            "temperature": plain(model.temperature)}


def ct_clip_from_state_dict(model: CTCLIP, state_dict: Mapping[str, Any],
                            prefix: str = "", *, consume: bool = False) -> CTCLIP:
    """Loads an official CTCLIP state dict (optionally under `prefix`) into `model`.

    The three parts (projections, CT-ViT, BERT) are loaded one after the other; each is
    validated before anything of it is assigned, and the problems of all parts are
    reported together in one error that lists every missing, unexpected and mis-shaped
    key.  After a failed load the model may hold some of the parts.

    Args:
      model: a CTCLIP, possibly abstract (`nnx.eval_shape`): assigning fills it.
      state_dict: key -> array (torch layout).  Keys outside `prefix` are not looked at.
      consume: delete entries from `state_dict` (a mutable dict) as they are done with:
        the unused CLOOB projections first, then each part's entries (its unused ones
        included) once the part is loaded, so a large checkpoint's memory is released
        as the model fills up instead of at the end.
    """
    towers = ("visual_transformer.", "text_transformer.")
    projections = _projection_table(model)
    parts = (
        (lambda: load_state_dict(
            projections, state_dict, prefix=prefix, what="CT-CLIP projections",
            ignored=lambda key: key.startswith(towers + _IGNORED_TOP_LEVEL)),
         lambda key: key in projections),
        (lambda: ctvit_weights.ctvit_from_state_dict(
            model.visual_transformer, state_dict, prefix=prefix + towers[0]),
         lambda key: key.startswith(towers[0])),
        (lambda: bert_weights.bert_params_from_state_dict(
            model.text_transformer, state_dict, prefix=prefix + towers[1]),
         lambda key: key.startswith(towers[1])),
    )
    if consume:  # documented unused, never an error: release them before anything else
        for key in [k for k in state_dict if k.startswith(prefix)
                    and k[len(prefix):].startswith(_IGNORED_TOP_LEVEL)]:
            del state_dict[key]
    errors = []
    for load, owns in parts:
        try:
            load()
        except StateDictMismatchError as error:
            errors.append(str(error))
        if consume and not errors:
            for key in [k for k in state_dict
                        if k.startswith(prefix) and owns(k[len(prefix):])]:
                del state_dict[key]
    if errors:
        raise StateDictMismatchError("\n".join(errors))
    return model


def ct_clip_keys(model: CTCLIP, prefix: str = "") -> list[str]:
    """The official keys that the model's weights map to (nothing is copied)."""
    return ([prefix + k for k in _projection_table(model)]
            + [prefix + "visual_transformer." + k
               for k in ctvit_weights.ctvit_table(model.visual_transformer)]
            + [prefix + "text_transformer." + k
               for k in bert_weights.bert_table(model.text_transformer)])


def ct_clip_to_state_dict(model: CTCLIP, prefix: str = "") -> dict[str, np.ndarray]:
    """The model's weights under the official CTCLIP names and torch layouts."""
    state = export_state_dict(_projection_table(model), prefix)
    state.update(ctvit_weights.ctvit_to_state_dict(model.visual_transformer,
                                                   prefix + "visual_transformer."))
    state.update(bert_weights.bert_state_dict_from_model(model.text_transformer,
                                                         prefix + "text_transformer."))
    return state


def official_unused_entries(config: CTCLIPConfig, prefix: str = "") -> dict[str, np.ndarray]:
    """Placeholders for the official state-dict entries that CT-CLIP's forward never reads.

    The official module holds them (first-frame patch embedding, decoder output
    projections, empty `null_kv`, cross-attention `context_norm`, the CLOOB `*_extra`
    projections, BERT's pooler) and `CTCLIP.load` is strict.  Norm gains are 1, every
    other placeholder is 0, except `vq._codebook.initted` = 1: it tells the official
    quantiser that the codebook is already set (with 0 it would re-initialise the
    codebook by k-means on the next batch it encodes).
    """
    vit, text = config.ctvit, config.text
    first_frame = vit.channels * vit.patch_size**2
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    ones = lambda *shape: np.ones(shape, np.float32)  # noqa: E731
    entries = {}
    if not config.text_pooler:
        entries["text_transformer.pooler.dense.weight"] = zeros(text.hidden_size,
                                                                 text.hidden_size)
        entries["text_transformer.pooler.dense.bias"] = zeros(text.hidden_size)
    v = "visual_transformer."
    entries.update({
        f"{v}to_patch_emb_first_frame.1.weight": ones(first_frame),
        f"{v}to_patch_emb_first_frame.1.bias": zeros(first_frame),
        f"{v}to_patch_emb_first_frame.2.weight": zeros(vit.dim, first_frame),
        f"{v}to_patch_emb_first_frame.2.bias": zeros(vit.dim),
        f"{v}to_patch_emb_first_frame.3.weight": ones(vit.dim),
        f"{v}to_patch_emb_first_frame.3.bias": zeros(vit.dim)})
    for name, depth in (("enc_spatial_transformer", vit.spatial_depth),
                        ("enc_temporal_transformer", vit.temporal_depth)):
        for i in range(depth):
            attn = f"{v}{name}.layers.{i}.1."
            entries[attn + "null_kv"] = zeros(vit.heads, 0, vit.dim_head)
            entries[attn + "context_norm.gamma"] = ones(vit.dim)
            entries[attn + "context_norm.beta"] = zeros(vit.dim)
    if vit.use_vq:
        entries[f"{v}vq._codebook.initted"] = ones(1)
    entries.update({
        f"{v}to_pixels_first_frame.0.weight": zeros(first_frame, vit.dim),
        f"{v}to_pixels_first_frame.0.bias": zeros(first_frame),
        f"{v}to_pixels.0.weight": zeros(vit.patch_dim, vit.dim),
        f"{v}to_pixels.0.bias": zeros(vit.patch_dim),
        "to_text_latent_extra.weight": zeros(config.dim_latent, text.hidden_size),
        "to_visual_latent_extra.weight": zeros(config.dim_latent, vit.pooled_features)})
    return {prefix + key: value for key, value in entries.items()}
