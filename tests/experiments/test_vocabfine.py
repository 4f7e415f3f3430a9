"""VocabFine: the loss against the official procedure, and `python -m experiments.vocabfine`
end to end."""

import json

import jax
import numpy as np
import pytest

from ct_rate_jax import checkpoint_io
from ct_rate_jax.finetune import vocabfine
from experiments import evaluate, vocabfine as vocabfine_command


def _official_loss(image_l, positive_cl, negative_cl, scale, labels_c):
    """scripts/ct_vocabfine_train.py for one volume: per group of 6 classes, the pair
    ordered (true statement, false statement), softmax over the pair, MSE against
    [1, 0] over the 12 entries; one backward per group, i.e. the groups' losses summed."""
    total = 0.0
    for group in range(3):
        outputs, targets = [], []
        for c in range(group * 6, group * 6 + 6):
            first, second = ((positive_cl[c], negative_cl[c]) if labels_c[c] == 1
                             else (negative_cl[c], positive_cl[c]))
            logits = scale * np.array([first @ image_l, second @ image_l])
            outputs.append(np.exp(logits) / np.exp(logits).sum())
            targets.append([1.0, 0.0])
        total += np.mean((np.concatenate(outputs) - np.concatenate(targets)) ** 2)
    return total


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_loss_is_the_official_loss_over_three():
    rng = np.random.default_rng(0)
    image = _unit(rng.normal(size=(4, 16)))
    positive, negative = _unit(rng.normal(size=(18, 16))), _unit(rng.normal(size=(18, 16)))
    labels = rng.integers(0, 2, (4, 18)).astype(np.float64)
    scale = 14.3
    official = np.mean([_official_loss(image[b], positive, negative, scale, labels[b])
                        for b in range(4)])
    ours, metrics = vocabfine.vocabfine_loss(image, positive, negative, scale, labels)
    assert 3 * float(ours) == pytest.approx(official, rel=1e-6)
    # Unknown labels are left out; the rest is unchanged.
    masked = labels.copy()
    masked[1, 5] = -1
    p = vocabfine.pair_probabilities(image, positive, negative, scale)
    known = masked != -1
    expected = ((np.asarray(p) - masked) ** 2)[known].mean()
    assert float(vocabfine.vocabfine_loss(image, positive, negative, scale, masked)[0]) \
        == pytest.approx(expected, rel=1e-6)
    assert int(metrics["known_labels"]) == 72


@pytest.mark.slow
def test_vocabfine_trains_both_encoders(tiny_model_dir, tiny_synthetic_data, tmp_path):
    out = tmp_path / "vocabfine"
    assert vocabfine_command.main([
        "--checkpoint", str(tiny_model_dir), "--tokenizer", tiny_synthetic_data.tokenizer_path,
        "--train-data", tiny_synthetic_data.shard_dir("train"), "--out", str(out),
        "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0",
        "--log-every", "1"]) == 0
    record = json.loads((out / "finetune.json").read_text())
    assert record["method"] == "VocabFine" and [h["step"] for h in record["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) and 0 <= h["loss"] <= 1 for h in record["history"])
    assert record["nonfinite_steps"] == 0
    tuned, _ = checkpoint_io.load_converted(out)
    base, _ = checkpoint_io.load_converted(tiny_model_dir)
    changed = {}
    for part in ("visual_transformer", "text_transformer", "to_visual_latent",
                 "to_text_latent"):
        before = jax.tree.leaves(checkpoint_io.weights_of(getattr(base, part)))
        after = jax.tree.leaves(checkpoint_io.weights_of(getattr(tuned, part)))
        changed[part] = any(not np.array_equal(a, b) for a, b in zip(before, after))
    assert all(changed.values()), changed

    # experiments.evaluate recognises it and scores it with the prompts.
    args = evaluate.parse_args(["--checkpoint", str(out), "--data", "unused", "--out", "x"])
    loaded = evaluate.load_model(args)
    assert loaded.kind == "VocabFine" and loaded.head is None
    assert loaded.tokenizer == record["tokenizer"]
