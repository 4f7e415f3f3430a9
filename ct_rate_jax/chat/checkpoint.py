"""The CT-CHAT model directory: LLM, projector, optional LoRA and vision encoder, tokenizer.

  DIR/config.json              {"format": "ct-rate-jax/ct-chat", "version": 1,
                                "projector": ProjectorConfig fields,
                                "lora": {"r", "lora_alpha", "use_rslora", "target_modules"} | null,
                                "vision": CTViTConfig fields | null,
                                "quantize": pass CT-ViT tokens through its codebook,
                                "preprocessing": PreprocessConfig fields of the training
                                                 volumes (user scans get the same) | null,
                                "added_tokens": ["<pad>", "<multiple_choice>", ...],
                                "source": free-form provenance (e.g. the converted release)}
  DIR/llm/                     a Hugging Face model directory: config.json,
                               model.safetensors (or shards + model.safetensors.index.json),
                               tokenizer files (with the added tokens and chat template)
  DIR/projector.safetensors    the projector under its official names (model.mm_projector.*)
  DIR/lora/                    only when LoRA is kept separate: a PEFT adapter
                               (adapter_config.json, adapter_model.safetensors)
  DIR/vision.safetensors       only with a vision encoder: CT-ViT state by nnx path ("a/b/0/c")

Everything is safetensors, read tensor by tensor: `llm/` goes through
`llm_weights.load_hf_llm`, which builds each parameter straight in its sharding on the
mesh, so loading a 70B model never needs it whole on one host.  Keeping the LLM in the
Hugging Face layout also means `transformers` (and `peft`, for `lora/`) open the same
files, which is how the parity tests check them.  Saving gathers one tensor at a time
to the host (a single-host operation; conversion runs on one machine).

`experiments.finetune_chat` writes this directory as `<workdir>/model/`,
`experiments.convert_ctchat` as its `--out`; `load_ctchat_model` reads either (or a
finetune workdir) as one `CTChat` for `experiments.chat`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ct_rate_jax.chat import lora as lora_lib
from ct_rate_jax.chat.peft_adapter import (PEFT_PREFIX, AdapterConfig, LoRAWeights,
                                           assign_lora, load_adapter, merged_kernel)
from ct_rate_jax.chat.projector import (Projector, ProjectorConfig, projector_from_state_dict,
                                        projector_to_state_dict)
from ct_rate_jax.models.llm import LLM, LLMConfig
from ct_rate_jax.models.llm_weights import SAFETENSORS_INDEX, load_hf_llm, load_tokenizer

CHECKPOINT_FORMAT = "ct-rate-jax/ct-chat"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
LLM_DIR = "llm"
LORA_DIR = "lora"
PROJECTOR_FILE = "projector.safetensors"
VISION_FILE = "vision.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_SHARD_BYTES = 4 << 30


class ChatCheckpointError(ValueError):
    """A CT-CHAT checkpoint directory that is incomplete or inconsistent."""


@dataclasses.dataclass
class ChatCheckpoint:
    """What `load_chat_checkpoint` returns.

    `llm` carries `LoRALinear` layers when the checkpoint keeps LoRA separate and it was
    not merged on loading; `lora` is then the adapter's config.
    """

    llm: LLM
    llm_config: LLMConfig
    projector: Projector
    projector_config: ProjectorConfig
    tokenizer: Any
    config: dict[str, Any]
    lora: AdapterConfig | None = None
    vision: nnx.Module | None = None
    vision_config: Any = None


# --------------------------------------------------------------------------- LLM <-> HF


def _base_path(path: Sequence[Any]) -> tuple[Any, ...] | None:
    """nnx path of an LLM parameter -> its path in the plain (un-LoRA'd) model, or None
    for a LoRA matrix.  `...q_proj/base/kernel` -> `...q_proj/kernel`."""
    if path[-1] in ("lora_a", "lora_b"):
        return None
    if len(path) >= 2 and path[-2] == "base":
        return tuple(path[:-2]) + (path[-1],)
    return tuple(path)


def llm_tensors(llm: LLM):
    """Yields (Hugging Face key, numpy array in the torch layout) for every base weight;
    LoRA layers contribute their base kernel (use `lora.merge_lora` first to fold them)."""
    from ct_rate_jax.models.llm_weights import _hf_key

    for path, variable in nnx.to_flat_state(nnx.state(llm, nnx.Param)):
        base = _base_path(path)
        if base is None:
            continue
        key, transposed = _hf_key(base)
        array = np.asarray(jax.device_get(variable.get_value()))
        yield key, np.ascontiguousarray(array.T if transposed else array)


def write_safetensors_shards(tensors, directory: Path, *,
                             max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                             save_file=None) -> list[str]:
    """Writes (key, array) pairs as `model.safetensors`, or as numbered shards with
    `model.safetensors.index.json` when they exceed `max_shard_bytes`; at most one
    shard's tensors are held in memory.  Arrays are numpy, or torch tensors with
    `save_file=safetensors.torch.save_file`.  Returns the file names."""
    if save_file is None:
        from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size, names, weight_map = 0, [], {}

    def flush():
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shards[-1], str(directory / name), metadata={"format": "pt"})
        names.append(name)
        for key in shards[-1]:
            weight_map[key] = name

    for key, array in tensors:
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            flush()
            shards[-1], size = {}, 0
        shards[-1][key] = array
        size += array.nbytes
    flush()
    if len(names) == 1:
        os.replace(directory / names[0], directory / "model.safetensors")
        return ["model.safetensors"]
    renamed = {}
    for i, name in enumerate(names):
        final = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        os.replace(directory / name, directory / final)
        renamed[name] = final
    index = {"metadata": {}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return list(renamed.values())


def save_hf_llm(llm: LLM, directory: str | os.PathLike, *, tokenizer=None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """`llm`'s base weights and config as a Hugging Face directory (plus the tokenizer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(llm.config.to_hf_config(), indent=2))
    write_safetensors_shards(llm_tensors(llm), directory, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


# --------------------------------------------------------------------------- LoRA


def lora_from_model(llm: LLM) -> dict[str, LoRAWeights]:
    """The LoRA layers of `llm` as PEFT module name -> LoRAWeights (our layout)."""
    return {name: LoRAWeights(np.asarray(layer.lora_a[...], np.float32),
                              np.asarray(layer.lora_b[...], np.float32), float(layer.scaling))
            for name, layer in lora_lib.lora_modules(llm)}


def save_peft_adapter(directory: str | os.PathLike, weights: Mapping[str, LoRAWeights],
                      config: AdapterConfig) -> None:
    """A PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`) that
    `peft.PeftModel.from_pretrained` and `peft_adapter.load_adapter` read."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, pair in weights.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(pair.a_ir.T)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(pair.b_ro.T)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    targets = config.target_modules
    if targets is None:
        targets = sorted({name.rsplit(".", 1)[-1] for name in weights})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r,
        "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
        "lora_dropout": config.lora_dropout, "fan_in_fan_out": False, "bias": "none",
        "base_model_name_or_path": config.base_model_name_or_path, "inference_mode": True,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))


def merge_lora_weights(llm: LLM, weights: Mapping[str, LoRAWeights]) -> None:
    """Folds adapter weights into `llm`'s plain kernels in place, keeping each kernel's
    sharding and dtype.  Every module is checked before anything is written."""
    from ct_rate_jax.chat.peft_adapter import dotted_path

    modules = {tuple(path): module for path, module in nnx.iter_modules(llm)}
    problems, updates = [], []
    for name, pair in sorted(weights.items()):
        layer = modules.get(dotted_path(name))
        if not isinstance(layer, nnx.Linear):
            problems.append(f"{name}: " + ("no such module" if layer is None else
                                           f"a {type(layer).__name__}, not a linear layer"))
            continue
        if tuple(layer.kernel.shape) != (pair.a_ir.shape[0], pair.b_ro.shape[1]):
            problems.append(f"{name}: kernel {tuple(layer.kernel.shape)}, LoRA A "
                            f"{pair.a_ir.shape} B {pair.b_ro.shape}")
            continue
        updates.append((layer, pair))
    if problems:
        raise ChatCheckpointError("cannot merge the LoRA adapter into the LLM:\n  "
                                  + "\n  ".join(problems))
    for layer, pair in updates:
        value = layer.kernel.get_value()
        merged = merged_kernel(np.asarray(jax.device_get(value)), pair)
        layer.kernel.set_value(jax.device_put(jnp.asarray(merged, value.dtype), value.sharding))


def attach_lora(llm: LLM, weights: Mapping[str, LoRAWeights], config: AdapterConfig, *,
                mesh=None) -> None:
    """Wraps the adapter's modules in `LoRALinear` (rank / alpha per module as the
    adapter config says) and loads A and B, in place; on `mesh`, A and B are placed by
    their logical axes like the rest of the LLM."""
    from ct_rate_jax import sharding as sharding_rules
    from ct_rate_jax.chat.peft_adapter import dotted_path

    groups: dict[tuple[int, float], list[str]] = {}
    for name in weights:
        key = (config.rank_for(name), config.alpha_for(name))
        groups.setdefault(key, []).append(".".join(map(str, dotted_path(name))))
    for (rank, alpha), names in sorted(groups.items()):
        lora_lib.apply_lora(llm, names, rank=rank, alpha=alpha, rngs=nnx.Rngs(0),
                            use_rslora=config.use_rslora)
    assign_lora(llm, weights)
    if mesh is not None:
        state = nnx.state(llm, nnx.LoRAParam)
        nnx.update(llm, jax.device_put(state, sharding_rules.state_shardings(state, mesh)))


# --------------------------------------------------------------------------- vision


def _vision_tensors(vision: nnx.Module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): np.asarray(jax.device_get(variable.get_value()))
            for path, variable in nnx.to_flat_state(nnx.state(vision))}


def load_vision(path: Path, vision_config: Mapping[str, Any], *, dtype: Any = None):
    """A CT-ViT with the state saved in `vision.safetensors`."""
    from safetensors import safe_open

    from ct_rate_jax.models.ctvit import CTViT, CTViTConfig

    config = CTViTConfig(**vision_config)
    model = nnx.eval_shape(lambda: CTViT(config, rngs=nnx.Rngs(0), dtype=dtype))
    flat = nnx.to_flat_state(nnx.state(model))
    with safe_open(str(path), framework="numpy") as handle:
        expected = {"/".join(map(str, p)): v for p, v in flat}
        stored = set(handle.keys())
        missing, unexpected = sorted(set(expected) - stored), sorted(stored - set(expected))
        mis_shaped = [f"{k}: {tuple(handle.get_slice(k).get_shape())} vs {tuple(v.shape)}"
                      for k, v in expected.items()
                      if k in stored and tuple(handle.get_slice(k).get_shape()) != tuple(v.shape)]
        if missing or unexpected or mis_shaped:
            raise ChatCheckpointError(
                f"{path} does not fit the CT-ViT in its config.json: missing {missing}, "
                f"unexpected {unexpected}, mis-shaped {mis_shaped}")
        for key, variable in expected.items():
            variable.set_value(jnp.asarray(handle.get_tensor(key), variable.dtype))
    return model, config


# --------------------------------------------------------------------------- save / load


def save_chat_checkpoint(directory: str | os.PathLike, *, llm: LLM, projector: Projector,
                         tokenizer=None, lora_config: AdapterConfig | None = None,
                         merge_lora: bool = False, vision: nnx.Module | None = None,
                         added_tokens: Sequence[str] = (), source: Mapping[str, Any] | None = None,
                         preprocessing: Mapping[str, Any] | None = None, quantize: bool = True,
                         max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Writes a CT-CHAT checkpoint directory (layout in the module docstring).

    Args:
      llm: the language model; its `LoRALinear` layers (if any) are saved as a separate
        PEFT adapter, or folded into the base weights with `merge_lora=True` (the
        model passed in is not changed).
      projector: the multimodal projector.
      tokenizer: a transformers tokenizer (saved into `llm/`), with its added tokens.
      lora_config: adapter settings to record (target_modules, dropout, ...); by default
        taken from the LoRA layers.
      vision: an optional `CTViT` to ship with the model (its config is recorded).
      added_tokens: the tokens added to the base LLM's tokenizer (recorded in config.json).
      source: provenance recorded as is (e.g. the converted release's paths).
      preprocessing: the `PreprocessConfig` fields of the volumes the vision encoder was
        trained on (`experiments.chat` brings user scans to that grid); None without one.
      quantize: `CTChatConfig.quantize` (tokens through the CT-ViT codebook).

    Returns the directory.  An existing `llm/`, `lora/` or weight file is replaced.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = lora_from_model(llm)
    if weights and merge_lora:
        llm = nnx.clone(llm)
        lora_lib.merge_lora(llm)
        weights = {}
    for stale in (LLM_DIR, LORA_DIR):
        if (directory / stale).exists():
            shutil.rmtree(directory / stale)
    save_hf_llm(llm, directory / LLM_DIR, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
    lora_record = None
    if weights:
        layers = dict(lora_lib.lora_modules(llm))
        first = next(iter(layers.values()))
        if lora_config is None:
            lora_config = AdapterConfig(r=first.rank, lora_alpha=first.alpha,
                                        use_rslora=first.use_rslora)
        ranks = {n: (l.rank, l.alpha) for n, l in layers.items()}
        if len(set(ranks.values())) > 1 and not (lora_config.rank_pattern
                                                  or lora_config.alpha_pattern):
            # Mixed ranks without patterns: record each module's own rank and alpha.
            lora_config = dataclasses.replace(
                lora_config, rank_pattern={n: r for n, (r, _) in ranks.items()},
                alpha_pattern={n: a for n, (_, a) in ranks.items()})
        save_peft_adapter(directory / LORA_DIR, weights, lora_config)
        lora_record = {"r": lora_config.r, "lora_alpha": lora_config.lora_alpha,
                       "use_rslora": lora_config.use_rslora,
                       "target_modules": sorted(weights)}
    from safetensors.numpy import save_file

    save_file(projector_to_state_dict(projector), str(directory / PROJECTOR_FILE),
              metadata={"format": "pt"})
    vision_record = None
    if vision is not None:
        save_file(_vision_tensors(vision), str(directory / VISION_FILE))
        vision_record = dataclasses.asdict(vision.config)
    elif (directory / VISION_FILE).exists():
        (directory / VISION_FILE).unlink()
    config = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION,
              "projector": dataclasses.asdict(projector.config), "lora": lora_record,
              "vision": vision_record, "quantize": bool(quantize),
              "preprocessing": None if preprocessing is None else dict(preprocessing),
              "added_tokens": list(added_tokens), "source": dict(source or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory


def read_chat_config(directory: str | os.PathLike) -> dict[str, Any]:
    """config.json of a CT-CHAT checkpoint, checked for format and required files."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a CT-CHAT checkpoint "
                                "(convert a release with python -m experiments.convert_ctchat)")
    config = json.loads(path.read_text())
    if config.get("format") != CHECKPOINT_FORMAT:
        hint = (" (this looks like a LLaVA / CT-CHAT release: convert it with "
                "python -m experiments.convert_ctchat)" if "mm_projector_type" in config else "")
        raise ChatCheckpointError(f"{path}: format is {config.get('format')!r}, expected "
                                  f"{CHECKPOINT_FORMAT!r}{hint}")
    if config.get("version") != FORMAT_VERSION:
        raise ChatCheckpointError(f"{path}: version {config.get('version')!r} is not "
                                  f"supported (expected {FORMAT_VERSION})")
    needed = [LLM_DIR + "/config.json", PROJECTOR_FILE]
    if config.get("lora"):
        needed += [f"{LORA_DIR}/{ADAPTER_CONFIG}", f"{LORA_DIR}/{ADAPTER_WEIGHTS}"]
    if config.get("vision"):
        needed.append(VISION_FILE)
    absent = [name for name in needed if not (directory / name).is_file()]
    if absent:
        raise FileNotFoundError(f"CT-CHAT checkpoint {directory} lacks {', '.join(absent)}")
    return config


def load_chat_checkpoint(directory: str | os.PathLike, mesh=None, *, dtype: Any = None,
                         param_dtype: Any = jnp.float32, merge_lora: bool = False,
                         load_vision_encoder: bool = True,
                         tokenizer: bool = True) -> ChatCheckpoint:
    """Loads a directory written by `save_chat_checkpoint`.

    Args:
      mesh: place the LLM's parameters by their logical axes on this mesh (each device
        reads only its block); None = the default device.
      dtype / param_dtype: the LLM's compute and storage dtypes.
      merge_lora: fold a separate LoRA adapter into the weights (plain model for
        serving); otherwise the adapter's modules become `LoRALinear` layers.
      load_vision_encoder: also build the CT-ViT when the checkpoint has one.
      tokenizer: load the tokenizer from `llm/` (False: `ChatCheckpoint.tokenizer` is None).
    """
    directory = Path(directory)
    config = read_chat_config(directory)
    llm, llm_config = load_hf_llm(directory / LLM_DIR, mesh=mesh, dtype=dtype,
                                  param_dtype=param_dtype)
    adapter_config = None
    if config.get("lora"):
        adapter_config, weights, _ = load_adapter(directory / LORA_DIR)
        if merge_lora:
            merge_lora_weights(llm, weights)
        else:
            attach_lora(llm, weights, adapter_config, mesh=mesh)
    from safetensors.numpy import load_file

    projector_config = ProjectorConfig(**config["projector"])
    if projector_config.hidden_size != llm_config.hidden_size:
        raise ChatCheckpointError(f"{directory / CONFIG_FILE}: projector hidden_size "
                                  f"{projector_config.hidden_size} != the LLM's "
                                  f"{llm_config.hidden_size}")
    # Abstract, then filled: no random initialisation to throw away.
    projector = nnx.eval_shape(lambda: Projector(projector_config, rngs=nnx.Rngs(0)))
    projector_from_state_dict(projector, load_file(str(directory / PROJECTOR_FILE)))
    vision = vision_config = None
    if config.get("vision") and load_vision_encoder:
        vision, vision_config = load_vision(directory / VISION_FILE, config["vision"])
    return ChatCheckpoint(llm=llm, llm_config=llm_config, projector=projector,
                          projector_config=projector_config,
                          tokenizer=load_tokenizer(directory / LLM_DIR) if tokenizer else None,
                          config=config, lora=adapter_config, vision=vision,
                          vision_config=vision_config)


# --------------------------------------------------------------------------- CTChat


LEGACY_SERVING_CONFIG = "chat_config.json"  # <workdir>/model/ before this format


def resolve_chat_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory `path` names: itself, or `path/model` for a
    `finetune_chat` workdir.  Anything else is one error line saying what it is."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    for candidate in (path, path / "model"):
        config = candidate / CONFIG_FILE
        if config.is_file() and (json.loads(config.read_text()).get("format")
                                 == CHECKPOINT_FORMAT or candidate == path):
            return candidate  # read_chat_config explains a config.json of another kind
    for candidate in (path, path / "model"):
        if (candidate / LEGACY_SERVING_CONFIG).is_file():
            raise ChatCheckpointError(
                f"{candidate} was written by an older experiments.finetune_chat "
                f"({LEGACY_SERVING_CONFIG} + orbax weights), which is no longer read: rerun "
                "finetune_chat with the same --workdir and --steps <its last step> to rewrite "
                "model/ from the newest checkpoint")
    if (path / "checkpoints").is_dir():
        raise ChatCheckpointError(
            f"{path} is a finetune_chat workdir without model/ (the run has not finished): "
            "rerun finetune_chat with the same --workdir (add --steps <the newest saved step> "
            "to stop there); it resumes and writes model/ at the end")
    raise FileNotFoundError(
        f"{path} is not a CT-CHAT checkpoint: expected {CONFIG_FILE} with format "
        f"{CHECKPOINT_FORMAT!r} (written by experiments.convert_ctchat --out, or by "
        "experiments.finetune_chat in <workdir>/model/) in it or in its model/ folder")


def load_ctchat_model(path: str | os.PathLike, mesh=None, *, dtype: Any = None,
                      param_dtype: Any = jnp.float32):
    """(CTChat, tokenizer, config.json contents) from a checkpoint directory or a
    finetune_chat workdir (`resolve_chat_checkpoint`), LoRA merged, in eval mode.

    `dtype` / `param_dtype`: the LLM's compute and storage dtypes (bf16 on accelerators).
    """
    from ct_rate_jax.chat.model import CTChat, CTChatConfig

    directory = resolve_chat_checkpoint(path)
    checkpoint = load_chat_checkpoint(directory, mesh, dtype=dtype, param_dtype=param_dtype,
                                      merge_lora=True)
    config = CTChatConfig(llm=checkpoint.llm_config, projector=checkpoint.projector_config,
                          ctvit=checkpoint.vision_config,
                          quantize=checkpoint.config.get("quantize", True))
    model = CTChat.from_parts(config, llm=checkpoint.llm, projector=checkpoint.projector,
                              vision=checkpoint.vision)
    model.eval()
    return model, checkpoint.tokenizer, checkpoint.config
