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
        tiny_model_dir, tiny_synthetic_data, tmp_path):
    """NIfTI / DICOM input goes through `data_pipeline.user_scans.iter_user_volumes`
    with the preprocessing of the data the model was trained on; an unreadable file is
    skipped and recorded."""
    import json
    import shutil

    import nibabel as nib

    from data_pipeline.input_pipeline import normalise_hu
    from data_pipeline.preprocess import PreprocessConfig
    from data_pipeline.user_scans import iter_user_volumes

    # Real NIfTI files (int16 HU, 8 x 8 x 15 mm voxels, 24 slices, coarse like the tiny model's
    # 22.5 x 22.5 x 45 mm grid) and one truncated file.
    rng = np.random.default_rng(0)
    scans = tmp_path / "scans" / "patient"
    scans.mkdir(parents=True)
    for i in range(3):
        stored_xyz = rng.integers(-1200, 1500, (40, 40, 24)).astype(np.int16)
        image = nib.Nifti1Image(stored_xyz, np.diag([8.0, 8.0, 15.0, 1.0]))
        nib.save(image, str(scans / f"scan_{i}.nii.gz"))
    (scans / "scan_9.nii.gz").write_bytes((scans / "scan_0.nii.gz").read_bytes()[:100])
    scans = scans.parent

    # A model directory fine-tuned on the tiny shards records their preprocessing.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    with open(tiny_synthetic_data.shard_dir("train") + "/manifest.json") as f:
        manifest = json.load(f)
    (model_dir / "finetune.json").write_text(json.dumps({
        "method": "VocabFine", "data": {"train": {"preprocessing": manifest["preprocessing"],
                                                  "manifest": "train/manifest.json"}}}))
    out = tmp_path / "scans.npz"
    assert export_embeddings.main(["--checkpoint", str(model_dir), "--data", str(scans),
                                   "--out", str(out), "--batch-size", "2", "--tokens"]) == 0
    names, arrays, metadata = embedding_io.load_npz(str(out))
    assert names == [f"patient/scan_{i}.nii.gz" for i in range(3)]
    config = PreprocessConfig(target_spacing_mm=(45.0, 22.5, 22.5), target_shape=(8, 16, 16))
    volumes = [volume for _, volume, _ in iter_user_volumes(str(scans), config, errors=[])]
    embedder = embedding.Embedder(checkpoint_io.load_converted(model_dir)[0])
    inputs = np.stack([normalise_hu(v) for v in volumes])
    expected = np.concatenate([embedder.images(inputs[:2]), embedder.images(inputs[2:])])
    np.testing.assert_array_equal(arrays["image_latents"], expected)
    assert arrays["tokens"].shape[0] == 3
    assert metadata["preprocessing"]["config"]["target_shape"] == [8, 16, 16]
    assert "fine-tuning data" in metadata["preprocessing"]["source"]
    [(skipped_path, reason)] = metadata["data"]["skipped"]
    assert skipped_path.endswith("scan_9.nii.gz") and reason
    info = metadata["data"]["volumes"]["patient/scan_0.nii.gz"]
    assert info["original_spacing_mm"] == [15.0, 8.0, 8.0] and info["kind"] == "nifti"
    assert info["original_shape_dhw"] == [24, 40, 40]
