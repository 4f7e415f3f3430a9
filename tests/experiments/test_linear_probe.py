"""ClassFine: the weighted BCE, the head's training, and `python -m experiments.linear_probe`
end to end into `experiments.evaluate`."""

import csv
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from ct_rate_jax import checkpoint_io
from ct_rate_jax.finetune import classfine
from data_pipeline import input_pipeline, schema
from experiments import evaluate, linear_probe


def _numpy_weighted_bce(logits, labels, pos_weight):
    """torch's BCEWithLogitsLoss(pos_weight) written out, over the known labels."""
    p = 1.0 / (1.0 + np.exp(-logits))
    known = (labels == 0) | (labels == 1)
    y = np.where(known, labels, 0.0)
    per = -(pos_weight * y * np.log(p) + (1 - y) * np.log(1 - p))
    return per[known].mean()


def test_weighted_bce_and_its_gradient_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (7, 5))
    labels = rng.integers(0, 2, (7, 5)).astype(float)
    labels[0, 1] = labels[3, 4] = -1  # unknown: left out
    weights = rng.uniform(0.5, 9, 5)
    ours = classfine.weighted_bce(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
    np.testing.assert_allclose(float(ours), _numpy_weighted_bce(logits, labels, weights),
                               rtol=1e-6)
    # d loss / d logit = (sigmoid(x)(w y + 1 - y) - w y) / #known, zero where unknown.
    grad = jax.grad(classfine.weighted_bce)(jnp.asarray(logits), jnp.asarray(labels),
                                            jnp.asarray(weights))
    known = (labels == 0) | (labels == 1)
    y = np.where(known, labels, 0)
    p = 1 / (1 + np.exp(-logits))
    expected = np.where(known, p * (weights * y + 1 - y) - weights * y, 0) / known.sum()
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.torch
def test_weighted_bce_matches_torch():
    import torch

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (8, 18)).astype(np.float32)
    labels = rng.integers(0, 2, (8, 18)).astype(np.float32)
    weights = rng.uniform(1, 30, 18).astype(np.float32)
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(weights))(
        torch.tensor(logits), torch.tensor(labels))
    ours = classfine.weighted_bce(logits, labels, weights)
    np.testing.assert_allclose(float(ours), float(expected), rtol=1e-5)


def test_positive_weights_and_schedule():
    labels = np.array([[1, 0], [0, 0], [0, 1], [1, -1], [0, 0]], float)
    np.testing.assert_allclose(classfine.positive_weights(labels), [3 / 2, 3 / 1])
    with pytest.raises(ValueError, match="column"):
        classfine.positive_weights(np.zeros((3, 2)))
    # The official cosine_lr, step by step.
    schedule = classfine.official_schedule(1e-3, 4, 10)
    for step in range(10):
        official = (1e-3 * (step + 1) / 4 if step < 4
                    else 0.5 * (1 + np.cos(np.pi * (step - 4) / 6)) * 1e-3)
        assert float(schedule(step)) == pytest.approx(official, rel=1e-6)


def test_head_reaches_the_weighted_logistic_regression_optimum():
    """Without dropout and decay, full-batch training converges to the optimum of the
    weighted BCE, which per class is scikit-learn's unpenalised logistic regression on
    relu(latents) with sample weight w_c for positives."""
    rng = np.random.default_rng(2)
    latents = rng.normal(0, 1, (300, 6)).astype(np.float32)
    truth = rng.normal(0, 1, (6, 3))
    labels = (np.maximum(latents, 0) @ truth + rng.normal(0, 3, (300, 3)) > 0.8).astype(
        np.float32)
    settings = classfine.ClassFineSettings(learning_rate=0.05, weight_decay=0.0, epochs=2000,
                                           batch_size=300, warmup_steps=0, dropout=0.0,
                                           grad_clip_norm=None)
    result = classfine.train_head(latents, labels, settings)
    features = np.maximum(latents, 0)
    weights = classfine.positive_weights(labels)
    for c in range(3):
        reference = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(
            features, labels[:, c], sample_weight=np.where(labels[:, c] == 1, weights[c], 1))
        np.testing.assert_allclose(result.head["classifier.weight"][c], reference.coef_[0],
                                   atol=1e-3)
        assert result.head["classifier.bias"][c] == pytest.approx(reference.intercept_[0],
                                                                  abs=1e-3)
    logits = features @ result.head["classifier.weight"].T + result.head["classifier.bias"]
    np.testing.assert_allclose(classfine.head_probabilities(result.head, latents),
                               1 / (1 + np.exp(-logits)), rtol=1e-5)


@pytest.mark.slow
def test_linear_probe_then_evaluate(tiny_model_dir, tiny_synthetic_data, tmp_path, capsys):
    train, valid = tiny_synthetic_data.shard_dir("train"), tiny_synthetic_data.shard_dir("valid")
    out = tmp_path / "classfine"
    assert linear_probe.main([
        "--checkpoint", str(tiny_model_dir), "--tokenizer", tiny_synthetic_data.tokenizer_path,
        "--train-data", train, "--val-data", valid, "--out", str(out), "--epochs", "3",
        "--lr", "1e-2", "--warmup-steps", "0"]) == 0
    model, extras = checkpoint_io.load_converted(out)
    base, _ = checkpoint_io.load_converted(tiny_model_dir)
    # The encoder is frozen: its weights are the base model's, bit for bit.
    for got, want in zip(jax.tree.leaves(checkpoint_io.weights_of(model)),
                         jax.tree.leaves(checkpoint_io.weights_of(base))):
        np.testing.assert_array_equal(got, want)
    assert extras["classifier.weight"].shape == (18, model.config.dim_latent)
    record = json.loads((out / "finetune.json").read_text())
    assert record["method"] == "ClassFine" and len(record["history"]) == 3
    assert "val_mean_auroc" in record["history"][0]
    assert json.loads((out / "conversion.json").read_text())["variant"] == "lipro"

    # The positive weights are negatives / positives of the training labels.
    source = grain.sources.ArrayRecordDataSource(input_pipeline.shard_paths(train))
    labels = np.stack([schema.decode_record(source[i]).labels for i in range(len(source))])
    negatives, positives = (labels == 0).sum(0), (labels == 1).sum(0)
    np.testing.assert_allclose(list(record["positive_weights"].values()),
                               negatives / positives, rtol=1e-6)

    # evaluate scores with the head (tokenizer and text settings from finetune.json), in
    # a label set declared by a JSON file.
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"merge": "max", "classes": {
        "calcification": ["Arterial wall calcification", "Coronary artery wall calcification"],
        "Emphysema": ["Emphysema"]}}))
    report_dir = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(out), "--data", valid, "--out", str(report_dir),
                          "--bootstrap", "10", "--label-mapping", str(mapping)]) == 0
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["run"]["model_kind"] == "ClassFine" and "zero_shot" not in metrics
    assert metrics["run"]["scoring"]["label_mapping"] == str(mapping)
    assert list(metrics["classfine"]["auroc"]) == ["calcification", "Emphysema"]
    latents = np.load(report_dir / "latents.npz")
    probabilities = classfine.head_probabilities(extras, latents["image_latents"])
    merged = np.stack([probabilities[:, [1, 4]].max(1), probabilities[:, 7]], axis=1)
    rows = list(csv.DictReader((report_dir / "scores.csv").open()))
    np.testing.assert_array_equal(
        [[float(r["score: calcification"]), float(r["score: Emphysema"])] for r in rows], merged)
    html = (report_dir / "report.html").read_text()
    assert "ClassFine" in html and html.count("data:image/png;base64,") == 2

    capsys.readouterr()
    assert linear_probe.main(["--checkpoint", str(tiny_model_dir), "--train-data", train,
                              "--tokenizer", tiny_synthetic_data.tokenizer_path,
                              "--out", str(out)]) == 1
    assert "already holds a model" in capsys.readouterr().err
