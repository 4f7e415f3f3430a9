"""Zero-shot multi-abnormality detection (the CT-CLIP protocol), on numpy arrays.

For abnormality c the model compares each volume with two prompts, by default
"{name} is present." and "{name} is not present."; the score is the softmax over
that pair of scaled similarities, i.e. the probability given to "present".  Image
latents are computed once per volume and prompt latents once per abnormality (the
official script re-encodes the volume for every abnormality).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

DEFAULT_POSITIVE_TEMPLATE = "{name} is present."
DEFAULT_NEGATIVE_TEMPLATE = "{name} is not present."


def prompt_pairs(names: Sequence[str], positive_template: str = DEFAULT_POSITIVE_TEMPLATE,
                 negative_template: str = DEFAULT_NEGATIVE_TEMPLATE
                 ) -> tuple[list[str], list[str]]:
    """([positive prompt per class], [negative prompt per class])."""
    return ([positive_template.format(name=n) for n in names],
            [negative_template.format(name=n) for n in names])


def zero_shot_scores(image_latents: np.ndarray, positive_text_latents: np.ndarray,
                     negative_text_latents: np.ndarray, logit_scale: float) -> np.ndarray:
    """P(present) float[N, C] = softmax over (s * <i, t+_c>, s * <i, t-_c>), first entry.

    Args:
      image_latents: float[N, L] unit-norm image latents.
      positive_text_latents, negative_text_latents: float[C, L] prompt latents.
      logit_scale: s = exp(temperature).
    """
    image = np.asarray(image_latents, np.float64)
    positive = logit_scale * image @ np.asarray(positive_text_latents, np.float64).T
    negative = logit_scale * image @ np.asarray(negative_text_latents, np.float64).T
    # softmax([a, b])[0] == sigmoid(a - b), computed stably.
    return 0.5 * (1.0 + np.tanh(0.5 * (positive - negative)))


def auroc_per_class(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """float[C] area under the ROC curve per class (scikit-learn); NaN where a class has
    only one label value among the rows with a known (0/1) label."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    result = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        known = (labels[:, c] == 0) | (labels[:, c] == 1)
        y = labels[known, c]
        if y.size and 0 < y.sum() < y.size:
            result[c] = roc_auc_score(y, scores[known, c])
    return result


@dataclasses.dataclass
class ZeroShotResult:
    names: list[str]
    volume_names: list[str]
    labels: np.ndarray  # float[N, C]
    scores: np.ndarray  # float[N, C]
    auroc: np.ndarray  # float[C]

    @property
    def mean_auroc(self) -> float:
        return float(np.nanmean(self.auroc))

    def table(self) -> str:
        """A plain-text table: abnormality, positives / N, AUROC; mean last."""
        width = max(len(n) for n in self.names + ["mean"])
        lines = [f"{'abnormality':<{width}}  {'positives':>9}  {'AUROC':>6}",
                 "-" * (width + 19)]
        for c, name in enumerate(self.names):
            pos = int((self.labels[:, c] == 1).sum())
            auroc = "   n/a" if np.isnan(self.auroc[c]) else f"{self.auroc[c]:6.3f}"
            lines.append(f"{name:<{width}}  {pos:>4}/{len(self.labels):<4}  {auroc}")
        lines.append("-" * (width + 19))
        lines.append(f"{'mean':<{width}}  {'':>9}  {self.mean_auroc:6.3f}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"auroc": {n: (None if np.isnan(a) else float(a))
                          for n, a in zip(self.names, self.auroc)},
                "mean_auroc": self.mean_auroc, "num_volumes": len(self.volume_names)}


def evaluate_zero_shot(
        batches: Iterable[Mapping[str, np.ndarray]],
        embed_images: Callable[[np.ndarray], np.ndarray],
        embed_prompts: Callable[[list[str]], np.ndarray],
        logit_scale: float, names: Sequence[str],
        positive_template: str = DEFAULT_POSITIVE_TEMPLATE,
        negative_template: str = DEFAULT_NEGATIVE_TEMPLATE) -> ZeroShotResult:
    """Scores every valid row of `batches` (dicts with volume, labels, volume_name, valid).

    `embed_images(volume[B, D, H, W]) -> latents[B, L]` runs once per batch;
    `embed_prompts(list of C strings) -> latents[C, L]` runs once per template.
    """
    positive, negative = prompt_pairs(names, positive_template, negative_template)
    positive_latents = np.asarray(embed_prompts(positive))
    negative_latents = np.asarray(embed_prompts(negative))
    latents, labels, volume_names = [], [], []
    for batch in batches:
        valid = np.asarray(batch["valid"], bool)
        latents.append(np.asarray(embed_images(batch["volume"]))[valid])
        labels.append(np.asarray(batch["labels"])[valid])
        volume_names.extend(str(n) for n in np.asarray(batch["volume_name"])[valid])
    image_latents = np.concatenate(latents)
    label_matrix = np.concatenate(labels)
    scores = zero_shot_scores(image_latents, positive_latents, negative_latents, logit_scale)
    return ZeroShotResult(list(names), volume_names, label_matrix, scores,
                          auroc_per_class(label_matrix, scores))
