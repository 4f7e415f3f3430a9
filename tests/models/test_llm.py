"""Llama-family LLM: config mapping, parity with transformers, weight import, tokenizer."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ct_rate_jax.models  # noqa: F401  (turns eager sharding off)
from ct_rate_jax import sharding
from ct_rate_jax.models.llm import LLM, LLMConfig, RopeScaling
from ct_rate_jax.models.llm_weights import (LLMCheckpointError, chat_prompt_ids,
                                            load_hf_llm, load_tokenizer, parameter_table,
                                            stop_token_ids)

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Small random configs in the shape of each family (see test ids).
HF_CONFIGS = {
    "llama2_mha": ("llama", dict(BASE, num_key_value_heads=4)),
    "llama3_gqa_rope_scaling": ("llama", dict(
        BASE, num_key_value_heads=2, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16))),
    "mistral_sliding_window": ("mistral", dict(BASE, num_key_value_heads=2, head_dim=8,
                                               sliding_window=4)),
    "llama_tied_with_biases": ("llama", dict(BASE, num_key_value_heads=2,
                                             tie_word_embeddings=True, attention_bias=True,
                                             mlp_bias=True)),
}


def left_padded_batch(vocab_size: int = 256, seq: int = 10):
    """ids, mask int[3, seq]: a full row and rows with 3 and 6 left pads."""
    rng = np.random.RandomState(0)
    ids = rng.randint(3, vocab_size, (3, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = 0
    return ids, mask


def make_hf_model(name: str, seed: int = 0):
    """A transformers model of HF_CONFIGS[name] with random weights everywhere (norm gains
    and biases included, so that a swapped mapping cannot hide)."""
    import torch
    import transformers

    model_type, kwargs = HF_CONFIGS[name]
    cls_config, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[model_type]
    torch.manual_seed(seed)
    model = cls_model(cls_config(**kwargs, attn_implementation="eager"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            gain = 1.0 if param_name.endswith("norm.weight") else 0.0
            param.copy_(torch.randn(param.shape, generator=generator) * 0.15 + gain)
    return model.eval()


def hf_logits(hf_model, ids, mask):
    """transformers logits with the positions `generate` uses for left-padded rows."""
    import torch

    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = hf_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def random_llm(config: LLMConfig, seed: int = 0, **kwargs) -> LLM:
    """An LLM with N(0, 0.15) weights (norm gains around 1), filled from numpy: much
    cheaper than compiling the random initialisers for every small test model."""
    model = nnx.eval_shape(lambda: LLM(config, rngs=nnx.Rngs(0), **kwargs))
    rng = np.random.RandomState(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = rng.randn(*variable.shape) * 0.15 + (1.0 if "norm" in str(path[-2]) else 0.0)
        variable.set_value(jnp.asarray(value, variable.dtype))
    return model


@nnx.jit
def forward(model: LLM, ids, mask):
    return model(ids, attention_mask=mask)[0]


def assert_close_on_tokens(ours, reference, mask, rtol=1e-4):
    """Logits of real tokens agree within rtol relative to the logits' scale."""
    keep = mask.astype(bool)
    ours, reference = np.asarray(ours)[keep], reference[keep]
    np.testing.assert_allclose(ours, reference, rtol=rtol,
                               atol=rtol * float(np.abs(reference).max()))


# --- configuration ----------------------------------------------------------------------


def test_config_reads_both_rope_spellings_and_rejects_what_it_cannot_reproduce():
    legacy = dict(BASE, model_type="llama", num_key_value_heads=2, rope_theta=500000.0,
                  rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
                  eos_token_id=[128001, 128009])
    current = dict(legacy, rope_scaling=None, rope_parameters=dict(
        legacy["rope_scaling"], rope_type="llama3", rope_theta=500000.0))
    del current["rope_theta"]
    config = LLMConfig.from_hf_config(legacy)
    assert config == LLMConfig.from_hf_config(current)
    assert (config.rope_theta, config.rope.rope_type, config.rope.factor) == (500000.0,
                                                                              "llama3", 8.0)
    assert config.num_query_groups == 2 and config.head_dim == 16
    assert config.eos_token_ids == (128001, 128009) and config.sliding_window is None
    assert LLMConfig.from_hf_config(config.to_hf_config()) == config
    mistral = LLMConfig.from_hf_config(dict(BASE, model_type="mistral"))
    assert mistral.sliding_window == 4096  # transformers' default when the key is absent
    assert LLMConfig.from_hf_config(dict(BASE, model_type="mistral",
                                         sliding_window=None)).sliding_window is None
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        LLMConfig.from_hf_config(dict(BASE, rope_scaling={"rope_type": "yarn", "factor": 4}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        LLMConfig.from_hf_config(dict(BASE, model_type="gpt2"))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        LLMConfig.from_hf_config(dict(BASE, hidden_act="gelu"))


@pytest.mark.torch
def test_rope_frequencies_match_transformers():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rope in (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64),
                 dict(rope_type="linear", factor=4.0)):
        hf = LlamaConfig(**dict(BASE, num_attention_heads=2),
                         rope_parameters=dict(rope, rope_theta=500000.0))
        expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, torch.device("cpu"))
        ours = LLMConfig.from_hf_config(hf.to_dict()).rope.inverse_frequencies(32, 500000.0)
        np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(RopeScaling().inverse_frequencies(4, 10000.0), [1.0, 0.01])


# --- parity with transformers -------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers_on_a_left_padded_batch(name, tmp_path):
    pytest.importorskip("transformers")
    hf_model = make_hf_model(name)
    # The Llama 3 model is saved in shards of ~100 kB, with model.safetensors.index.json.
    shard = "100KB" if name == "llama3_gqa_rope_scaling" else "50GB"
    hf_model.save_pretrained(tmp_path, max_shard_size=shard)
    if shard == "100KB":
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model, config = load_hf_llm(tmp_path)
    ids, mask = left_padded_batch()
    logits = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert_close_on_tokens(logits, hf_logits(hf_model, ids, mask), mask)
    assert (model.lm_head is None) == config.tie_word_embeddings


@pytest.mark.torch
def test_bf16_checkpoint_loads_and_matches_transformers_on_the_upcast_weights(tmp_path):
    """Real Llama checkpoints are stored in bfloat16: a sharded bf16 save (with its index)
    gives transformers' float32 logits on the same (upcast) weights, and bf16 storage
    keeps the file's values bit for bit."""
    torch = pytest.importorskip("torch")
    import transformers

    make_hf_model("llama3_gqa_rope_scaling").to(torch.bfloat16).save_pretrained(
        tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    # The reference reads the bf16 files into float32 (its rotary buffers are computed in
    # float32, not rounded through bf16 as a .to(bfloat16) model's would be).
    hf_model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    model, _ = load_hf_llm(tmp_path)
    assert model.model.layers[0].self_attn.q_proj.kernel.get_value().dtype == jnp.float32
    ids, mask = left_padded_batch()
    logits = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert_close_on_tokens(logits, hf_logits(hf_model, ids, mask), mask)

    half, _ = load_hf_llm(tmp_path, param_dtype=jnp.bfloat16)
    kernel = half.model.layers[1].mlp.down_proj.kernel.get_value()
    reference = hf_model.model.layers[1].mlp.down_proj.weight.detach().numpy().T
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), reference)


@pytest.mark.torch
def test_sharded_import_places_each_tensor_on_its_mesh_slice(tmp_path):
    """A sharded save loaded onto a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices."""
    pytest.importorskip("transformers")
    hf_model = make_hf_model("llama3_gqa_rope_scaling")
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    mesh = sharding.make_mesh(2, 2, 2)
    model, _ = load_hf_llm(tmp_path, mesh=mesh)
    q = model.model.layers[0].self_attn.q_proj.kernel.get_value()
    k = model.model.layers[0].self_attn.k_proj.kernel.get_value()
    embedding = model.model.embed_tokens.embedding.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert embedding.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    # Each device holds a quarter of q_proj (replicated over `data`), read as a slice.
    assert q.addressable_shards[0].data.shape == (32, 32)
    reference = hf_model.model.layers[0].self_attn.q_proj.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(q), reference)
    ids, mask = left_padded_batch()
    logits = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert_close_on_tokens(logits, hf_logits(hf_model, ids, mask), mask)


# --- our own model: embeddings input, cache, bad checkpoints -----------------------------


def _save_checkpoint(model: LLM, directory, drop=(), rename=None, reshape=None):
    """Writes `model` as a Hugging Face directory (torch layouts), optionally broken."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, (variable, transposed) in parameter_table(model).items():
        value = np.asarray(variable.get_value())
        tensors[key] = np.ascontiguousarray(value.T if transposed else value)
    for key in drop:
        del tensors[key]
    if rename:
        tensors[rename[1]] = tensors.pop(rename[0])
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_config()))


def test_round_trip_inputs_embeds_and_bf16_storage(tmp_path):
    config = LLMConfig.tiny()
    model = random_llm(config, seed=1)
    _save_checkpoint(model, tmp_path / "ckpt")
    loaded, loaded_config = load_hf_llm(tmp_path / "ckpt")
    assert loaded_config == config
    ids, mask = (jnp.asarray(a) for a in left_padded_batch(config.vocab_size))
    expected = forward(model, ids, mask)
    both = nnx.jit(lambda m, i, a: (m(i, attention_mask=a)[0],
                                    m(inputs_embeds=m.embed(i), attention_mask=a)[0]))
    from_ids, from_embeds = both(loaded, ids, mask)
    np.testing.assert_array_equal(np.asarray(from_ids), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(from_embeds), np.asarray(expected))
    half, _ = load_hf_llm(tmp_path / "ckpt", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert half.model.layers[0].mlp.up_proj.kernel.get_value().dtype == jnp.bfloat16
    assert_close_on_tokens(forward(half, ids, mask), np.asarray(expected), np.asarray(mask),
                           rtol=5e-2)


def test_prefill_then_cached_steps_equal_one_full_pass():
    config = LLMConfig.tiny(sliding_window=4)
    model = random_llm(config, seed=2)
    ids, mask = left_padded_batch(config.vocab_size)
    full = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    cache = model.init_cache(batch=3, length=16)
    pieces = []
    chunk = nnx.jit(lambda m, i, a, c: m(i, attention_mask=a, cache=c))
    for start, stop in ((0, 7), (7, 8), (8, 9), (9, 10)):
        logits, cache = chunk(model, jnp.asarray(ids[:, start:stop]),
                              jnp.asarray(mask[:, start:stop]), cache)
        pieces.append(logits)
    assert int(cache.index) == 10
    assert_close_on_tokens(jnp.concatenate(pieces, axis=1), np.asarray(full), mask, rtol=1e-5)


def test_bad_checkpoints_name_every_file_and_tensor(tmp_path):
    model = random_llm(LLMConfig.tiny())
    _save_checkpoint(model, tmp_path / "bad", drop=["model.norm.weight"],
                     rename=("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.upp.weight"),
                     reshape="model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(LLMCheckpointError) as caught:
        load_hf_llm(tmp_path / "bad")
    message = str(caught.value)
    for expected in ("2 missing", "model.norm.weight", "model.layers.1.mlp.up_proj.weight",
                     "1 unexpected", "model.safetensors: model.layers.1.mlp.upp.weight",
                     "model.safetensors: model.layers.0.self_attn.k_proj.weight has shape "
                     "(31, 64), the config needs (32, 64)"):
        assert expected in message
    (tmp_path / "bad" / "model.safetensors").unlink()
    (tmp_path / "bad" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        load_hf_llm(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_llm(tmp_path)


def test_remat_gives_the_same_gradients():
    config = LLMConfig.tiny(num_hidden_layers=1)
    ids, mask = left_padded_batch(config.vocab_size)

    def loss(model):
        logits, _ = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    gradient = nnx.jit(nnx.grad(loss))
    plain = gradient(random_llm(config, seed=3))
    remat = gradient(random_llm(config, seed=3, remat=True))
    for (path, a), (_, b) in zip(nnx.to_flat_state(plain), nnx.to_flat_state(remat)):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                   rtol=1e-5, atol=1e-7, err_msg=str(path))


# --- tokenizer and chat template -----------------------------------------------------------

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_tokenizer_chat_template_and_stop_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = ["is", "there", "a", "nodule", "?", "yes"]
    vocab = {token: i for i, token in enumerate(specials + words + ["<unk>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=specials[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    loaded = load_tokenizer(tmp_path)
    ids = chat_prompt_ids(loaded, [{"role": "user", "content": "is there a nodule ?"}])
    assert ids == [1, 3, 6, 7, 8, 9, 10, 5, 4]
    assert stop_token_ids(tmp_path, loaded) == (2, 5)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "elsewhere")
