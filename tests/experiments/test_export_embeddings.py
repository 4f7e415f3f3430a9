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
