"""The official CTCLIP state dict (PyTorch) <-> `ct_rate_jax.models.ct_clip.CTCLIP`.

  visual_transformer.*      CT-ViT (`ctvit_weights`)
  text_transformer.*        Hugging Face BertModel (`bert_weights`); the released files
                            carry `embeddings.position_ids`, dropped; the pooler is
                            dropped unless the model keeps one (`text_pooler`)
  to_visual_latent.weight   [latent, h*w*dim]  -> kernel [h*w*dim, latent]
  to_text_latent.weight     [latent, hidden]   -> kernel [hidden, latent]
  temperature               scalar
The official model also holds `to_{text,visual}_latent_extra` (CLOOB projections that
CT-CLIP never uses); they are ignored on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ct_rate_jax.models import bert_weights, ctvit_weights
from ct_rate_jax.models.ct_clip import CTCLIP
from ct_rate_jax.models.weight_io import (Slot, export_state_dict, linear_kernel,
                                          load_state_dict, plain)

_IGNORED_TOP_LEVEL = ("to_text_latent_extra.", "to_visual_latent_extra.")


def _projection_table(model: CTCLIP) -> dict[str, Slot]:
    return {"to_visual_latent.weight": linear_kernel(model.to_visual_latent.kernel),
            "to_text_latent.weight": linear_kernel(model.to_text_latent.kernel),
            "temperature": plain(model.temperature)}


def ct_clip_from_state_dict(model: CTCLIP, state_dict: Mapping[str, Any],
                            prefix: str = "") -> CTCLIP:
    """Loads an official CTCLIP state dict (optionally under `prefix`) into `model`.

    Each part is validated before anything of it is assigned; a mismatch raises one
    error that lists every missing, unexpected and mis-shaped key of that part.
    """
    towers = ("visual_transformer.", "text_transformer.")
    load_state_dict(
        _projection_table(model), state_dict, prefix=prefix, what="CT-CLIP projections",
        ignored=lambda key: key.startswith(towers + _IGNORED_TOP_LEVEL))
    ctvit_weights.ctvit_from_state_dict(model.visual_transformer, state_dict,
                                        prefix=prefix + "visual_transformer.")
    bert_weights.bert_params_from_state_dict(model.text_transformer, state_dict,
                                             prefix=prefix + "text_transformer.")
    return model


def ct_clip_to_state_dict(model: CTCLIP, prefix: str = "") -> dict[str, np.ndarray]:
    """The model's weights under the official CTCLIP names and torch layouts."""
    state = export_state_dict(_projection_table(model), prefix)
    state.update(ctvit_weights.ctvit_to_state_dict(model.visual_transformer,
                                                   prefix + "visual_transformer."))
    state.update(bert_weights.bert_state_dict_from_model(model.text_transformer,
                                                         prefix + "text_transformer."))
    return state
