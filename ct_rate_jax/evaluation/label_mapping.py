"""Scoring a dataset whose label set differs from CT-RATE's, through a declared mapping.

A `LabelMapping` lists, in the external dataset's column order, each external class
with the model (source) classes that make it up.  The model's scores float[N, 18]
are merged into float[N, C_ext] (`map_scores`); the labels are the external
dataset's own, float[N, C_ext], used as they are.  Source classes that no external
class mentions are simply not evaluated.

Merge rules for a class built from several source classes with scores p_1..p_m:
"max" (the original's), max_i p_i; "mean", the average; "noisy_or", 1 - prod(1 - p_i),
the probability that at least one is present if they were independent.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from data_pipeline.schema import ABNORMALITIES

MERGE_RULES: tuple[str, ...] = ("max", "mean", "noisy_or")


@dataclasses.dataclass(frozen=True)
class LabelMapping:
    """Ordered (external class, (source classes...)) pairs and a merge rule."""

    groups: tuple[tuple[str, tuple[str, ...]], ...]
    merge: str = "max"
    source_names: tuple[str, ...] = ABNORMALITIES

    def __post_init__(self):
        if self.merge not in MERGE_RULES:
            raise ValueError(f"merge must be one of {MERGE_RULES}, got {self.merge!r}")
        targets = [t for t, _ in self.groups]
        if len(set(targets)) != len(targets):
            raise ValueError(f"external class names repeat in groups: {targets}")
        for target, members in self.groups:
            if not members:
                raise ValueError(f"external class {target!r} has no source classes")
            unknown = [m for m in members if m not in self.source_names]
            if unknown:
                raise ValueError(f"external class {target!r} maps to {unknown}, which are "
                                 f"not among source_names")

    @classmethod
    def from_dict(cls, groups: Mapping[str, Sequence[str]], merge: str = "max",
                  source_names: Sequence[str] = ABNORMALITIES) -> "LabelMapping":
        """{external class: [source classes]}; dict order = external column order."""
        return cls(tuple((t, tuple(m)) for t, m in groups.items()), merge,
                   tuple(source_names))

    @property
    def target_names(self) -> list[str]:
        return [t for t, _ in self.groups]

    def source_indices(self) -> list[list[int]]:
        return [[self.source_names.index(m) for m in members] for _, members in self.groups]

    def map_scores(self, scores) -> np.ndarray:
        """float[N, C_ext] merged scores from the model's float[N, C_source]."""
        scores = np.asarray(scores, np.float64)
        if scores.ndim != 2 or scores.shape[1] != len(self.source_names):
            raise ValueError(f"scores must be [N, {len(self.source_names)}] (one column "
                             f"per source class), got {scores.shape}")
        merged = []
        for members in self.source_indices():
            block = scores[:, members]
            if self.merge == "max":
                merged.append(block.max(1))
            elif self.merge == "mean":
                merged.append(block.mean(1))
            else:
                merged.append(1.0 - np.prod(1.0 - block, axis=1))
        return np.stack(merged, axis=1)

    def map_labels(self, labels) -> np.ndarray:
        """float[N, C_ext] labels of a source-labelled set in the external vocabulary.

        Present (1) if any member is 1; else absent (0) if every member is 0; else
        unknown (-1).  For evaluating CT-RATE itself in an external label set; an
        external dataset's own labels need no mapping.
        """
        labels = np.asarray(labels, np.float64)
        if labels.ndim != 2 or labels.shape[1] != len(self.source_names):
            raise ValueError(f"labels must be [N, {len(self.source_names)}], got "
                             f"{labels.shape}")
        out = []
        for members in self.source_indices():
            block = labels[:, members]
            out.append(np.where((block == 1).any(1), 1.0,
                                np.where((block == 0).all(1), 0.0, -1.0)))
        return np.stack(out, axis=1)


# RAD-ChestCT in the CT-CLIP paper's external validation: 16 classes, read off the
# official scripts/eval.py `evaluate_external`: the CT-RATE classes in CT-RATE order
# without "Coronary artery wall calcification" and "Mosaic attenuation pattern", with
# arterial wall calcification scored as the max over arterial and coronary artery
# wall calcification; external label column j is the j-th class of this list.  The
# names are the CT-RATE names the original reports them under; the external label
# file's own column headers are not in the repository.
_RAD_MERGED = {"Arterial wall calcification": ("Arterial wall calcification",
                                               "Coronary artery wall calcification")}
_RAD_DROPPED = ("Coronary artery wall calcification", "Mosaic attenuation pattern")
RAD_CHESTCT_MAPPING = LabelMapping(
    tuple((name, _RAD_MERGED.get(name, (name,)))
          for name in ABNORMALITIES if name not in _RAD_DROPPED),
    merge="max")


NAMED_MAPPINGS = {"rad_chestct": RAD_CHESTCT_MAPPING}


def load_label_mapping(spec: str) -> LabelMapping:
    """A named mapping ("rad_chestct") or a JSON file declaring one:

        {"merge": "max",                       (optional; "max", "mean" or "noisy_or")
         "classes": {"Arterial wall calcification": ["Arterial wall calcification",
                                                     "Coronary artery wall calcification"],
                     "Cardiomegaly": ["Cardiomegaly"], ...}}

    "classes" lists the target classes in their column order, each with the CT-RATE
    label columns it is built from.  Errors name the file.
    """
    import json
    import os

    if spec in NAMED_MAPPINGS:
        return NAMED_MAPPINGS[spec]
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"label mapping {spec!r} is neither a known name "
                                f"({', '.join(NAMED_MAPPINGS)}) nor a JSON file")
    try:
        with open(spec, encoding="utf-8") as f:
            declared = json.load(f)
        classes = declared["classes"]
        if not isinstance(classes, dict) or not all(
                isinstance(m, list) and all(isinstance(x, str) for x in m)
                for m in classes.values()):
            raise ValueError('"classes" must map each target class to a list of CT-RATE '
                             "column names")
        unknown = set(declared) - {"classes", "merge"}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} (allowed: classes, merge)")
        return LabelMapping.from_dict(classes, declared.get("merge", "max"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        what = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(f"label mapping file {spec}: {what}") from error
