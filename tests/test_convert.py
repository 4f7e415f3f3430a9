"""The released-checkpoint loader against the official model's outputs (tiny fixture)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ct_rate_jax import convert  # noqa: E402
from ct_rate_jax.models.ct_clip_weights import ct_clip_to_state_dict  # noqa: E402
from ct_rate_jax.models.weight_io import StateDictMismatchError  # noqa: E402

pytestmark = pytest.mark.torch


def relative_error(ours, reference):
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def fixture(official_ctclip_dir):
    config = json.loads((official_ctclip_dir / "config_A.json").read_text())
    io = dict(np.load(official_ctclip_dir / "io_A.npz"))
    return official_ctclip_dir, config, io


@pytest.fixture(scope="module")
def model(fixture):
    directory, config, _ = fixture
    return convert.load_official(directory / "ctclip_A.pt", config)


def test_latents_tokens_and_similarity_match_the_official_model(model, fixture):
    _, _, io = fixture
    volume = jnp.asarray(io["volume_bcdhw"][:, 0])
    ids, mask = jnp.asarray(io["input_ids"]), jnp.asarray(io["attention_mask"])
    assert relative_error(model.encode_image(volume), io["encoded_tokens_btHWd"]) < 1e-4
    assert relative_error(model.visual_transformer(volume, quantize=False),
                          io["pre_vq_tokens_btHWd"]) < 1e-4
    assert relative_error(model.embed_image(volume), io["image_latents"]) < 1e-4
    assert relative_error(model.embed_text(ids, mask), io["text_latents"]) < 1e-4
    assert relative_error(model.similarity(volume, ids, mask), io["similarity"]) < 1e-4


def test_lipro_file_loads_and_its_head_matches(fixture):
    directory, config, io = fixture
    model = convert.load_official(directory / "lipro_A.pt", config)
    state = convert.read_torch_checkpoint(directory / "lipro_A.pt")
    image = np.asarray(model.embed_image(jnp.asarray(io["volume_bcdhw"][:, 0])))
    logits = np.maximum(image, 0) @ state["classifier.weight"].T + state["classifier.bias"]
    assert relative_error(logits, io["lipro_logits"]) < 1e-4


def test_export_gives_back_the_official_tensors(model, fixture):
    directory, _, _ = fixture
    official = convert.read_torch_checkpoint(directory / "ctclip_A.pt")
    exported = ct_clip_to_state_dict(model)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, official[key], err_msg=key)
    unused = set(official) - set(exported)
    assert all(any(m in k for m in ("_extra", "pooler", "position_ids", "null_kv",
                                    "context_norm", "first_frame", "to_pixels", "initted"))
               for k in unused), sorted(unused)


def test_config_mismatch_is_reported(fixture):
    _, config, _ = fixture
    with pytest.raises(ValueError, match="dim_image"):
        convert.official_config(dict(config, dim_image=2048))


def test_problems_of_every_part_are_reported_together(fixture):
    directory, config, _ = fixture
    state = convert.read_torch_checkpoint(directory / "ctclip_A.pt")
    del state["visual_transformer.to_patch_emb.2.weight"]
    state["text_transformer.surprise"] = np.zeros(1, np.float32)
    with pytest.raises(StateDictMismatchError) as error:
        convert.official_model(state, convert.official_config(config))
    assert "CT-ViT" in str(error.value) and "BERT" in str(error.value)
    assert "visual_transformer.to_patch_emb.2.weight" in str(error.value)
    assert "text_transformer.surprise" in str(error.value)


def test_consuming_load_releases_every_entry_it_owns(fixture):
    directory, config, _ = fixture
    state = convert.read_torch_checkpoint(directory / "lipro_A.pt")
    head = convert.split_lipro_head(state, config["dim_latent"])
    convert.official_model(state, convert.official_config(config),
                           prefix=convert.LIPRO_PREFIX, consume=True)
    assert state == {} and head["classifier.weight"].shape == (18, config["dim_latent"])


def test_placeholders_complete_the_official_key_set(model, fixture):
    directory, _, _ = fixture
    official = convert.read_torch_checkpoint(directory / "ctclip_A.pt")
    ours = convert.official_state_dict(model)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in official.items()}
    assert ours["visual_transformer.vq._codebook.initted"].tolist() == [1.0]


def test_variant_detection(fixture):
    directory, config, _ = fixture
    clip = {"to_text_latent.weight": None}
    assert convert.resolve_variant(clip, "CT-CLIP_v2.pt") == "clip"
    assert convert.resolve_variant(clip, "/m/CT_VocabFine_v2.pt") == "vocabfine"
    assert convert.resolve_variant({"trained_model.temperature": None}, "x.pt") == "lipro"
    with pytest.raises(ValueError, match="not variant 'clip'"):
        convert.resolve_variant({"trained_model.temperature": None}, "x.pt", "clip")
    with pytest.raises(ValueError, match="unknown CTViT argument"):
        convert.official_config(dict(config, ctvit=dict(config["ctvit"], use_vq=False)))
