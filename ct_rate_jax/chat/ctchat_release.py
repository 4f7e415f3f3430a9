"""Released (LLaVA-style) CT-CHAT models -> a CT-CHAT checkpoint directory (`chat.checkpoint`).

The original (ibrahimethemhamamci/CT-CHAT, LLaVA's `train.py` with `--lora_enable`) saves
a fine-tuned model as a directory next to the base LLM (e.g. Meta-Llama-3.1-8B-Instruct):

  config.json                 LLaVA config: the LLM's fields with `vocab_size` = base + 5
                              (`<pad>` and the four question-type tokens), plus
                              `mm_projector_type`, `mm_hidden_size`, ...
  adapter_config.json         PEFT LoRA settings (r 128, lora_alpha 256, all linear
  adapter_model.safetensors   layers of the LLM but lm_head); keys
    (or adapter_model.bin)      base_model.model.<module>.lora_{A,B}.weight
  non_lora_trainables.bin     every other trained tensor: base_model.model.model.mm_projector.*
                              and, when they were trained, the resized
                              base_model.model.model.embed_tokens.weight and
                              base_model.model.lm_head.weight

Its loader (`llava/model/builder.py`) takes the base weights, adds `<pad>` and the tags
`<multiple_choice>`, `<long_answer>`, `<short_answe>` (sic), `<report_generation>` to the
base tokenizer, renames the non-LoRA keys (drops `base_model.`, then `model.` when keys
start with `model.model.`) and loads them over the base model, then merges the LoRA
update W += B A * alpha / r.  `convert_release` does the same, tensor by tensor: each
base tensor is read, replaced or resized, optionally merged, and written to the output
shards, so no more than one shard of the model is in memory.  A merged LLaVA directory
(LLM and `model.mm_projector.*` weights in one model) converts with `convert_merged`.

Only safe formats are read: safetensors, and `.bin` files with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ct_rate_jax.chat import checkpoint as ckpt
from ct_rate_jax.chat.conversation import OFFICIAL_ADDED_TOKENS
from ct_rate_jax.chat.peft_adapter import PEFT_PREFIX, load_adapter
from ct_rate_jax.chat.projector import (STATE_DICT_MARKER, Projector, ProjectorConfig,
                                        projector_from_state_dict, projector_to_state_dict)
from ct_rate_jax.models.llm_config import LLMConfig
from ct_rate_jax.models.llm_weights import SAFETENSORS_INDEX, load_tokenizer

PAD_TOKEN = "<pad>"
NON_LORA_FILE = "non_lora_trainables.bin"
EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
# Parts of a LLaVA model that are not the LLM or the projector (the unused CLIP tower).
_IGNORED_PREFIXES = ("model.vision_tower.", "model.image_newline")
DTYPES = ("float32", "bfloat16", "float16")


class ReleaseError(ValueError):
    """A release directory that does not fit what the original saves."""


# --------------------------------------------------------------------------- reading


class TensorSource:
    """The tensors of a Hugging Face model directory, read one at a time as torch tensors:
    `model.safetensors`, sharded safetensors with their index, or `pytorch_model*.bin`
    (`torch.load(weights_only=True, mmap=True)`)."""

    def __init__(self, directory: str | os.PathLike):
        import torch
        from safetensors import safe_open

        self.directory = Path(directory)
        self._stack = contextlib.ExitStack()
        self._files: dict[str, Any] = {}
        d = self.directory
        if (d / SAFETENSORS_INDEX).is_file() or (d / "model.safetensors").is_file():
            if (d / SAFETENSORS_INDEX).is_file():
                names = json.loads((d / SAFETENSORS_INDEX).read_text())["weight_map"]
            else:
                names = None
            paths = sorted(set(names.values())) if names else ["model.safetensors"]
            for name in paths:
                if not (d / name).is_file():
                    raise FileNotFoundError(f"{d / SAFETENSORS_INDEX} lists {name}, which does "
                                            "not exist")
                handle = self._stack.enter_context(safe_open(str(d / name), framework="pt"))
                for key in handle.keys():
                    self._files[key] = handle
        else:
            index = d / "pytorch_model.bin.index.json"
            if index.is_file():
                paths = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            elif (d / "pytorch_model.bin").is_file():
                paths = ["pytorch_model.bin"]
            else:
                raise FileNotFoundError(f"no model.safetensors, {SAFETENSORS_INDEX} or "
                                        f"pytorch_model.bin in {d}")
            for name in paths:
                state = torch.load(d / name, map_location="cpu", weights_only=True, mmap=True)
                for key, value in state.items():
                    self._files[key] = {key: value}

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._files[key]
        if isinstance(handle, dict):
            return tuple(handle[key].shape)
        return tuple(handle.get_slice(key).get_shape())

    def get(self, key: str):
        handle = self._files[key]
        return handle[key] if isinstance(handle, dict) else handle.get_tensor(key)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_non_lora_trainables(path: str | os.PathLike) -> dict[str, Any]:
    """`non_lora_trainables.bin` with LLaVA's renaming (as `load_pretrained_model` does):
    `base_model.` is dropped, then `model.` when keys start with `model.model.`; keys are
    then the LLaVA model's own: `model.mm_projector.*`, `model.embed_tokens.weight`,
    `lm_head.weight`.  torch tensors, `weights_only=True`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the release's projector and resized "
                                "embedding rows)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ReleaseError(f"{path} does not hold a state dict (got {type(state).__name__})")
    state = {(k[len("base_model."):] if k.startswith("base_model.") else k): v
             for k, v in state.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    return state


def _as_torch(arrays: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent} ({what})")
    return json.loads(path.read_text())


def llm_hf_config(config: Mapping[str, Any], *, vocab_size: int | None = None,
                  pad_token_id: int | None = None) -> dict[str, Any]:
    """A plain Llama / Mistral config.json from a base or LLaVA config: the `mm_*` keys
    and LLaVA's model type (`llava_llama` -> `llama`) removed, vocabulary resized."""
    hf = {k: v for k, v in config.items() if not k.startswith("mm_")}
    for key in ("image_aspect_ratio", "tokenizer_padding_side", "tokenizer_model_max_length",
                "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj",
                "_name_or_path", "auto_map"):
        hf.pop(key, None)
    model_type = str(hf.get("model_type", "llama"))
    if model_type.startswith("llava_"):
        model_type = model_type[len("llava_"):]
    hf["model_type"] = model_type
    hf["architectures"] = ["MistralForCausalLM" if model_type == "mistral"
                           else "LlamaForCausalLM"]
    if vocab_size is not None:
        hf["vocab_size"] = vocab_size
    if pad_token_id is not None:
        hf["pad_token_id"] = pad_token_id
    LLMConfig.from_hf_config(hf)  # refuses what our LLM cannot reproduce, naming the key
    return hf


def release_tokenizer(base_dir: Path, lora_dir: Path | None):
    """The fine-tuned model's tokenizer: the release's own when it ships one, else the
    base tokenizer with `<pad>` (if it has no pad token) and the four question-type
    tokens added, in the original's order (`load_pretrained_model`)."""
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if lora_dir is not None and any((lora_dir / f).is_file() for f in tokenizer_files):
        return load_tokenizer(lora_dir), "release"
    tokenizer = load_tokenizer(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.add_tokens(list(OFFICIAL_ADDED_TOKENS), special_tokens=True)
    return tokenizer, "base + added tokens"


def _added_tokens(tokenizer, base_vocab: int) -> list[str]:
    """Tokens whose id is at or beyond the base vocabulary, in id order."""
    vocab = tokenizer.get_vocab()
    return [token for token, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= base_vocab]


# --------------------------------------------------------------------------- conversion


def _resized(tensor, rows: int):
    """[V, H] -> [rows, H]: new rows are the mean of the old ones, as the original's
    `smart_tokenizer_and_embedding_resize` initialises them."""
    import torch

    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        raise ReleaseError(f"embedding has {tensor.shape[0]} rows, more than the release's "
                           f"vocab_size {rows}")
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(rows - tensor.shape[0], -1)], dim=0)


def _cast(tensor, dtype: str):
    import torch

    return tensor.to(getattr(torch, dtype)).contiguous()


def _llm_tensors(source: TensorSource, overrides: Mapping[str, Any], vocab_size: int,
                 lora: Mapping[str, Any], dtype: str, tied: bool) -> Iterator[tuple[str, Any]]:
    """(key, torch tensor) of the converted LLM in the base's order."""
    import torch

    for key in source.keys():
        if key.startswith(_IGNORED_PREFIXES) or STATE_DICT_MARKER in key:
            continue
        if key.endswith("rotary_emb.inv_freq") or (tied and key == LM_HEAD_KEY):
            continue
        tensor = overrides[key] if key in overrides else source.get(key)
        if key in (EMBED_KEY, LM_HEAD_KEY):
            tensor = _resized(tensor, vocab_size)
        module = key[:-len(".weight")] if key.endswith(".weight") else None
        if module in lora:
            delta = torch.from_numpy(lora[module].delta_kernel().T.copy())
            if tuple(delta.shape) != tuple(tensor.shape):
                raise ReleaseError(f"LoRA update for {module} has shape {tuple(delta.shape)}, "
                                   f"the base weight {tuple(tensor.shape)}")
            tensor = tensor.float() + delta
        yield key, _cast(tensor, dtype)


def _check_overrides(source: TensorSource, overrides: Mapping[str, Any], vocab_size: int,
                     path: Path) -> None:
    """Every non-LoRA tensor must replace a base tensor of the (resized) same shape."""
    problems = []
    keys = set(source.keys())
    for key, tensor in overrides.items():
        if key not in keys:
            problems.append(f"{key}: no such tensor in the base model")
            continue
        expected = source.shape(key)
        if key in (EMBED_KEY, LM_HEAD_KEY):
            expected = (vocab_size,) + expected[1:]
        if tuple(tensor.shape) != tuple(expected):
            problems.append(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(expected)}")
    if problems:
        raise ReleaseError(f"{path} does not fit the base model:\n  " + "\n  ".join(problems))


def _projector(state: Mapping[str, Any], llava_config: Mapping[str, Any], where: Path):
    from flax import nnx

    projector_state = {k: v.float().numpy() for k, v in state.items() if STATE_DICT_MARKER in k}
    if not projector_state:
        raise ReleaseError(f"{where} holds no '{STATE_DICT_MARKER}*' weights (the projector)")
    config = ProjectorConfig.from_llava_config(llava_config)
    projector = Projector(config, rngs=nnx.Rngs(0))
    projector_from_state_dict(projector, projector_state)
    return projector


def _write(out: Path, *, hf_config: dict, tensors, tokenizer, projector: Projector,
           adapter=None, added_tokens: list[str], source: dict, max_shard_bytes: int) -> None:
    """The checkpoint directory of `chat.checkpoint`, written from streamed tensors."""
    import shutil

    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch

    out.mkdir(parents=True, exist_ok=True)
    for stale in (ckpt.LLM_DIR, ckpt.LORA_DIR):
        if (out / stale).exists():
            shutil.rmtree(out / stale)
    llm_dir = out / ckpt.LLM_DIR
    llm_dir.mkdir()
    (llm_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    ckpt.write_safetensors_shards(tensors, llm_dir, max_shard_bytes=max_shard_bytes,
                                  save_file=save_torch)
    tokenizer.save_pretrained(str(llm_dir))
    lora_record = None
    if adapter is not None:
        adapter_config, weights = adapter
        ckpt.save_peft_adapter(out / ckpt.LORA_DIR, weights, adapter_config)
        lora_record = {"r": adapter_config.r, "lora_alpha": adapter_config.lora_alpha,
                       "use_rslora": adapter_config.use_rslora, "target_modules": sorted(weights)}
    save_file(projector_to_state_dict(projector), str(out / ckpt.PROJECTOR_FILE),
              metadata={"format": "pt"})
    if (out / ckpt.VISION_FILE).exists():
        (out / ckpt.VISION_FILE).unlink()
    config = {"format": ckpt.CHECKPOINT_FORMAT, "version": ckpt.FORMAT_VERSION,
              "projector": dataclasses.asdict(projector.config), "lora": lora_record,
              "vision": None, "quantize": True, "preprocessing": None,
              "added_tokens": added_tokens, "source": source}
    (out / ckpt.CONFIG_FILE).write_text(json.dumps(config, indent=2))


def convert_release(base_dir: str | os.PathLike, lora_dir: str | os.PathLike,
                    out: str | os.PathLike, *, merge: bool = True, dtype: str = "float32",
                    max_shard_bytes: int = ckpt.DEFAULT_SHARD_BYTES) -> dict[str, Any]:
    """A LoRA release (base LLM directory + LLaVA/PEFT directory) -> checkpoint `out`.

    merge: fold the LoRA update into the weights (as the original's loader does), else
      keep it as `out/lora/` (a PEFT adapter; `load_chat_checkpoint` wraps the layers).
    dtype: the LLM weights' storage dtype in `out`.
    Returns a summary (vocabulary sizes, added tokens, LoRA modules, ...).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
    base_dir, lora_dir, out = Path(base_dir), Path(lora_dir), Path(out)
    base_config = _read_json(base_dir / "config.json", "the base LLM's config")
    llava_config = _read_json(lora_dir / "config.json", "the LLaVA config of the release")
    if "mm_projector_type" not in llava_config:
        raise ReleaseError(f"{lora_dir / 'config.json'} has no mm_projector_type: not a "
                           "LLaVA / CT-CHAT config")
    llava_config = {**llava_config, "hidden_size": llava_config.get(
        "hidden_size", base_config["hidden_size"])}
    adapter_config, lora, other = load_adapter(lora_dir)
    # PEFT may save resized embeddings with the adapter (save_embedding_layers); they are
    # the same tensors non_lora_trainables.bin holds, which wins when both have them.
    other = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v
             for k, v in other.items()}
    unsupported = sorted(set(other) - {EMBED_KEY, LM_HEAD_KEY})
    if unsupported:
        raise ReleaseError(f"{lora_dir}: the adapter holds non-LoRA tensors "
                           f"{unsupported[:5]} (modules_to_save), which are not supported")
    non_lora = {**_as_torch(other), **read_non_lora_trainables(lora_dir / NON_LORA_FILE)}
    projector = _projector(non_lora, llava_config, lora_dir / NON_LORA_FILE)
    tokenizer, tokenizer_from = release_tokenizer(base_dir, lora_dir)
    base_vocab = int(base_config["vocab_size"])
    vocab_size = int(llava_config.get("vocab_size", len(tokenizer)))
    if len(tokenizer) > vocab_size:
        raise ReleaseError(f"the tokenizer ({tokenizer_from}) has {len(tokenizer)} tokens, more "
                           f"than the release's vocab_size {vocab_size}")
    overrides = {k: v for k, v in non_lora.items()
                 if STATE_DICT_MARKER not in k and not k.startswith(_IGNORED_PREFIXES)}
    hf_config = llm_hf_config(base_config, vocab_size=vocab_size,
                              pad_token_id=tokenizer.pad_token_id)
    with TensorSource(base_dir) as source:
        _check_overrides(source, overrides, vocab_size, lora_dir / NON_LORA_FILE)
        linear = {k[:-len(".weight")] for k in source.keys() if k.endswith(".weight")}
        unknown = sorted(set(lora) - linear)
        if unknown:
            raise ReleaseError(f"{lora_dir}: LoRA modules not in the base model: {unknown[:10]}")
        tensors = _llm_tensors(source, overrides, vocab_size, lora if merge else {}, dtype,
                               bool(hf_config.get("tie_word_embeddings", False)))
        summary = {"base": str(base_dir), "lora": str(lora_dir), "merged_lora": merge,
                   "base_vocab_size": base_vocab, "vocab_size": vocab_size,
                   "resized_from_release": sorted(k for k in overrides
                                                  if k in (EMBED_KEY, LM_HEAD_KEY)),
                   "replaced_tensors": sorted(overrides), "lora_modules": len(lora),
                   "lora_rank": adapter_config.r, "lora_alpha": adapter_config.lora_alpha,
                   "tokenizer": tokenizer_from, "dtype": dtype}
        _write(out, hf_config=hf_config, tensors=tensors, tokenizer=tokenizer,
               projector=projector, adapter=None if merge else (adapter_config, lora),
               added_tokens=_added_tokens(tokenizer, base_vocab), source=summary,
               max_shard_bytes=max_shard_bytes)
    return summary


def convert_merged(merged_dir: str | os.PathLike, out: str | os.PathLike, *,
                   dtype: str = "float32",
                   max_shard_bytes: int = ckpt.DEFAULT_SHARD_BYTES) -> dict[str, Any]:
    """A merged LLaVA / CT-CHAT directory (LLaVA config.json, the LLM and
    `model.mm_projector.*` in one set of weights, tokenizer) -> checkpoint `out`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
    merged_dir, out = Path(merged_dir), Path(out)
    llava_config = _read_json(merged_dir / "config.json", "the LLaVA config")
    if "mm_projector_type" not in llava_config:
        raise ReleaseError(f"{merged_dir / 'config.json'} has no mm_projector_type: not a "
                           "LLaVA / CT-CHAT model (a plain LLM loads with load_hf_llm)")
    tokenizer = load_tokenizer(merged_dir)
    hf_config = llm_hf_config(llava_config)
    with TensorSource(merged_dir) as source:
        projector = _projector({k: source.get(k) for k in source.keys()
                                if STATE_DICT_MARKER in k}, llava_config, merged_dir)
        vocab_size = int(hf_config["vocab_size"])
        tensors = _llm_tensors(source, {}, vocab_size, {}, dtype,
                               bool(hf_config.get("tie_word_embeddings", False)))
        summary = {"merged": str(merged_dir), "vocab_size": vocab_size, "dtype": dtype}
        _write(out, hf_config=hf_config, tensors=tensors, tokenizer=tokenizer,
               projector=projector, added_tokens=[t for t in tokenizer.get_added_vocab()
                                                  if t in OFFICIAL_ADDED_TOKENS + (PAD_TOKEN,)],
               source=summary, max_shard_bytes=max_shard_bytes)
    return summary

