"""Hugging Face Llama / Mistral directories -> `ct_rate_jax.models.llm.LLM`, and tokenizers.

Weights are read tensor by tensor from the safetensors files (one `model.safetensors`
or the shards listed in `model.safetensors.index.json`) and each is built straight in
its target sharding with `jax.make_array_from_callback`: every device's shard is read
from the memory-mapped file as a slice, so no host ever holds a whole 70B model, nor
even a whole tensor that it only keeps part of.  The model is built with
`nnx.eval_shape` (no random initialisation), then filled.

The parameter path ``model/layers/0/self_attn/q_proj/kernel`` is the checkpoint key
``model.layers.0.self_attn.q_proj.weight``; Linear kernels are stored [in, out] here
and [out, in] in torch (a transposed read), everything else has the same layout.

Tensors may be stored in any dtype safetensors knows, bfloat16 included (the dtype of
real Llama checkpoints): numpy reads them as `ml_dtypes.bfloat16` blocks, which are cast
to the parameter's dtype exactly (bf16 -> float32 is lossless).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 with numpy: safetensors needs it)
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from ct_rate_jax import sharding as sharding_rules
from ct_rate_jax.models.llm import LLM, LLMConfig

# Checkpoint keys that are not weights: the rotary inverse-frequency buffers that old
# transformers versions saved (we recompute them from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SAFETENSORS_INDEX = "model.safetensors.index.json"


class LLMCheckpointError(ValueError):
    """A checkpoint directory whose tensors do not fit the configured model."""


def _hf_key(path: Sequence[Any]) -> tuple[str, bool]:
    """nnx parameter path -> (checkpoint key, stored transposed)."""
    *modules, leaf = (str(p) for p in path)
    if leaf == "kernel":
        return ".".join(modules + ["weight"]), True
    if leaf in ("embedding", "weight"):
        return ".".join(modules + ["weight"]), False
    if leaf == "bias":
        return ".".join(modules + ["bias"]), False
    raise ValueError(f"no checkpoint name for parameter {'/'.join(map(str, path))}")


def parameter_table(model: LLM) -> dict[str, tuple[nnx.Variable, bool]]:
    """checkpoint key -> (the model's parameter, stored transposed in the checkpoint)."""
    table = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, transposed = _hf_key(path)
        table[key] = (variable, transposed)
    return table


def _tensor_files(directory: Path) -> dict[str, Path]:
    """checkpoint key -> the safetensors file holding it."""
    from safetensors import safe_open

    if (directory / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((directory / SAFETENSORS_INDEX).read_text())["weight_map"]
        files = {key: directory / name for key, name in weight_map.items()}
        absent = sorted({str(p) for p in files.values() if not p.is_file()})
        if absent:
            raise FileNotFoundError(f"{directory / SAFETENSORS_INDEX} lists shard file(s) that "
                                    f"do not exist: {', '.join(absent)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="numpy") as handle:
            return {key: single for key in handle.keys()}
    found = sorted(p.name for p in directory.glob("*.bin"))
    hint = (f" (found {', '.join(found)}: convert them to safetensors first)" if found else "")
    raise FileNotFoundError(f"no model.safetensors or {SAFETENSORS_INDEX} in {directory}{hint}")


def _check_tensors(table, files: dict[str, Path], handles, config: LLMConfig,
                   directory: Path) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor."""
    ignored = {k for k in files if k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints still carry the copy
    missing = sorted(set(table) - set(files))
    unexpected = sorted(set(files) - set(table) - ignored)
    mis_shaped = []
    for key in sorted(set(table) & set(files)):
        variable, transposed = table[key]
        shape = tuple(handles[files[key]].get_slice(key).get_shape())
        expected = tuple(variable.shape)[::-1] if transposed else tuple(variable.shape)
        if shape != expected:
            mis_shaped.append(f"{files[key].name}: {key} has shape {shape}, the config needs "
                              f"{expected}")
    if missing or unexpected or mis_shaped:
        lines = [f"cannot load the checkpoint in {directory} into the "
                 f"{config.model_type} model its config.json describes:"]
        if missing:
            lines.append(f"  {len(missing)} missing tensor(s):")
            lines.extend(f"    {key}" for key in missing)
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected tensor(s):")
            lines.extend(f"    {files[key].name}: {key}" for key in unexpected)
        if mis_shaped:
            lines.append(f"  {len(mis_shaped)} mis-shaped tensor(s):")
            lines.extend(f"    {line}" for line in mis_shaped)
        raise LLMCheckpointError("\n".join(lines))


def _sharded_reader(handle, key: str, transposed: bool, dtype: Any):
    """A make_array_from_callback callback reading only the requested block."""

    def read(index: tuple[slice, ...]) -> np.ndarray:
        # A transposed (torch [out, in]) tensor: block [i, j] of ours is block [j, i] there.
        block = np.asarray(handle.get_slice(key)[tuple(index)[::-1] if transposed else index])
        return np.ascontiguousarray(block.T if transposed else block).astype(dtype)

    return read


def load_hf_llm(directory: str | Path, *, mesh: Mesh | None = None, dtype: Any = None,
                param_dtype: Any = jnp.float32,
                rules=sharding_rules.LOGICAL_AXIS_RULES) -> tuple[LLM, LLMConfig]:
    """Builds an `LLM` from a local Hugging Face directory (config.json + safetensors).

    Args:
      directory: holds config.json and model.safetensors or the sharded files with
        model.safetensors.index.json.
      mesh: place each parameter by its logical axis names and `rules` on this mesh;
        None = the first local device.
      dtype: compute dtype (e.g. jnp.bfloat16 on accelerators); param_dtype: storage.

    Raises:
      FileNotFoundError: no config.json / safetensors, or a listed shard is absent.
      LLMCheckpointError (a ValueError): every missing, unexpected and mis-shaped
        tensor, with its file.
    """
    from safetensors import safe_open

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {directory}: not a Hugging Face model "
                                "directory")
    config = LLMConfig.from_json_file(directory / "config.json")
    model = nnx.eval_shape(lambda: LLM(config, rngs=nnx.Rngs(0), dtype=dtype,
                                       param_dtype=param_dtype))
    params = nnx.state(model, nnx.Param)
    if mesh is None:
        single = SingleDeviceSharding(jax.local_devices()[0])
        shardings = {path: single for path, _ in nnx.to_flat_state(params)}
    else:
        shardings = {path: s.get_value() for path, s in nnx.to_flat_state(
            sharding_rules.state_shardings(params, mesh, rules))}
    table = parameter_table(model)
    files = _tensor_files(directory)
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(str(path), framework="numpy"))
                   for path in sorted(set(files.values()))}
        _check_tensors(table, files, handles, config, directory)
        for path, variable in nnx.to_flat_state(params):
            key, transposed = _hf_key(path)
            reader = _sharded_reader(handles[files[key]], key, transposed,
                                     np.dtype(variable.dtype))
            variable.set_value(jax.make_array_from_callback(
                tuple(variable.shape), shardings[path], reader))
    return model, config


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(directory: str | Path):
    """The tokenizer (with its chat template) saved in a Hugging Face model directory.

    Uses transformers' tokenizer classes only (no model code, no torch), local files only.
    """
    from transformers import AutoTokenizer

    directory = Path(directory)
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any((directory / name).is_file() for name in names):
        raise FileNotFoundError(f"no tokenizer in {directory} (looked for {', '.join(names)})")
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], *,
                    add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` ([{"role": ..., "content": ...}]) in the model's chat
    template, ending with the assistant's turn header when `add_generation_prompt`."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer {tokenizer.name_or_path!r} has no chat template "
                         "(chat_template in tokenizer_config.json or chat_template.jinja)")
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    # The template writes special tokens such as <s> / <|begin_of_text|> itself.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(directory: str | Path, tokenizer=None) -> tuple[int, ...]:
    """End-of-turn tokens: generation_config.json's eos_token_id (Llama 3 lists several),
    else config.json's, plus the tokenizer's eos token."""
    directory = Path(directory)
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                ids.extend(eos if isinstance(eos, list) else [eos])
                break
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))
