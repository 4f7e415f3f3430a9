"""CT-CHAT projector: parity with the official PyTorch module, weight I/O, encodings."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ct_rate_jax.chat.projector import (Projector, ProjectorConfig, load_encoding,
                                        load_projector, projector_from_state_dict,
                                        projector_to_state_dict, save_encoding)
from ct_rate_jax.models.weight_io import StateDictMismatchError

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "official_ctchat_projector_tiny"


@pytest.fixture(scope="module")
def official():
    pytest.importorskip("torch")
    directory = FIXTURE
    config = ProjectorConfig.from_llava_config(
        json.loads((directory / "projector_config_A.json").read_text()))
    model = load_projector(directory / "mm_projector_A.bin", config)
    io = dict(np.load(directory / "projector_io_A.npz"))
    return model, directory, io


def _relative_error(ours, reference):
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


@pytest.mark.torch
def test_matches_official_projector(official):
    model, _, io = official
    assert model.config.n_queries == 16 and model.config.mlp_depth == 2
    projected = model(jnp.asarray(io["tokens_bthwd"]))
    assert projected.shape == io["projected_bnh"].shape
    assert _relative_error(projected, io["projected_bnh"]) < 1e-4
    # Under jit, and from the already flattened [B, N, E] form.
    flat = io["tokens_bthwd"].reshape(2, -1, io["tokens_bthwd"].shape[-1])
    jitted = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(flat))
    assert _relative_error(jitted, io["projected_bnh"]) < 1e-4


@pytest.mark.torch
def test_state_dict_round_trip_and_prefixes(official):
    model, directory, _ = official
    import torch
    reference = {k: v.numpy() for k, v in torch.load(
        directory / "mm_projector_A.bin", weights_only=True).items()}
    exported = projector_to_state_dict(model)
    assert sorted(exported) == sorted(reference)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
    # A PEFT-wrapped save (non_lora_trainables.bin) with unrelated LLM rows loads the same.
    peft_style = {"base_model.model." + k: v for k, v in reference.items()}
    peft_style["base_model.model.model.embed_tokens.weight"] = np.zeros((5, 48), np.float32)
    fresh = projector_from_state_dict(Projector(model.config, rngs=nnx.Rngs(3)), peft_style)
    for a, b in zip(jax.tree.leaves(nnx.state(fresh)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.torch
def test_wrong_width_is_one_clear_error(official):
    model, _, _ = official
    import dataclasses
    wrong = Projector(dataclasses.replace(model.config, hidden_size=32), rngs=nnx.Rngs(0))
    before = np.asarray(wrong.proj[0].kernel[...]).copy()
    with pytest.raises(StateDictMismatchError, match=r"proj\.0\.weight.*checkpoint \(48, 64\)"):
        projector_from_state_dict(wrong, projector_to_state_dict(model))
    np.testing.assert_array_equal(np.asarray(wrong.proj[0].kernel[...]), before)


def test_config_variants_and_errors():
    assert ProjectorConfig(hidden_size=8).mlp_depth == 2
    linear_config = ProjectorConfig(8, "attn_pool+linear", 16, 12, 4, 2)
    # Shapes only (traced, nothing compiled): numerics are the parity test's job.
    out = jax.eval_shape(lambda x: Projector(linear_config, rngs=nnx.Rngs(0))(x),
                         jax.ShapeDtypeStruct((3, 2, 2, 5, 12), jnp.float32))
    assert out.shape == (3, 4, 8)
    linear = nnx.eval_shape(lambda: Projector(linear_config, rngs=nnx.Rngs(0)))
    from ct_rate_jax.chat.projector import projector_table
    assert "proj.weight" in projector_table(linear)
    # Abstract (no initialisers run): only its keys and input check are looked at.
    deep = nnx.eval_shape(lambda: Projector(ProjectorConfig(8, "attn_pool+mlp3x_gelu", 16, 16,
                                                            4, 2), rngs=nnx.Rngs(0)))
    assert [k for k in projector_table(deep) if k.startswith("proj")] == [
        "proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias",
        "proj.4.weight", "proj.4.bias"]
    with pytest.raises(ValueError, match="mm_projector_type 'mlp2x_gelu'"):
        ProjectorConfig(8, "mlp2x_gelu")
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        ProjectorConfig(8, mm_hidden_size=10, n_heads=4)
    with pytest.raises(ValueError, match=r"expected \[B, T, H, W, 16\]"):
        deep(jnp.ones((1, 2, 2, 2, 8)))
    with pytest.raises(ValueError, match="hidden_size"):
        ProjectorConfig.from_llava_config({"mm_hidden_size": 512})


def test_encoding_round_trip(tmp_path):
    from ct_rate_jax.chat.projector import encoding_path
    tokens = np.random.default_rng(0).normal(size=(2, 3, 3, 16)).astype(np.float32)
    path = encoding_path(tmp_path, "train_1_a_1.nii.gz")
    assert path == str(tmp_path / "train_1_a_1.npz")
    save_encoding(path, tokens)
    loaded = load_encoding(path, context_size=16)
    assert loaded.shape == (1, 2, 3, 3, 16)
    np.testing.assert_array_equal(loaded[0], tokens)
    with pytest.raises(ValueError, match="mm_context_size 512"):
        load_encoding(tmp_path / "train_1_a_1.npz", context_size=512)
    np.savez(tmp_path / "bad.npz", tokens=tokens)
    with pytest.raises(ValueError, match="has no 'arr' array"):
        load_encoding(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_encoding(tmp_path / "missing.npz")


def test_projector_shards_its_llm_width_like_the_llm():
    from ct_rate_jax import sharding
    model = nnx.eval_shape(lambda: Projector(ProjectorConfig(
        16, mm_hidden_size=8, mm_context_size=8, n_queries=4, n_heads=2), rngs=nnx.Rngs(0)))
    shardings = sharding.state_shardings(nnx.state(model), sharding.make_mesh(2, 2, 2))
    flat = {path: s.get_value() if isinstance(s, nnx.Variable) else s
            for path, s in nnx.to_flat_state(shardings)}
    assert tuple(flat[("proj", 0, "kernel")].spec) == (None, "fsdp")
    assert tuple(flat[("proj", 1, "kernel")].spec) == ("tensor", "fsdp")
    assert tuple(flat[("attn_pool", "to_kv", "kernel")].spec) in ((), (None, None))

