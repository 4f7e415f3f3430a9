"""Loading the released CT-CLIP PyTorch checkpoints into the Flax model.

    model = load_official("CT-CLIP_v2.pt", config)

`config` holds the official constructor arguments: ``ctvit`` (CTViT kwargs),
``bert_config`` (the Hugging Face BertConfig as a dict), ``dim_image``, ``dim_text`` and
``dim_latent``, as in tests/fixtures/official_ctclip_tiny/config_A.json.  The released
files are read with ``torch.load(..., weights_only=True)`` (never arbitrary unpickling);
torch is needed only here (``pip install 'ct-rate-jax[convert]'``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from ct_rate_jax.models.bert import BertConfig
from ct_rate_jax.models.ct_clip import CTCLIP, CTCLIPConfig
from ct_rate_jax.models.ct_clip_weights import ct_clip_from_state_dict
from ct_rate_jax.models.ctvit import CTViTConfig

# The LiPro (ClassFine) release wraps the CT-CLIP weights in `trained_model.`.
LIPRO_PREFIX = "trained_model."


def official_config(config: Mapping[str, Any]) -> CTCLIPConfig:
    """Our CTCLIPConfig for the official constructor arguments (released-model quirks on)."""
    ctvit = CTViTConfig(**config["ctvit"], use_vq=True, temporal_peg_layout="official")
    text = BertConfig.from_dict(config["bert_config"])
    if config.get("dim_image", ctvit.pooled_features) != ctvit.pooled_features:
        raise ValueError(f"dim_image {config['dim_image']} does not match the CT-ViT token "
                         f"grid: (image_size / patch_size)^2 * dim = {ctvit.pooled_features}")
    if config.get("dim_text", text.hidden_size) != text.hidden_size:
        raise ValueError(f"dim_text {config['dim_text']} differs from the BERT hidden size "
                         f"{text.hidden_size}")
    return CTCLIPConfig(ctvit=ctvit, text=text, dim_latent=config["dim_latent"])


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch state dict as float32 numpy arrays, loaded with weights_only=True."""
    try:
        import torch
    except ImportError as error:
        raise ImportError("reading official .pt checkpoints needs PyTorch: "
                          "pip install 'ct-rate-jax[convert]'") from error
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and "state_dict" in loaded and not any(
            hasattr(v, "shape") for v in loaded.values()):
        loaded = loaded["state_dict"]
    return {key: (value.float() if value.is_floating_point() else value).numpy()
            for key, value in loaded.items()}


def checkpoint_prefix(state_dict: Mapping[str, Any]) -> str:
    """'' for CT-CLIP / VocabFine files, 'trained_model.' for LiPro (ClassFine) files."""
    return LIPRO_PREFIX if any(k.startswith(LIPRO_PREFIX) for k in state_dict) else ""


def load_official(checkpoint_path: str | os.PathLike, config: Mapping[str, Any], *,
                  dtype: Any = None) -> CTCLIP:
    """The official CT-CLIP model as a Flax CTCLIP with the checkpoint's weights."""
    state_dict = read_torch_checkpoint(checkpoint_path)
    model = CTCLIP(official_config(config), rngs=nnx.Rngs(0), dtype=dtype)
    return ct_clip_from_state_dict(model, state_dict, prefix=checkpoint_prefix(state_dict))
