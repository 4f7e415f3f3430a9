"""Zero-shot scoring and AUROC against scikit-learn and hand-computed cases."""

import numpy as np
from sklearn.metrics import roc_auc_score

from ct_rate_jax.evaluation import zero_shot


def test_scores_are_the_softmax_over_the_prompt_pair():
    image = np.array([[1.0, 0.0], [0.0, 1.0]])
    positive = np.array([[1.0, 0.0]])
    negative = np.array([[0.0, 1.0]])
    scores = zero_shot.zero_shot_scores(image, positive, negative, logit_scale=2.0)
    e2 = np.exp(2.0)
    np.testing.assert_allclose(scores[:, 0], [e2 / (e2 + 1), 1 / (1 + e2)])


def test_auroc_per_class_matches_sklearn_and_skips_single_class_columns():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (50, 3)).astype(float)
    labels[:, 2] = 1  # only positives: undefined
    labels[0, 1] = -1  # unknown label: ignored
    scores = rng.uniform(size=(50, 3))
    auroc = zero_shot.auroc_per_class(labels, scores)
    assert auroc[0] == roc_auc_score(labels[:, 0], scores[:, 0])
    assert auroc[1] == roc_auc_score(labels[1:, 1], scores[1:, 1])
    assert np.isnan(auroc[2])


def test_evaluate_zero_shot_embeds_each_batch_once_and_drops_padding():
    names = ["Cardiomegaly", "Emphysema"]
    calls = {"images": 0, "prompts": 0}

    def embed_images(volume):
        calls["images"] += 1
        return volume.reshape(len(volume), -1)[:, :2]

    def embed_prompts(texts):
        calls["prompts"] += 1
        present = "not" not in texts[0]
        return np.eye(2) if present else np.eye(2)[::-1]

    batches = [{"volume": np.array([[[1.0, 0.0]], [[0.0, 1.0]]]),
                "labels": np.array([[1, 0], [0, 1]]), "volume_name": np.array(["a", "b"]),
                "valid": np.array([True, True])},
               {"volume": np.array([[[0.9, 0.1]], [[0.9, 0.1]]]),
                "labels": np.array([[1, 0], [1, 0]]), "volume_name": np.array(["c", "c"]),
                "valid": np.array([True, False])}]
    result = zero_shot.evaluate_zero_shot(batches, embed_images, embed_prompts, 10.0, names)
    assert calls == {"images": 2, "prompts": 2}
    assert result.volume_names == ["a", "b", "c"]
    np.testing.assert_allclose(result.auroc, [1.0, 1.0])
    assert "Cardiomegaly" in result.table() and "mean" in result.table()
