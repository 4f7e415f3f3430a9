"""``ct_rate``: CT-RATE as a tensorflow-datasets builder writing ArrayRecord.

    import tensorflow_datasets as tfds
    from data_pipeline.tfds_ct_rate import CtRate

    builder = CtRate(data_dir="/data/tfds", file_format="array_record", workers=16)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/data/CT-RATE"))
    source = tfds.data_source("ct_rate", data_dir="/data/tfds", split="train")
    example = source[0]        # dict of numpy arrays, see features.ct_rate_features

The downloaded release (CT-RATE needs a licence acceptance on Hugging Face, so
TFDS cannot download it) is the builder's *manual directory*.  Each example is
made by the project's own preparation: `release.split_inputs` joins the volume
files with the CSVs and leaves out the volumes of the release's ``no_chest_*.txt``
lists, `prepare.encode_in_order` reads and preprocesses the volumes
(`data_pipeline.preprocess`) into a `schema.CTRecord`, which becomes the example
(`features.record_to_example`).  So the volumes, texts and labels equal the
records of `python -m data_pipeline.prepare` for the same settings.

Inputs that cannot be prepared (no metadata row, a corrupt file, too few slices,
...) are skipped and listed with their reason in the dataset's ``metadata.json``
(``tfds.builder(...).info.metadata["failed"][split]``), the excluded ones under
``"excluded"``, next to the preprocessing parameters.  Examples are written in
VolumeName order (``disable_shuffling``): Grain shuffles at read time.

TensorFlow is not needed: the TFDS writing path (example serialization, the
shuffler, the ArrayRecord writer) and `tfds.data_source` run without it; only
`as_dataset()` would import it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator

import tensorflow_datasets as tfds

from data_pipeline import schema
from data_pipeline.preprocess import PreprocessConfig
from data_pipeline.prepare import encode_in_order
from data_pipeline.release import SplitInputs, failure_record, resolve_dataset_dir, split_inputs
from data_pipeline.tfds_ct_rate.features import ct_rate_features, record_to_example

_DEFAULTS = PreprocessConfig()


@dataclasses.dataclass(eq=False)
class CtRateConfig(tfds.core.BuilderConfig):
    """A `ct_rate` configuration: the preprocessing and the volume folders.

    Attributes:
      target_spacing_mm, target_shape, hu_window, min_slices, clip_before_resample:
        as in `preprocess.PreprocessConfig`.
      volumes_dirs: split -> volume folder below ``dataset/`` when not the split's
        default (the "fixed" config reads CT-RATE v2's re-headered files).
    """

    target_spacing_mm: tuple[float, float, float] = _DEFAULTS.target_spacing_mm
    target_shape: tuple[int, int, int] = _DEFAULTS.target_shape
    hu_window: tuple[float, float] = _DEFAULTS.hu_window
    min_slices: int = _DEFAULTS.min_slices
    clip_before_resample: bool = _DEFAULTS.clip_before_resample
    volumes_dirs: dict[str, str] = dataclasses.field(default_factory=dict)

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(
            target_spacing_mm=tuple(self.target_spacing_mm),
            target_shape=tuple(self.target_shape), hu_window=tuple(self.hu_window),
            min_slices=self.min_slices, clip_before_resample=self.clip_before_resample)


class CtRate(tfds.core.GeneratorBasedBuilder):
    """CT-RATE chest CT volumes with reports and 18 abnormality labels (see module doc)."""

    name = "ct_rate"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "int16 HU volumes, schema.RECORD_FORMAT_VERSION 1 content."}
    BUILDER_CONFIGS = [
        CtRateConfig(name="default", description="original volumes (dataset/train, "
                     "dataset/valid), official CT-CLIP preprocessing"),
        CtRateConfig(name="fixed", description="CT-RATE v2 re-headered volumes "
                     "(dataset/train_fixed, dataset/valid_fixed)",
                     volumes_dirs={"train": "train_fixed", "valid": "valid_fixed"}),
    ]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    CT-RATE requires accepting its licence on Hugging Face
    (https://huggingface.co/datasets/ibrahimhamamci/CT-RATE).  Download the release
    (or part of it) and pass the folder that contains `dataset/` (or `dataset/`
    itself) as the manual directory, e.g.
    `tfds.download.DownloadConfig(manual_dir="/data/CT-RATE")`.  Expected layout:
      dataset/train/train_12/train_12_a/train_12_a_1.nii.gz   (and/or valid/, *_fixed/)
      dataset/metadata/{train,validation}_metadata.csv
      dataset/radiology_text_reports/{train,validation}_reports.csv
      dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv
    A split is prepared when its volume folder exists.
    """

    def __init__(self, *, workers: int | None = 1, **kwargs):
        """`workers` processes preprocess volumes (None: all CPUs; 1: this process)."""
        self._workers = workers
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description="CT-RATE (Hamamci et al., arXiv 2403.17834): non-contrast chest CT "
                        "volumes preprocessed as in CT-CLIP, with radiology reports and the "
                        "18 multi-abnormality labels.",
            features=ct_rate_features(config.target_shape),
            homepage="https://huggingface.co/datasets/ibrahimhamamci/CT-RATE",
            citation="@article{hamamci2024ctrate, title={Developing Generalist Foundation "
                     "Models from a Multimodal Dataset for 3D Computed Tomography}, "
                     "author={Hamamci, Ibrahim Ethem and others}, "
                     "journal={arXiv preprint arXiv:2403.17834}, year={2024}}",
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                preprocessing=config.preprocess_config().to_dict(),
                record_format_version=schema.RECORD_FORMAT_VERSION, failed={},
                excluded={}),
        )

    def _split_generators(self, dl_manager):
        dataset_dir = resolve_dataset_dir(dl_manager.manual_dir)
        volume_dirs = {split: self.builder_config.volumes_dirs.get(split, files["volumes"])
                       for split, files in schema.SPLIT_FILES.items()}
        present = [split for split, folder in volume_dirs.items()
                   if os.path.isdir(os.path.join(dataset_dir, folder))]
        if not present:
            raise FileNotFoundError(
                f"{dataset_dir} holds none of the volume folders "
                f"{sorted(set(volume_dirs.values()))}; see CtRate.MANUAL_DOWNLOAD_INSTRUCTIONS")
        # The same inputs, failures and no_chest exclusions as `prepare` lists.
        return {split: self._generate_examples(
                    split_inputs(dataset_dir, split, volumes_dir=volume_dirs[split]), split)
                for split in present}

    def _generate_examples(self, inputs: SplitInputs, split: str) -> Iterator:
        """(index in VolumeName order, example) for every input that prepares."""
        failed = self.info.metadata["failed"].setdefault(split, [])
        failed.extend(inputs.failed)
        self.info.metadata["excluded"][split] = inputs.excluded
        config = self.builder_config.preprocess_config()
        # prepare's encoding, in `workers` processes; each record is decoded here.
        results = encode_in_order(inputs.entries, config, self._workers)
        for key, (entry, encoded, reason) in enumerate(results):
            if encoded is None:
                logging.warning("ct_rate: skipping %s: %s", entry.volume_name, reason)
                failed.append(failure_record(entry, reason))
                continue
            yield key, record_to_example(schema.decode_record(encoded))
        failed.sort(key=lambda failure: failure["volume_name"])
