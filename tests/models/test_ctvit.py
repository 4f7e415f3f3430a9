"""CT-ViT: parity with the official PyTorch model, shapes, layouts, VQ and weight I/O."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ct_rate_jax.models  # noqa: F401  (sets nnx defaults)
from ct_rate_jax.models.ctvit import CTViT, CTViTConfig
from ct_rate_jax.models.ctvit_weights import ctvit_from_state_dict, ctvit_to_state_dict
from ct_rate_jax.models.weight_io import StateDictMismatchError


def tiny_config(**overrides) -> CTViTConfig:
    base = dict(dim=32, codebook_size=16, image_size=16, patch_size=8, temporal_patch_size=4,
                spatial_depth=1, temporal_depth=2, dim_head=8, heads=2)
    return CTViTConfig(**{**base, **overrides})


def random_volume(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


@pytest.fixture(scope="module")
def official(official_ctclip_dir):
    torch = pytest.importorskip("torch")
    config = json.loads((official_ctclip_dir / "config_A.json").read_text())
    state_dict = {k: v.numpy() for k, v in torch.load(
        official_ctclip_dir / "ctclip_A.pt", weights_only=True).items()}
    io = dict(np.load(official_ctclip_dir / "io_A.npz"))
    model = CTViT(CTViTConfig(**config["ctvit"]), rngs=nnx.Rngs(0))
    ctvit_from_state_dict(model, state_dict)
    return model, state_dict, io


def _relative_error(ours, reference):
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


@pytest.mark.torch
def test_matches_official_tokens_before_and_after_vq(official):
    model, _, io = official
    volume = jnp.asarray(io["volume_bcdhw"][:, 0])
    assert _relative_error(model(volume, quantize=False), io["pre_vq_tokens_btHWd"]) < 1e-4
    assert _relative_error(model(volume), io["encoded_tokens_btHWd"]) < 1e-4


@pytest.mark.torch
def test_state_dict_round_trip_is_bitwise(official):
    model, state_dict, _ = official
    exported = ctvit_to_state_dict(model)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state_dict[key], err_msg=key)
    fresh = CTViT(model.config, rngs=nnx.Rngs(1))
    ctvit_from_state_dict(fresh, exported)
    for a, b in zip(jax.tree.leaves(nnx.state(fresh)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.torch
def test_bad_state_dict_lists_every_problem(official):
    model, state_dict, _ = official
    broken = dict(state_dict)
    del broken["visual_transformer.to_patch_emb.2.weight"]
    broken["visual_transformer.surprise"] = np.zeros(3)
    broken["visual_transformer.enc_spatial_transformer.layers.0.1.q_scale"] = np.zeros(5)
    with pytest.raises(StateDictMismatchError) as error:
        ctvit_from_state_dict(CTViT(model.config, rngs=nnx.Rngs(0)), broken)
    message = str(error.value)
    assert "to_patch_emb.2.weight" in message and "surprise" in message
    assert "layers.0.1.q_scale: checkpoint (5,)" in message


def test_output_shape_and_patch_grid():
    model = CTViT(tiny_config(use_vq=False), rngs=nnx.Rngs(0))
    tokens = model(random_volume((2, 8, 16, 16)))
    assert tokens.shape == (2, 2, 2, 2, 32)
    assert np.isfinite(np.asarray(tokens)).all()


def test_patch_embedding_reads_patches_in_official_order():
    """A volume that is zero except one patch changes only that token's patch vector."""
    model = CTViT(tiny_config(use_vq=False), rngs=nnx.Rngs(0))
    volume = np.zeros((1, 8, 16, 16), np.float32)
    volume[0, 4:8, 8:16, 0:8] = np.arange(4 * 8 * 8).reshape(4, 8, 8)
    emb = model.to_patch_emb
    x = volume.reshape(1, 2, 4, 2, 8, 2, 8).transpose(0, 1, 3, 5, 2, 4, 6)
    # token (t=1, h=1, w=0) holds the patch flattened as (pt, p1, p2)
    np.testing.assert_array_equal(x[0, 1, 1, 0].reshape(-1), np.arange(256))
    tokens = np.asarray(emb(jnp.asarray(volume)))
    assert not np.allclose(tokens[0, 1, 1, 0], tokens[0, 0, 0, 0])
    np.testing.assert_allclose(tokens[0, 0, 0, 0], tokens[0, 0, 1, 1], atol=1e-6)


def test_temporal_peg_layouts_differ():
    official = CTViT(tiny_config(use_vq=False), rngs=nnx.Rngs(0))
    grid = CTViT(tiny_config(use_vq=False, temporal_peg_layout="grid"), rngs=nnx.Rngs(0))
    patches = official.to_patch_emb(random_volume((1, 16, 16, 16)))
    assert not np.allclose(official.encode(patches), grid.encode(patches), atol=1e-5)


def test_peg_is_causal_along_the_first_grid_axis():
    peg = CTViT(tiny_config(), rngs=nnx.Rngs(0)).enc_temporal_transformer.layers[0].peg
    grid = random_volume((1, 4, 3, 3, 32))
    changed = grid.at[:, 2:].set(0.5)
    a, b = np.asarray(peg(grid)), np.asarray(peg(changed))
    np.testing.assert_allclose(a[:, :2], b[:, :2], atol=1e-6)
    assert not np.allclose(a[:, 2], b[:, 2])


def test_vector_quantiser_returns_raw_codes_and_updates_by_ema():
    model = CTViT(tiny_config(), rngs=nnx.Rngs(0))
    codebook = np.asarray(model.vq.codebook[...]) * 3.0  # not unit norm: raw rows come back
    model.vq.codebook[...] = jnp.asarray(codebook)
    volume = random_volume((2, 8, 16, 16))
    # Jitted: eager dispatch of the 27-tap PEG and its gradient dominated this test.
    encode = nnx.jit(lambda m, quantize: m(volume, quantize=quantize), static_argnums=1)
    quantised = np.asarray(encode(model, True)).reshape(-1, 32)
    indices = np.asarray(model.vq.lookup(encode(model, False).reshape(-1, 32)))
    np.testing.assert_array_equal(quantised, codebook[indices])

    before = np.asarray(model.vq.codebook[...]).copy()

    def loss(m):
        return jnp.sum(m(volume, train=True) ** 2)

    grads = nnx.jit(nnx.grad(loss))(model)
    after = np.asarray(model.vq.codebook[...])
    used = np.unique(indices)
    assert not np.allclose(after[used], before[used])  # EMA moved the used codes
    unused = np.setdiff1d(np.arange(16), used)
    np.testing.assert_allclose(  # unused codes only renormalise towards unit norm
        after[unused], 0.8 * before[unused] + 0.2 * before[unused]
        / np.linalg.norm(before[unused], axis=-1, keepdims=True), rtol=1e-5)
    # straight-through: gradients reach the encoder through the quantiser
    assert np.abs(np.asarray(grads.to_patch_emb.proj.kernel[...])).sum() > 0
    assert float(np.asarray(model.vq.cluster_size[...]).sum()) == pytest.approx(0.2 * 16)


def test_parameters_carry_logical_axis_names():
    model = CTViT(tiny_config(), rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(model))
    assert tuple(specs["enc_spatial_transformer"]["layers"][0]["attn"]["to_q"]["kernel"]
                 .get_value()) == ("embed", "heads")
    assert tuple(specs["enc_spatial_transformer"]["layers"][0]["ff"]["proj_out"]["kernel"]
                 .get_value()) == ("mlp", "embed")


def test_peg_and_attention_implementations_agree():
    """peg_impl / attention_impl change how, not what: same tokens and gradients."""
    volume = random_volume((2, 8, 16, 16))
    # One layer each: the 27-tap PEG's gradient is slow to compile on the CPU.
    reference = CTViT(tiny_config(temporal_depth=1), rngs=nnx.Rngs(0))
    other = CTViT(tiny_config(temporal_depth=1, peg_impl="conv", attention_impl="xla"),
                  rngs=nnx.Rngs(0))  # same parameters

    @nnx.jit
    def loss_and_grads(model):
        return nnx.value_and_grad(lambda m: jnp.sum(jnp.tanh(m(volume, quantize=False))))(model)

    want_loss, want_grads = loss_and_grads(reference)
    got_loss, got_grads = loss_and_grads(other)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    # float32 sums in another order; some gradients are zero up to rounding (e.g. a
    # per-head bias under softmax), so the tolerance is relative to the largest gradient.
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="peg_impl"):
        tiny_config(peg_impl="fft")
    with pytest.raises(ValueError, match="attention_impl"):
        tiny_config(attention_impl="flash")
