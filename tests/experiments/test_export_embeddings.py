"""`python -m experiments.export_embeddings`: npz and Parquet, reloaded bitwise."""

import numpy as np
import pytest
from flax import nnx

from ct_rate_jax import checkpoint_io
from ct_rate_jax.evaluation import embedding, embedding_io
from ct_rate_jax.models.ct_clip import CTCLIP, variant
from experiments import evaluate, export_embeddings


@pytest.mark.slow
def test_export_reloads_bitwise(tiny_synthetic_data, tmp_path, capsys):
    model = CTCLIP(variant("tiny", vocab_size=320), rngs=nnx.Rngs(0))
    checkpoint_io.save_converted(tmp_path / "model", model)
    valid = tiny_synthetic_data.shard_dir("valid")
    out = tmp_path / "emb" / "valid.npz"
    assert export_embeddings.main([
        "--checkpoint", str(tmp_path / "model"), "--tokenizer", tiny_synthetic_data.tokenizer_path,
        "--data", valid, "--out", str(out), "--tokens", "--texts", "--batch-size", "4"]) == 0

    # The same latents straight from the library, in this process.
    expected = evaluate.embed_shards(embedding.Embedder(model), valid,
                                     tiny_synthetic_data.tokenizer_path, 32,
                                     ("findings", "impressions"), 4, texts=True, tokens=True)
    for loader, path in ((embedding_io.load_npz, out),
                         (embedding_io.load_parquet, out.with_suffix(".parquet"))):
        names, arrays, metadata = loader(str(path))
        assert names == expected.volume_names
        np.testing.assert_array_equal(arrays["image_latents"], expected.image_latents)
        np.testing.assert_array_equal(arrays["text_latents"], expected.text_latents)
        np.testing.assert_array_equal(arrays["tokens"], expected.tokens)
        assert arrays["image_latents"].dtype == np.float32
        assert metadata["model"]["config"] == model.config.to_dict()
        assert len(metadata["data"]["manifest_sha256"]) == 64
        assert metadata["preprocessing"]["manifest"]["target_shape"] is not None

    capsys.readouterr()
    assert export_embeddings.main(["--checkpoint", str(tmp_path / "model"), "--data", valid,
                                   "--out", str(tmp_path / "x.parquet")]) == 1
    assert "must end in .npz" in capsys.readouterr().err


@pytest.mark.slow
def test_export_of_user_scans_uses_the_training_preprocessing(
        tiny_model_dir, tiny_synthetic_data, tmp_path, monkeypatch):
    """NIfTI / DICOM input goes through `data_pipeline.user_scans.iter_user_volumes`
    (written on the ingest branch; a stand-in with its signature here) with the
    preprocessing of the data the model was trained on."""
    import json
    import shutil
    import sys
    import types

    from data_pipeline.input_pipeline import normalise_hu
    from data_pipeline.preprocess import PreprocessConfig

    rng = np.random.default_rng(0)
    volumes = rng.integers(-1200, 1500, (3, 8, 16, 16)).astype(np.int16)
    seen = {}

    def iter_user_volumes(path, config, *, errors=None):
        seen["path"], seen["config"] = path, config
        for i, volume in enumerate(volumes):
            yield f"patient/scan_{i}.nii.gz", volume, {"kind": "nifti",
                                                       "original_spacing_mm": (1.0, 0.7, 0.7),
                                                       "num_slices": np.int64(40)}
        errors.append((f"{path}/broken.dcm", "not a DICOM file"))

    stand_in = types.ModuleType("data_pipeline.user_scans")
    stand_in.iter_user_volumes = iter_user_volumes
    monkeypatch.setitem(sys.modules, "data_pipeline.user_scans", stand_in)

    # A model directory fine-tuned on the tiny shards records their preprocessing.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    with open(tiny_synthetic_data.shard_dir("train") + "/manifest.json") as f:
        manifest = json.load(f)
    (model_dir / "finetune.json").write_text(json.dumps({
        "method": "VocabFine", "data": {"train": {"preprocessing": manifest["preprocessing"],
                                                  "manifest": "train/manifest.json"}}}))
    scans = tmp_path / "scans"
    scans.mkdir()
    out = tmp_path / "scans.npz"
    assert export_embeddings.main(["--checkpoint", str(model_dir), "--data", str(scans),
                                   "--out", str(out), "--batch-size", "2", "--tokens"]) == 0
    assert seen["config"] == PreprocessConfig(
        target_spacing_mm=(45.0, 22.5, 22.5), target_shape=(8, 16, 16))
    names, arrays, metadata = embedding_io.load_npz(str(out))
    assert names == [f"patient/scan_{i}.nii.gz" for i in range(3)]
    embedder = embedding.Embedder(checkpoint_io.load_converted(model_dir)[0])
    inputs = np.stack([normalise_hu(v) for v in volumes])
    expected = np.concatenate([embedder.images(inputs[:2]), embedder.images(inputs[2:])])
    np.testing.assert_array_equal(arrays["image_latents"], expected)
    assert arrays["tokens"].shape[0] == 3
    assert metadata["preprocessing"]["config"]["target_shape"] == [8, 16, 16]
    assert "fine-tuning data" in metadata["preprocessing"]["source"]
    assert metadata["data"]["skipped"] == [[f"{scans}/broken.dcm", "not a DICOM file"]]
    info = metadata["data"]["volumes"]["patient/scan_0.nii.gz"]
    assert info["original_spacing_mm"] == [1.0, 0.7, 0.7] and info["num_slices"] == 40
