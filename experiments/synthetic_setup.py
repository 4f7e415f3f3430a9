"""Makes the demo self-contained: synthetic release -> shards -> tokenizer, once.

`experiments/configs/demo.gin` binds a `SyntheticData`; when its shards are missing,
`python -m experiments.pretrain` generates a synthetic CT-RATE release, prepares the
train and valid splits and trains a WordPiece tokenizer on the training reports.
Later runs find everything in place and skip all of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from data_pipeline import preprocess, prepare, synthetic
from data_pipeline.input_pipeline import report_text
from data_pipeline.tokenizer import train_wordpiece_tokenizer


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    """Where the demo data lives and how it is made.

    Attributes:
      root: folder holding `release/` (NIfTI + CSVs), `shards/{train,valid}/` and
        `tokenizer.json`.
      num_volumes: reconstructions in the synthetic release (both splits).
      target_spacing_mm, target_shape: the preparation grid, (z, y, x) and (D, H, W).
      conspicuity: 1.0 renders realistic findings; the demo exaggerates them so that a
        model trained for minutes on a 64 x 64 x 32 grid can see all 18
        (docs/synthetic_data.md).
    """

    root: str = "data/synthetic"
    num_volumes: int = 600
    seed: int = 0
    valid_fraction: float = 0.2
    min_prevalence: float = 0.2
    target_spacing_mm: tuple[float, float, float] = (11.25, 5.625, 5.625)
    target_shape: tuple[int, int, int] = (32, 64, 64)
    tokenizer_vocab_size: int = 2048
    conspicuity: float = 1.0

    @property
    def release_dir(self) -> str:
        return os.path.join(self.root, "release")

    def shard_dir(self, split: str) -> str:
        return os.path.join(self.root, "shards", split)

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.root, "tokenizer.json")

    @property
    def spec_path(self) -> str:
        return os.path.join(self.root, "synthetic_data.json")

    def is_ready(self) -> bool:
        return all(os.path.exists(os.path.join(self.shard_dir(s), "manifest.json"))
                   for s in ("train", "valid")) and os.path.exists(self.tokenizer_path)

    def check_root_matches(self) -> None:
        """Refuses a root that was built from other settings (the data would silently
        not be what the config says)."""
        if not os.path.exists(self.spec_path):
            return
        with open(self.spec_path, encoding="utf-8") as handle:
            recorded = json.load(handle)
        wanted = json.loads(json.dumps(dataclasses.asdict(self)))
        differ = sorted(k for k in wanted.keys() | recorded.keys()
                        if wanted.get(k) != recorded.get(k))
        if differ:
            changes = ", ".join(f"{k}: {recorded.get(k)} there, {wanted.get(k)} now"
                                for k in differ)
            raise ValueError(f"{self.root} holds synthetic data built with other settings "
                             f"({changes}); delete it or bind SyntheticData.root to "
                             f"another folder")


def ensure_synthetic_data(spec: SyntheticData, log=print) -> SyntheticData:
    """Creates whatever part of the demo data is missing; returns `spec`."""
    spec.check_root_matches()
    if spec.is_ready():
        return spec
    os.makedirs(spec.root, exist_ok=True)
    with open(spec.spec_path, "w", encoding="utf-8") as handle:
        json.dump(dataclasses.asdict(spec), handle, indent=2)
    release_root = os.path.join(spec.release_dir, "dataset")
    if not os.path.isdir(release_root):
        log(f"generating a synthetic CT-RATE release ({spec.num_volumes} volumes) "
            f"in {spec.release_dir}")
        tmp = spec.release_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        synthetic.generate_release(tmp, spec.num_volumes, seed=spec.seed,
                                   valid_fraction=spec.valid_fraction,
                                   min_prevalence=spec.min_prevalence,
                                   conspicuity=spec.conspicuity)
        os.replace(tmp, spec.release_dir)
    config = preprocess.PreprocessConfig(target_spacing_mm=tuple(spec.target_spacing_mm),
                                         target_shape=tuple(spec.target_shape))
    for split in ("train", "valid"):
        if not os.path.exists(os.path.join(spec.shard_dir(split), "manifest.json")):
            log(f"preparing the {split} split into {spec.shard_dir(split)}")
            manifest = prepare.prepare_split(spec.release_dir, split, spec.shard_dir(split),
                                             config)
            if manifest.failed:
                raise RuntimeError(f"preparing the synthetic {split} split failed for "
                                   f"{len(manifest.failed)} volumes: {manifest.failed[:3]}")
    if not os.path.exists(spec.tokenizer_path):
        log(f"training a WordPiece tokenizer on the training reports -> {spec.tokenizer_path}")
        texts = (report_text(r, ("findings", "impressions"))
                 for r in prepare.read_records(spec.shard_dir("train")))
        train_wordpiece_tokenizer(texts, spec.tokenizer_vocab_size, spec.tokenizer_path)
    return spec
