"""A fine-tuned CT-CHAT run's model for inference: `<workdir>/model/`.

  model/chat_config.json   {"model": CTChatConfig fields, "preprocessing": the training
                           volumes' PreprocessConfig fields or null}
  model/tokenizer/         the Hugging Face tokenizer directory (with its chat template)
  model/weights/           orbax StandardCheckpoint of the model's parameters
                           (LoRA merged into the base kernels: a plain model)

`experiments.finetune_chat` writes it at the end of a run; `experiments.chat` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ct_rate_jax.chat import lora
from ct_rate_jax.chat.model import CTChat, CTChatConfig
from ct_rate_jax.chat.projector import ProjectorConfig
from ct_rate_jax.models.ctvit import CTViTConfig
from ct_rate_jax.models.llm_config import LLMConfig, RopeScaling

CONFIG_FILE = "chat_config.json"


def config_to_dict(config: CTChatConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(raw: dict[str, Any]) -> CTChatConfig:
    llm = dict(raw["llm"])
    llm["rope"] = RopeScaling(**llm["rope"])
    llm["eos_token_ids"] = tuple(llm["eos_token_ids"])
    return CTChatConfig(llm=LLMConfig(**llm), projector=ProjectorConfig(**raw["projector"]),
                        ctvit=None if raw.get("ctvit") is None else CTViTConfig(**raw["ctvit"]),
                        quantize=raw.get("quantize", True))


def save_model(directory: str, model: CTChat, tokenizer, *,
               preprocessing: dict[str, Any] | None = None) -> str:
    """Writes `directory` (layout above); LoRA layers are merged into a copy first.

    `preprocessing`: the `PreprocessConfig` fields of the training volumes (user scans
    are brought to the same grid), None for a model trained on precomputed encodings.
    """
    os.makedirs(directory, exist_ok=True)
    plain = nnx.clone(model)
    if lora.lora_modules(plain):
        lora.merge_lora(plain)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump({"model": config_to_dict(model.config), "preprocessing": preprocessing}, f,
                  indent=1)
    tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
    weights = os.path.abspath(os.path.join(directory, "weights"))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(weights, nnx.to_pure_dict(nnx.state(plain, nnx.Param)), force=True)
    checkpointer.wait_until_finished()
    return directory


def load_model(directory: str, *, dtype: Any = None) -> tuple[CTChat, Any, dict[str, Any]]:
    """(model, tokenizer, chat_config.json contents) from a `save_model` directory or a
    finetune workdir holding `model/`."""
    from ct_rate_jax.models.llm_weights import load_tokenizer

    if not os.path.exists(os.path.join(directory, CONFIG_FILE)) and os.path.exists(
            os.path.join(directory, "model", CONFIG_FILE)):
        directory = os.path.join(directory, "model")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory} (or {directory}/model): not "
                                "a CT-CHAT model written by experiments.finetune_chat")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    config = config_from_dict(raw["model"])
    # Built for real (not abstract) so that non-parameter state (RNG streams, VQ
    # buffers) exists; the parameters are then replaced by the saved ones.
    model = CTChat(config, rngs=nnx.Rngs(0), dtype=dtype)
    params = nnx.state(model, nnx.Param)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nnx.to_pure_dict(params))
    restored = ocp.StandardCheckpointer().restore(
        os.path.abspath(os.path.join(directory, "weights")), target)
    nnx.replace_by_pure_dict(params, restored)
    nnx.update(model, params)
    model.eval()
    return model, load_tokenizer(os.path.join(directory, "tokenizer")), raw
