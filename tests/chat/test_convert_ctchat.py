"""Released CT-CHAT (LLaVA + PEFT LoRA) -> our checkpoint: logits equal transformers + peft.

The release is made here the way the original saves it: a tiny random Llama saved as the
base model; its tokenizer and embeddings resized for `<pad>` and the four question-type
tokens; PEFT LoRA on every linear layer but lm_head (random non-zero A and B); the
adapter saved by `peft`; `non_lora_trainables.bin` with the LLaVA-named projector (the
official tiny projector fixture) and the resized embedding / LM-head matrices under the
PEFT model's names; the LLaVA config.json with `mm_*` keys and the grown vocab_size.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import ct_rate_jax.models  # noqa: F401  (turns eager sharding off)
from ct_rate_jax.chat import lora as lora_lib
from ct_rate_jax.chat.checkpoint import load_chat_checkpoint
from experiments import convert_ctchat

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.torch

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "official_ctchat_projector_tiny"
BASE_VOCAB = 40
ADDED = ["<pad>", "<multiple_choice>", "<long_answer>", "<short_answe>", "<report_generation>"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(BASE_VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(base dir, release dir, peft model in eval mode)."""
    root = tmp_path_factory.mktemp("release")
    base_dir, lora_dir = root / "base", root / "lora"
    hidden = json.loads((FIXTURE / "projector_config_A.json").read_text())["hidden_size"]
    config = transformers.LlamaConfig(
        vocab_size=BASE_VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            gain = 1.0 if name.endswith("norm.weight") else 0.0
            param.copy_(torch.randn(param.shape, generator=generator) * 0.15 + gain)
    tokenizer = _tokenizer()
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    # The original's training: <pad> and the four tags added, embeddings resized (and
    # trained: the new rows end up different from their mean initialisation).
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(ADDED[1:], special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            matrix[BASE_VOCAB:] = torch.randn(len(ADDED), hidden, generator=generator) * 0.15
    peft_model = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(lora_dir, save_embedding_layers=False)

    # non_lora_trainables.bin as LLaVA's get_peft_state_non_lora_maybe_zero_3 names it.
    projector = torch.load(FIXTURE / "mm_projector_A.bin", weights_only=True)
    non_lora = {f"base_model.model.{k}": v for k, v in projector.items()}
    non_lora["base_model.model.model.embed_tokens.weight"] = (
        model.get_input_embeddings().weight.detach().clone())
    non_lora["base_model.model.lm_head.weight"] = (
        model.get_output_embeddings().weight.detach().clone())
    torch.save(non_lora, lora_dir / "non_lora_trainables.bin")
    llava = {**json.loads((base_dir / "config.json").read_text()),
             **json.loads((FIXTURE / "projector_config_A.json").read_text()),
             "vocab_size": len(tokenizer), "model_type": "llava_llama",
             "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_select_layer": -2,
             "pad_token_id": tokenizer.pad_token_id}
    del llava["grid_thw"]
    (lora_dir / "config.json").write_text(json.dumps(llava))
    return base_dir, lora_dir, peft_model.eval()


IDS = np.array([[1, 7, 41, 12, 30, 44, 5], [1, 3, 9, 43, 40, 2, 39]], np.int64)


@pytest.mark.parametrize("mode", ["--merge", "--keep-lora"])
def test_logits_and_projector_match_transformers_and_peft(release, tmp_path, mode):
    base_dir, lora_dir, peft_model = release
    out = tmp_path / "converted"
    assert convert_ctchat.main(["--base", str(base_dir), "--lora", str(lora_dir),
                                "--out", str(out), mode]) == 0
    loaded = load_chat_checkpoint(out)
    assert bool(lora_lib.lora_modules(loaded.llm)) == (mode == "--keep-lora")
    if mode == "--keep-lora":
        assert loaded.lora.r == 4 and loaded.lora.lora_alpha == 8
        assert len(lora_lib.lora_modules(loaded.llm)) == 2 * len(TARGETS)
    with torch.no_grad():
        reference = peft_model(torch.tensor(IDS)).logits.float().numpy()
    ours = np.asarray(loaded.llm(jnp.asarray(IDS, jnp.int32))[0])
    np.testing.assert_allclose(ours, reference, rtol=1e-4,
                               atol=1e-4 * float(np.abs(reference).max()))

    io = np.load(FIXTURE / "projector_io_A.npz")
    expected = io["projected_bnh"]
    projected = np.asarray(loaded.projector(jnp.asarray(io["tokens_bthwd"])))
    np.testing.assert_allclose(projected, expected, rtol=1e-4,
                               atol=1e-4 * float(np.abs(expected).max()))

    tokenizer = loaded.tokenizer
    assert [tokenizer.convert_tokens_to_ids(t) for t in ADDED] == [40, 41, 42, 43, 44]
    assert tokenizer.pad_token == "<pad>"
    assert loaded.config["added_tokens"] == ADDED
    assert loaded.llm_config.vocab_size == 45


def test_mean_rows_without_trained_embeddings_and_clear_errors(release, tmp_path, capsys):
    """A release whose non_lora_trainables.bin has only the projector: the base tokenizer
    gets the five tokens and the new rows are the mean of the old ones, as the original's
    smart_tokenizer_and_embedding_resize; bad inputs are one error line."""
    import shutil

    base_dir, lora_dir, _ = release
    projector_only = tmp_path / "projector_only"
    shutil.copytree(lora_dir, projector_only)
    state = torch.load(lora_dir / "non_lora_trainables.bin", weights_only=True)
    torch.save({k: v for k, v in state.items() if "mm_projector" in k},
               projector_only / "non_lora_trainables.bin")
    out = tmp_path / "out"
    assert convert_ctchat.main(["--base", str(base_dir), "--lora", str(projector_only),
                                "--out", str(out)]) == 0
    loaded = load_chat_checkpoint(out)
    table = np.asarray(loaded.llm.model.embed_tokens.embedding[...])
    np.testing.assert_allclose(table[BASE_VOCAB:], np.broadcast_to(
        table[:BASE_VOCAB].mean(0), (5, table.shape[1])), rtol=1e-6, atol=1e-6)
    assert [loaded.tokenizer.convert_tokens_to_ids(t) for t in ADDED] == [40, 41, 42, 43, 44]

    (projector_only / "non_lora_trainables.bin").unlink()
    assert convert_ctchat.main(["--base", str(base_dir), "--lora", str(projector_only),
                                "--out", str(tmp_path / "bad")]) == 1
    assert "non_lora_trainables.bin not found" in capsys.readouterr().err
    assert convert_ctchat.main(["--base", str(base_dir), "--lora", str(base_dir),
                                "--out", str(tmp_path / "bad")]) == 1
    assert "has no mm_projector_type" in capsys.readouterr().err
