"""The official CTViT state dict (PyTorch) <-> `ct_rate_jax.models.ctvit.CTViT`.

Official key (below `visual_transformer.`)          ours
  to_patch_emb.{1,2,3}                              to_patch_emb.{norm_in, proj, norm_out}
  spatial_rel_pos_bias.net.{i}.0 / .net.{L}          spatial_rel_pos_bias.hidden.{i} / .to_heads
  enc_{spatial,temporal}_transformer.layers.{i}.
    0.dsconv                [C, 1, 3, 3, 3]          peg.dsconv   kernel [3, 3, 3, 1, C]
    1.norm.{gamma, beta}                             attn.norm.{scale, bias}
    1.{to_q, to_kv, to_out}, 1.{q_scale, k_scale}    attn.*
    3.0 / 3.1 / 3.4                                  ff.norm / ff.proj_in / ff.proj_out
  enc_*_transformer.norm_out.{gamma, beta}          *.norm_out.{scale, bias}
  vq._codebook.embed [1, K, C], .cluster_size [1, K] vq.codebook [K, C], vq.cluster_size [K]

Weights the official CTViT carries but never uses for encoding are ignored on load
(and absent on export): the empty `null_kv` tensors, the cross-attention
`context_norm`, `vq._codebook.initted`, the first-frame patch embedding, the
decoder (`to_pixels*`, `dec_*`) and the GAN/VGG parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ct_rate_jax.models.ctvit import CTViT
from ct_rate_jax.models.weight_io import (Slot, export_state_dict, linear_kernel,
                                          load_state_dict, plain)

_UNUSED_MARKERS = (".null_kv", ".context_norm.", "vq._codebook.initted", "to_patch_emb_first_frame.",
                   "to_pixels", "dec_spatial_transformer.", "dec_temporal_transformer.",
                   "discr.", "vgg.")


def _ignored(key: str) -> bool:
    return any(marker in key for marker in _UNUSED_MARKERS)


def _conv_slot(variable) -> Slot:
    return Slot(variable,
                to_model=lambda w: np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0)),
                to_torch=lambda k: np.ascontiguousarray(k.transpose(4, 3, 0, 1, 2)))


def _leading_one_slot(variable) -> Slot:
    """Official codebook tensors carry a leading num_codebooks = 1 axis."""
    return Slot(variable, to_model=lambda a: a[0], to_torch=lambda a: a[None])


def _layer_norm(table, key, norm, gain="weight", bias="bias"):
    table[f"{key}.{gain}"] = plain(norm.scale)
    table[f"{key}.{bias}"] = plain(norm.bias)


def _linear(table, key, linear):
    table[f"{key}.weight"] = linear_kernel(linear.kernel)
    if linear.bias is not None:
        table[f"{key}.bias"] = plain(linear.bias)


def ctvit_table(model: CTViT) -> dict[str, Slot]:
    """Official state-dict key (without prefix) -> slot in `model`."""
    table: dict[str, Slot] = {}
    emb = model.to_patch_emb
    _layer_norm(table, "to_patch_emb.1", emb.norm_in)
    _linear(table, "to_patch_emb.2", emb.proj)
    _layer_norm(table, "to_patch_emb.3", emb.norm_out)
    cpb = model.spatial_rel_pos_bias
    for i, layer in enumerate(cpb.hidden):
        _linear(table, f"spatial_rel_pos_bias.net.{i}.0", layer)
    _linear(table, f"spatial_rel_pos_bias.net.{len(cpb.hidden)}", cpb.to_heads)
    for name in ("enc_spatial_transformer", "enc_temporal_transformer"):
        transformer = getattr(model, name)
        for i, layer in enumerate(transformer.layers):
            key = f"{name}.layers.{i}"
            table[f"{key}.0.dsconv.weight"] = _conv_slot(layer.peg.dsconv.kernel)
            table[f"{key}.0.dsconv.bias"] = plain(layer.peg.dsconv.bias)
            attn = layer.attn
            _layer_norm(table, f"{key}.1.norm", attn.norm, "gamma", "beta")
            for proj in ("to_q", "to_kv", "to_out"):
                _linear(table, f"{key}.1.{proj}", getattr(attn, proj))
            table[f"{key}.1.q_scale"] = plain(attn.q_scale)
            table[f"{key}.1.k_scale"] = plain(attn.k_scale)
            _layer_norm(table, f"{key}.3.0", layer.ff.norm)
            _linear(table, f"{key}.3.1", layer.ff.proj_in)
            _linear(table, f"{key}.3.4", layer.ff.proj_out)
        _layer_norm(table, f"{name}.norm_out", transformer.norm_out, "gamma", "beta")
    if model.vq is not None:
        table["vq._codebook.embed"] = _leading_one_slot(model.vq.codebook)
        table["vq._codebook.cluster_size"] = _leading_one_slot(model.vq.cluster_size)
    return table


def ctvit_from_state_dict(model: CTViT, state_dict: Mapping[str, Any],
                          prefix: str = "visual_transformer.") -> CTViT:
    """Loads official CTViT weights into `model` in place (see the module docstring)."""
    load_state_dict(ctvit_table(model), state_dict, prefix=prefix, ignored=_ignored,
                    what="CT-ViT")
    return model


def ctvit_to_state_dict(model: CTViT, prefix: str = "visual_transformer.") -> dict[str, np.ndarray]:
    """The model's CT-ViT weights under the official names and layouts."""
    return export_state_dict(ctvit_table(model), prefix)
