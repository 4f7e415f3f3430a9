"""Abnormality labels of a synthetic scan: Bernoulli draws with CT-RATE-like prevalences."""

from __future__ import annotations

import numpy as np

from data_pipeline.schema import ABNORMALITIES

# Approximate prevalences of the 18 labels in the CT-RATE training release.
PREVALENCES: dict[str, float] = {
    "Medical material": 0.10,
    "Arterial wall calcification": 0.28,
    "Cardiomegaly": 0.10,
    "Pericardial effusion": 0.07,
    "Coronary artery wall calcification": 0.24,
    "Hiatal hernia": 0.14,
    "Lymphadenopathy": 0.25,
    "Emphysema": 0.19,
    "Atelectasis": 0.25,
    "Lung nodule": 0.45,
    "Lung opacity": 0.38,
    "Pulmonary fibrotic sequela": 0.27,
    "Pleural effusion": 0.12,
    "Mosaic attenuation pattern": 0.08,
    "Peribronchial thickening": 0.10,
    "Consolidation": 0.17,
    "Bronchiectasis": 0.10,
    "Interlobular septal thickening": 0.07,
}
assert tuple(PREVALENCES) == ABNORMALITIES

_AGE_DRIVEN = ("Arterial wall calcification", "Coronary artery wall calcification")
AGE_RANGE = (25.0, 90.0)
# Probability that a follow-up scan keeps each label of the patient's previous scan.
FOLLOW_UP_KEEP = 0.7


def prevalences(min_prevalence: float = 0.0) -> np.ndarray:
    """float[18] target prevalences in ABNORMALITIES order, raised to `min_prevalence`."""
    return np.maximum(np.array([PREVALENCES[name] for name in ABNORMALITIES]), min_prevalence)


def label_probabilities(age: float, min_prevalence: float = 0.0) -> np.ndarray:
    """Per-label probabilities for a patient of `age` years.

    The two calcification labels rise linearly with age (x0.2 at 25 years, x1.8 at 90),
    which averages to the target prevalence over the uniform age range and correlates
    them with each other.
    """
    probabilities = prevalences(min_prevalence)
    relative_age = (age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0])
    for name in _AGE_DRIVEN:
        index = ABNORMALITIES.index(name)
        probabilities[index] *= 0.2 + 1.6 * relative_age
    return np.clip(probabilities, 0.0, 1.0)


def draw_labels(rng: np.random.Generator, age: float, min_prevalence: float = 0.0,
                previous: np.ndarray | None = None) -> np.ndarray:
    """int8[18] 0/1 labels; a follow-up scan (`previous` given) keeps most labels."""
    fresh = (rng.random(len(ABNORMALITIES)) < label_probabilities(age, min_prevalence))
    fresh = fresh.astype(np.int8)
    if previous is None:
        return fresh
    keep = rng.random(len(ABNORMALITIES)) < FOLLOW_UP_KEEP
    return np.where(keep, previous, fresh).astype(np.int8)
