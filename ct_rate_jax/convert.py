"""The released CT-CLIP PyTorch checkpoints <-> the Flax model.

    model = load_official("CT-CLIP_v2.pt", RELEASED_V2)
    convert_checkpoint("CT-CLIP_v2.pt", RELEASED_V2, "converted/ct_clip_v2")   # a model dir
    write_torch_checkpoint(official_state_dict(model), "back.pt")              # and back

`config` holds the official constructor arguments: ``ctvit`` (CTViT kwargs),
``bert_config`` (the Hugging Face BertConfig as a dict), ``dim_image``, ``dim_text`` and
``dim_latent``, as in tests/fixtures/official_ctclip_tiny/config_A.json; `RELEASED_V2`
is the released files' architecture.  The files are read with
``torch.load(..., weights_only=True)`` (never arbitrary unpickling); torch is needed
only here (``pip install 'ct-rate-jax[convert]'``) and is imported lazily.

Released files and their layout:
  CT-CLIP_v2.pt, CT_VocabFine_v2.pt   the CTCLIP state dict
  CT_LiPro_v2.pt (ClassFine)          the same under `trained_model.`, plus the linear
                                      head `classifier.{weight [18, 512], bias [18]}`
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np

from ct_rate_jax import checkpoint_io
from ct_rate_jax.models.bert import BertConfig
from ct_rate_jax.models.ct_clip import CTCLIP, CTCLIPConfig
from ct_rate_jax.models.ct_clip_weights import (ct_clip_from_state_dict, ct_clip_keys,
                                                ct_clip_to_state_dict, official_unused_entries)
from ct_rate_jax.models.ctvit import CTViTConfig
from ct_rate_jax.models.weight_io import StateDictMismatchError

# The LiPro (ClassFine) release wraps the CT-CLIP weights in `trained_model.`.
LIPRO_PREFIX = "trained_model."
LIPRO_HEAD = ("classifier.weight", "classifier.bias")
VARIANTS = ("clip", "vocabfine", "lipro")

# The architecture of the three released v2 files (the official run_zero_shot.py
# arguments, with CXR-BERT-specialized's config as the text tower).
RELEASED_V2: dict[str, Any] = {
    "ctvit": dict(dim=512, codebook_size=8192, image_size=480, patch_size=20,
                  temporal_patch_size=10, spatial_depth=4, temporal_depth=4, dim_head=32,
                  heads=8),
    "bert_config": dict(model_type="bert", vocab_size=30522, hidden_size=768,
                        num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                        layer_norm_eps=1e-12, pad_token_id=0),
    "dim_image": 294912,
    "dim_text": 768,
    "dim_latent": 512,
}

# CTViTConfig fields that are ours, not official CTViT arguments; the official code
# behaves as use_vq=True, temporal_peg_layout="official", patch_input_norm=True.
_OUR_CTVIT_OPTIONS = ("use_vq", "vq_decay", "temporal_peg_layout", "patch_input_norm")


def official_config(config: Mapping[str, Any]) -> CTCLIPConfig:
    """Our CTCLIPConfig for the official constructor arguments (released-model quirks on)."""
    official_args = {f.name for f in dataclasses.fields(CTViTConfig)} - set(_OUR_CTVIT_OPTIONS)
    unknown = sorted(set(config["ctvit"]) - official_args)
    if unknown:
        raise ValueError(f"ctvit: unknown CTViT argument(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(official_args))})")
    ctvit = CTViTConfig(**config["ctvit"], use_vq=True, temporal_peg_layout="official")
    text = BertConfig.from_dict(config["bert_config"])
    if config.get("dim_image", ctvit.pooled_features) != ctvit.pooled_features:
        raise ValueError(f"dim_image {config['dim_image']} does not match the CT-ViT token "
                         f"grid: (image_size / patch_size)^2 * dim = {ctvit.pooled_features}")
    if config.get("dim_text", text.hidden_size) != text.hidden_size:
        raise ValueError(f"dim_text {config['dim_text']} differs from the BERT hidden size "
                         f"{text.hidden_size}")
    return CTCLIPConfig(ctvit=ctvit, text=text, dim_latent=config["dim_latent"])


def official_incompatibilities(config: CTCLIPConfig) -> list[str]:
    """Settings under which our model computes something the official code cannot."""
    official = {"ctvit.use_vq": True, "ctvit.temporal_peg_layout": "official",
                "ctvit.patch_input_norm": True, "ctvit.ff_mult": 4.0, "text_pooling": "cls",
                "max_logit_scale": None, "init_logit_bias": None}
    values = {"ctvit.use_vq": config.ctvit.use_vq,
              "ctvit.temporal_peg_layout": config.ctvit.temporal_peg_layout,
              "ctvit.patch_input_norm": config.ctvit.patch_input_norm,
              "ctvit.ff_mult": config.ctvit.ff_mult, "text_pooling": config.text_pooling,
              "max_logit_scale": config.max_logit_scale,
              "init_logit_bias": config.init_logit_bias}  # SigLIP's bias: no official slot
    return [f"{k} = {values[k]!r} (official: {v!r})" for k, v in official.items()
            if values[k] != v]


# ----------------------------------------------------------------------------------
# Reading official files
# ----------------------------------------------------------------------------------

def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError("reading and writing official .pt checkpoints needs PyTorch: "
                          "pip install 'ct-rate-jax[convert]'") from error
    return torch


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch state dict as numpy arrays (floats as float32), loaded with weights_only=True.

    float32 arrays share memory with the loaded tensors: deleting an entry frees it.
    (The file is read rather than memory-mapped: mapped pages that have been read stay
    resident until every tensor of the file is gone, which would keep a second copy of
    the weights in memory for the whole conversion.)
    """
    torch = _import_torch()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an unpickling refusal (weights_only) or a corrupt file
        if "Weights only load failed" in str(error):
            # torch's own text suggests weights_only=False, i.e. running the file's code.
            found = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
            raise ValueError(
                f"refusing {path}: it holds Python objects other than tensors, and "
                "unpickling them could run code (read with torch.load(weights_only=True))"
                + (f"; {found[0]}" if found else "")) from error
        raise ValueError(f"cannot read {path} as a torch checkpoint "
                         f"(torch.load with weights_only=True): {error}") from error
    if isinstance(loaded, Mapping) and "state_dict" in loaded and not any(
            hasattr(v, "shape") for v in loaded.values()):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(hasattr(v, "numpy") for v in loaded.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {key: (value.float() if value.is_floating_point() else value).numpy()
            for key, value in loaded.items()}


def checkpoint_prefix(state_dict: Mapping[str, Any]) -> str:
    """'' for CT-CLIP / VocabFine files, 'trained_model.' for LiPro (ClassFine) files."""
    return LIPRO_PREFIX if any(k.startswith(LIPRO_PREFIX) for k in state_dict) else ""


def resolve_variant(state_dict: Mapping[str, Any], path: str | os.PathLike,
                    variant: str | None = None) -> str:
    """The release a state dict is, checked against `variant` when one is given.

    LiPro files are recognised by their layout; CT-CLIP and VocabFine files have the
    same layout, so without `variant` a file whose name contains "vocabfine" counts as
    VocabFine and any other as CT-CLIP.
    """
    is_lipro = (checkpoint_prefix(state_dict) == LIPRO_PREFIX
                or any(k in state_dict for k in LIPRO_HEAD))
    if variant is None:
        if is_lipro:
            return "lipro"
        return "vocabfine" if "vocabfine" in os.path.basename(path).lower() else "clip"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    if (variant == "lipro") != is_lipro:
        found = ("a LiPro (ClassFine) file: trained_model.* and classifier.*" if is_lipro
                 else "a CT-CLIP / VocabFine file: no trained_model.* or classifier.*")
        raise ValueError(f"{path} is {found}, not variant {variant!r}; "
                         "omit --variant to detect it")
    return variant


def split_lipro_head(state_dict: dict[str, Any], dim_latent: int) -> dict[str, np.ndarray]:
    """Removes and returns the LiPro head; any other key outside `trained_model.` is an error."""
    problems = [f"    {k}" for k in LIPRO_HEAD if k not in state_dict]
    stray = sorted(k for k in state_dict
                   if not k.startswith(LIPRO_PREFIX) and k not in LIPRO_HEAD)
    if problems or stray:
        raise StateDictMismatchError("\n".join(
            ["cannot load the LiPro file's head:"]
            + ([f"  {len(problems)} missing key(s):"] + problems if problems else [])
            + ([f"  {len(stray)} unexpected key(s):"] + [f"    {k}" for k in stray]
               if stray else [])))
    head = {k: np.array(state_dict.pop(k)) for k in LIPRO_HEAD}
    weight, bias = head["classifier.weight"], head["classifier.bias"]
    if weight.ndim != 2 or weight.shape[1] != dim_latent or bias.shape != weight.shape[:1]:
        raise StateDictMismatchError(
            f"cannot load the LiPro file's head: classifier.weight {weight.shape} and "
            f"classifier.bias {bias.shape} do not fit [classes, dim_latent = {dim_latent}]")
    return head


def official_model(state_dict: dict[str, Any], config: CTCLIPConfig, *, prefix: str = "",
                   consume: bool = False, dtype: Any = None) -> CTCLIP:
    """A CTCLIP holding an official state dict's weights, built without random init.

    With `consume`, entries are deleted from `state_dict` as they are loaded (see
    `ct_clip_from_state_dict`).
    """
    model = checkpoint_io.abstract_ctclip(config, dtype=dtype)
    ct_clip_from_state_dict(model, state_dict, prefix=prefix, consume=consume)
    return checkpoint_io.finish_model(model)


def load_official(checkpoint_path: str | os.PathLike, config: Mapping[str, Any], *,
                  dtype: Any = None) -> CTCLIP:
    """The official CT-CLIP model as a Flax CTCLIP with the checkpoint's weights."""
    ctclip_config = official_config(config)
    state_dict = read_torch_checkpoint(checkpoint_path)
    return official_model(state_dict, ctclip_config, prefix=checkpoint_prefix(state_dict),
                          consume=True, dtype=dtype)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_checkpoint(checkpoint_path: str | os.PathLike, config: Mapping[str, Any],
                       out_dir: str | os.PathLike, *, variant: str | None = None
                       ) -> dict[str, Any]:
    """Converts a released file into a model directory (`checkpoint_io`); returns the
    record written to its conversion.json.

    The model is built without random initialisation and the state dict is released
    as the model fills (the unused CLOOB projections first), so memory peaks at about
    1.6 times the file (v2: 2.8 GB peak RSS, 19 s on 2 CPU cores; docs/performance.md).
    """
    ctclip_config = official_config(config)  # a bad config fails before the file is read
    if os.path.exists(os.path.join(out_dir, checkpoint_io.WEIGHTS_DIR)):
        raise checkpoint_io.ModelDirectoryError(
            f"{out_dir} already holds converted weights; choose another --out or remove it")
    state_dict = read_torch_checkpoint(checkpoint_path)
    variant = resolve_variant(state_dict, checkpoint_path, variant)
    extras = (split_lipro_head(state_dict, ctclip_config.dim_latent) if variant == "lipro"
              else {})
    prefix = checkpoint_prefix(state_dict)
    source_keys = list(state_dict)
    model = official_model(state_dict, ctclip_config, prefix=prefix, consume=True)
    used = set(ct_clip_keys(model, prefix))
    record = {
        "source": os.path.abspath(checkpoint_path),
        "sha256": file_sha256(checkpoint_path),
        "source_bytes": os.path.getsize(checkpoint_path),
        "variant": variant,
        "official_config": dict(config, dim_image=ctclip_config.ctvit.pooled_features,
                                dim_text=ctclip_config.text.hidden_size),
        "ignored_keys": sorted(k for k in source_keys if k not in used),
        "versions": {name: metadata.version(name) for name in ("torch", "jax", "flax")},
    }
    return checkpoint_io.save_converted(out_dir, model, extras=extras, conversion=record)


# ----------------------------------------------------------------------------------
# Writing official files
# ----------------------------------------------------------------------------------

def official_state_dict(model: CTCLIP, extras: Mapping[str, np.ndarray] | None = None, *,
                        placeholders: bool = True, position_ids: bool = False
                        ) -> dict[str, np.ndarray]:
    """The state dict the official code loads: CTCLIP's, or ClassFine's when `extras`
    holds the LiPro head (then under `trained_model.`, plus `classifier.*`).

    Args:
      placeholders: add the official entries CT-CLIP never uses
        (`official_unused_entries`), so the official `load_state_dict` (strict) accepts
        the file; without them, load it with `strict=False`.
      position_ids: add BERT's `embeddings.position_ids` buffer, as the released files
        carry it: transformers < 4.31 expects it, later versions reject it in a strict load.

    Raises:
      ValueError: the model's config computes something the official code cannot.
    """
    problems = official_incompatibilities(model.config)
    if problems:
        raise ValueError("the official CT-CLIP cannot reproduce this model: "
                         + "; ".join(problems))
    extras = dict(extras or {})
    prefix = LIPRO_PREFIX if "classifier.weight" in extras else ""
    state = ct_clip_to_state_dict(model, prefix)
    if placeholders:
        state.update(official_unused_entries(model.config, prefix))
    if position_ids:
        state[prefix + "text_transformer.embeddings.position_ids"] = np.arange(
            model.config.text.max_position_embeddings, dtype=np.int64)[None]
    state.update(extras)
    return state


def write_torch_checkpoint(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """torch.save of the arrays as tensors (written to a temporary name, then renamed)."""
    torch = _import_torch()
    with warnings.catch_warnings():
        # Exported arrays may be read-only views of jax buffers; torch only reads them.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        tensors = {k: torch.from_numpy(np.asarray(v, order="C")) for k, v in state.items()}
    tmp = f"{path}.tmp"
    torch.save(tensors, tmp)
    os.replace(tmp, path)
