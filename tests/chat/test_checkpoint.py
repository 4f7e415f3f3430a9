"""CT-CHAT checkpoint directory: save / load round trips (LLM, LoRA kept or merged,
projector, tokenizer, CT-ViT), sharded LLM files, and clear errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ct_rate_jax.models  # noqa: F401  (turns eager sharding off)
from ct_rate_jax.chat import lora as lora_lib
from ct_rate_jax.chat.checkpoint import (ChatCheckpointError, load_chat_checkpoint,
                                         read_chat_config, save_chat_checkpoint)
from ct_rate_jax.chat.projector import Projector, ProjectorConfig
from ct_rate_jax.models.ctvit import CTViT, CTViTConfig
from ct_rate_jax.models.llm import LLM, LLMConfig

CONFIG = LLMConfig.tiny(vocab_size=40, num_hidden_layers=1)
PROJECTOR = ProjectorConfig(hidden_size=CONFIG.hidden_size, mm_hidden_size=32,
                            mm_context_size=16, n_queries=4, n_heads=4)
IDS = np.array([[1, 5, 9, 33, 2, 7]], np.int32)


def random_llm(seed: int = 0) -> LLM:
    model = nnx.eval_shape(lambda: LLM(CONFIG, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = rng.randn(*variable.shape) * 0.15 + (1.0 if "norm" in str(path[-2]) else 0.0)
        variable.set_value(jnp.asarray(value, variable.dtype))
    return model


def with_lora(model: LLM, seed: int = 1) -> LLM:
    lora_lib.apply_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8, rngs=nnx.Rngs(seed))
    lora_lib.apply_lora(model, ["down_proj"], rank=2, alpha=2, rngs=nnx.Rngs(seed))
    rng = np.random.RandomState(seed)
    for _, layer in lora_lib.lora_modules(model):
        layer.lora_b.set_value(jnp.asarray(rng.randn(*layer.lora_b.shape) * 0.2, jnp.float32))
    return model


def random_projector(seed: int = 3) -> Projector:
    model = nnx.eval_shape(lambda: Projector(PROJECTOR, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(seed)
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        variable.set_value(jnp.asarray(rng.randn(*variable.shape) * 0.3, variable.dtype))
    return model


def random_ctvit() -> CTViT:
    """A tiny CT-ViT filled from numpy (no initialiser compilation)."""
    config = CTViTConfig(dim=16, codebook_size=8, image_size=8, patch_size=4,
                         temporal_patch_size=2, spatial_depth=1, temporal_depth=1,
                         dim_head=4, heads=2)
    model = nnx.eval_shape(lambda: CTViT(config, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(4)
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        variable.set_value(jnp.asarray(rng.randn(*variable.shape), variable.dtype))
    return model


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(30)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(["<multiple_choice>", "<long_answer>"], special_tokens=True)
    return tokenizer


@nnx.jit
def _forward(model: LLM, ids):
    return model(ids)[0]


def logits(model: LLM) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(IDS)))


def test_round_trip_with_lora_kept_or_merged_projector_tokenizer_and_vision(tmp_path):
    llm = with_lora(random_llm())
    projector = random_projector()
    vision = random_ctvit()
    tokenizer = word_tokenizer()
    expected = logits(llm)
    tokens = np.random.RandomState(5).randn(1, 2, 2, 2, 16).astype(np.float32)
    save_chat_checkpoint(tmp_path / "kept", llm=llm, projector=projector, tokenizer=tokenizer,
                         vision=vision, added_tokens=["<pad>", "<multiple_choice>"],
                         source={"test": True})
    # The saved model is unchanged by merge_lora=True (it merges a copy).
    save_chat_checkpoint(tmp_path / "merged", llm=llm, projector=projector, merge_lora=True)
    assert len(lora_lib.lora_modules(llm)) == 3

    kept = load_chat_checkpoint(tmp_path / "kept")
    assert kept.config["added_tokens"] == ["<pad>", "<multiple_choice>"]
    assert kept.config["lora"]["target_modules"] == [
        "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj"]
    ranks = {name: (layer.rank, layer.scaling) for name, layer in lora_lib.lora_modules(kept.llm)}
    assert ranks == {"model.layers.0.self_attn.q_proj": (4, 2.0),
                     "model.layers.0.self_attn.v_proj": (4, 2.0),
                     "model.layers.0.mlp.down_proj": (2, 1.0)}
    np.testing.assert_array_equal(logits(kept.llm), expected)
    np.testing.assert_allclose(logits(load_chat_checkpoint(tmp_path / "kept", merge_lora=True,
                                                           load_vision_encoder=False).llm),
                               expected, rtol=1e-5, atol=1e-5)
    merged = load_chat_checkpoint(tmp_path / "merged", tokenizer=False)
    assert merged.lora is None and not lora_lib.lora_modules(merged.llm)
    assert merged.vision is None and merged.tokenizer is None
    np.testing.assert_allclose(logits(merged.llm), expected, rtol=1e-5, atol=1e-5)

    np.testing.assert_array_equal(np.asarray(kept.projector(jnp.asarray(tokens))),
                                  np.asarray(projector(jnp.asarray(tokens))))
    assert kept.tokenizer.convert_tokens_to_ids("<multiple_choice>") == 34
    assert kept.tokenizer.pad_token == "<pad>"
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(vision)),
                                 nnx.to_flat_state(nnx.state(kept.vision))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                      err_msg=str(path))
    assert kept.vision_config == vision.config


def test_sharded_llm_files_load_onto_a_mesh(tmp_path):
    llm = random_llm(seed=2)
    projector = random_projector()
    save_chat_checkpoint(tmp_path, llm=with_lora(llm), projector=projector,
                         max_shard_bytes=20_000)
    index = json.loads((tmp_path / "llm" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    devices = np.array(jax.devices()[:2])
    mesh = jax.sharding.Mesh(devices.reshape(1, -1, 1), ("data", "fsdp", "tensor"))
    loaded = load_chat_checkpoint(tmp_path, mesh=mesh, tokenizer=False)
    np.testing.assert_allclose(logits(loaded.llm), logits(llm), rtol=1e-5, atol=1e-5)
    lora_a = loaded.llm.model.layers[0].self_attn.q_proj.lora_a
    assert lora_a.get_value().sharding.mesh.shape == mesh.shape


def test_bad_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CT-CHAT checkpoint"):
        read_chat_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"mm_projector_type": "attn_pool+linear"}))
    with pytest.raises(ChatCheckpointError, match="convert_ctchat"):
        read_chat_config(tmp_path)
    save_chat_checkpoint(tmp_path / "c", llm=with_lora(random_llm()),
                         projector=random_projector())
    (tmp_path / "c" / "lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lora/adapter_model.safetensors"):
        read_chat_config(tmp_path / "c")


def test_chat_command_answers_from_a_checkpoint_with_lora_kept_separate(tmp_path, capsys):
    """A convert_ctchat-style directory (LoRA kept, no vision encoder): the chat command
    gives the answer the in-memory model gives, through the one loader."""
    from ct_rate_jax.chat.data import train_demo_tokenizer
    from ct_rate_jax.chat.model import CTChat, CTChatConfig
    from ct_rate_jax.chat.projector import save_encoding
    from experiments import chat

    tokenizer = train_demo_tokenizer(["Is there a nodule in this CT volume? Yes. No."] * 4,
                                     300, str(tmp_path / "tokenizer"))
    config = LLMConfig.tiny(vocab_size=len(tokenizer), num_hidden_layers=1,
                            eos_token_ids=(tokenizer.eos_token_id,))
    llm = nnx.eval_shape(lambda: LLM(config, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(0)
    for path, variable in nnx.to_flat_state(nnx.state(llm, nnx.Param)):
        value = rng.randn(*variable.shape) * 0.3 + (1.0 if "norm" in str(path[-2]) else 0.0)
        variable.set_value(jnp.asarray(value, variable.dtype))
    llm = with_lora(llm)
    projector = random_projector()
    save_chat_checkpoint(tmp_path / "ckpt", llm=llm, projector=projector, tokenizer=tokenizer)
    assert (tmp_path / "ckpt" / "lora" / "adapter_config.json").is_file()
    tokens = np.random.RandomState(5).randn(2, 2, 2, 16).astype(np.float32)
    save_encoding(str(tmp_path / "scan.npz"), tokens)

    merged = nnx.clone(llm)  # as loaded (same program: one compilation)
    lora_lib.merge_lora(merged)
    in_memory = CTChat.from_parts(CTChatConfig(llm=config, projector=PROJECTOR), llm=merged,
                                  projector=projector)
    session = chat.ChatSession(in_memory, tokenizer, {"tokens": tokens[None]},
                               max_new_tokens=6)
    expected = session.ask("Is there a nodule?", "short_answer")
    assert expected  # the random model says something before its end token
    assert chat.main(["--checkpoint", str(tmp_path / "ckpt"), "--volume",
                      str(tmp_path / "scan.npz"), "--question", "Is there a nodule?",
                      "--type", "short_answer", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_chat_command_names_what_a_directory_is_not(tmp_path, capsys):
    from experiments import chat
    from experiments.cli import run_command

    (tmp_path / "scan.npz").write_bytes(b"")
    cases = {"empty": "is not a CT-CHAT checkpoint: expected config.json with format",
             "running/checkpoints": "finetune_chat workdir without model/",
             "old/model/chat_config.json": "older experiments.finetune_chat",
             "absent": "does not exist"}
    for name, message in cases.items():
        path = tmp_path / name
        if name != "absent":
            (path.parent if "." in path.name else path).mkdir(parents=True)
            if "." in path.name:
                path.write_text("{}")
        argv = ["--checkpoint", str(tmp_path / name.split("/")[0]), "--volume",
                str(tmp_path / "scan.npz"), "--question", "?"]
        assert run_command(lambda: chat.main(argv)) == 1
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1, error
