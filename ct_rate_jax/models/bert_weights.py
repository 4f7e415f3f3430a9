"""Hugging Face BERT checkpoints <-> `ct_rate_jax.models.bert.BertModel`.

Because `BertModel` uses Hugging Face's module names, the mapping is mechanical: the
nnx parameter path ``encoder/layer/0/attention/self/query/kernel`` is the state-dict
key ``encoder.layer.0.attention.self.query.weight``.  Only the leaf names and layouts
differ:

  nnx leaf             torch key suffix   layout
  Linear.kernel        .weight            [in, out]  <->  torch [out, in] (transposed)
  Linear.bias          .bias
  Embed.embedding      .weight            [num, H] in both
  LayerNorm.scale      .weight
  LayerNorm.bias       .bias

torch is optional: it is imported only to read ``pytorch_model.bin`` files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from ct_rate_jax.models.bert import BertConfig, BertModel
from ct_rate_jax.models.weight_io import (Slot, export_state_dict, linear_kernel,
                                          load_state_dict, plain)

# Keys that Hugging Face checkpoints may carry but that are not encoder weights: the
# position/token-type id buffers (some versions saved them) and the pretraining heads.
_BUFFER_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
_HEAD_PREFIXES = ("cls.",)
_POOLER_PREFIX = "pooler."


def _slot(path: tuple[Any, ...], variable: nnx.Variable) -> tuple[str, Slot]:
    """nnx parameter path -> (Hugging Face key without prefix, slot)."""
    *modules, leaf = (str(p) for p in path)
    if leaf == "kernel":
        return ".".join(modules + ["weight"]), linear_kernel(variable)
    if leaf in ("embedding", "scale"):
        return ".".join(modules + ["weight"]), plain(variable)
    if leaf == "bias":
        return ".".join(modules + ["bias"]), plain(variable)
    raise ValueError(f"No Hugging Face name for parameter {'/'.join(map(str, path))}.")


def bert_table(model: BertModel) -> dict[str, Slot]:
    """Hugging Face key (no prefix) -> slot of the model's parameter."""
    return dict(_slot(path, variable)
                for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _is_dropped(key: str, has_pooler: bool) -> bool:
    return (key in _BUFFER_KEYS or key.startswith(_HEAD_PREFIXES)
            or (not has_pooler and key.startswith(_POOLER_PREFIX)))


def bert_params_from_state_dict(model: BertModel, state_dict: Mapping[str, Any],
                                prefix: str = "") -> BertModel:
    """Copies a Hugging Face (torch layout) BERT state dict into `model`, in place.

    Only keys that start with `prefix` are considered (so the BERT part of a larger
    checkpoint, e.g. CT-CLIP's ``text_transformer.``, can be loaded directly).  Id
    buffers, ``cls.*`` pretraining heads and, for a model without pooler, ``pooler.*``
    are dropped.  Values may be numpy arrays or anything `np.asarray` accepts; they are
    cast to the parameter dtype (float32).

    Raises:
      StateDictMismatchError (a ValueError): listing every missing, unexpected and
        mis-shaped key at once; the model is left unchanged.
    """
    has_pooler = model.pooler is not None
    load_state_dict(bert_table(model), state_dict, prefix=prefix,
                    ignored=lambda key: _is_dropped(key, has_pooler), what="BERT")
    return model


def bert_state_dict_from_model(model: BertModel, prefix: str = "") -> dict[str, np.ndarray]:
    """The model's parameters as a Hugging Face state dict (torch [out, in] layout)."""
    return export_state_dict(bert_table(model), prefix)


# --------------------------------------------------------------------------- file I/O


def _read_safetensors(paths: Iterable[Path]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file  # bf16 comes back as ml_dtypes.bfloat16

    state: dict[str, np.ndarray] = {}
    for path in paths:
        state.update(load_file(str(path)))
    return state


def _read_torch_bin(paths: Iterable[Path]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:  # torch is an optional dependency (extra "convert")
        raise ImportError(
            "Reading pytorch_model.bin checkpoints needs PyTorch (pip install "
            "'ct-rate-jax[convert]'); or convert the checkpoint to model.safetensors.") from err
    state: dict[str, np.ndarray] = {}
    for path in paths:
        # weights_only=True: never unpickle arbitrary objects from a downloaded file.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        for key, tensor in loaded.items():
            if tensor.is_floating_point():
                tensor = tensor.to(torch.float32)  # numpy has no bfloat16
            state[key] = tensor.numpy()
    return state


def _shards(directory: Path, index_name: str) -> list[Path]:
    index = json.loads((directory / index_name).read_text())
    return [directory / name for name in sorted(set(index["weight_map"].values()))]


def read_hf_state_dict(directory: str | Path) -> dict[str, np.ndarray]:
    """Reads the weights of a Hugging Face model directory as numpy arrays.

    Preference: model.safetensors, its sharded index, pytorch_model.bin, its index.
    """
    directory = Path(directory)
    if (directory / "model.safetensors").is_file():
        return _read_safetensors([directory / "model.safetensors"])
    if (directory / "model.safetensors.index.json").is_file():
        return _read_safetensors(_shards(directory, "model.safetensors.index.json"))
    if (directory / "pytorch_model.bin").is_file():
        return _read_torch_bin([directory / "pytorch_model.bin"])
    if (directory / "pytorch_model.bin.index.json").is_file():
        return _read_torch_bin(_shards(directory, "pytorch_model.bin.index.json"))
    raise FileNotFoundError(
        f"No model.safetensors(.index.json) or pytorch_model.bin(.index.json) in {directory}.")


def _encoder_prefix(state_dict: Mapping[str, Any]) -> str:
    """"bert." for checkpoints of BertFor* / CXR-BERT models, "" for a bare BertModel."""
    return "bert." if any(k.startswith("bert.") for k in state_dict) else ""


def load_hf_bert(directory: str | Path, *, dtype: Any = None, add_pooler: bool = False,
                 rngs: nnx.Rngs | None = None) -> tuple[BertModel, BertConfig]:
    """Builds a `BertModel` from a local Hugging Face directory (config.json + weights).

    Works for a bare BertModel checkpoint and for models that wrap it under ``bert.``
    (BertForMaskedLM, BertForPreTraining, CXR-BERT); their heads are ignored.

    Args:
      directory: holds config.json and model.safetensors / pytorch_model.bin (or shards).
      dtype: compute dtype of the returned model (parameters are float32).
      add_pooler: also load the pooler (the checkpoint must have one).
      rngs: only used for the dropout stream of the returned model.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {directory}: not a Hugging Face model "
                                "directory.")
    config = BertConfig.from_json_file(directory / "config.json")
    state_dict = read_hf_state_dict(directory)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    model = BertModel(config, rngs=rngs, dtype=dtype, add_pooler=add_pooler)
    bert_params_from_state_dict(model, state_dict, prefix=_encoder_prefix(state_dict))
    return model, config
