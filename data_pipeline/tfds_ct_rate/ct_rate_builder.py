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
made by the project's own preparation: `release.list_volumes` joins the volume
files with the CSVs, `prepare.encode_volume` reads and preprocesses one volume
(`data_pipeline.preprocess`) into a `schema.CTRecord`, which becomes the example
(`features.record_to_example`).  So the volumes, texts and labels equal the
records of `python -m data_pipeline.prepare` for the same settings.

Inputs that cannot be prepared (no metadata row, a corrupt file, too few slices,
...) are skipped and listed with their reason in the dataset's ``metadata.json``
(``tfds.builder(...).info.metadata["failed"][split]``), next to the preprocessing
parameters.  Examples are written in VolumeName order (``disable_shuffling``):
Grain shuffles at read time.

TensorFlow is not needed: the TFDS writing path (example serialization, the
shuffler, the ArrayRecord writer) and `tfds.data_source` run without it; only
`as_dataset()` would import it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import os
from typing import Iterator

import tensorflow_datasets as tfds

from data_pipeline import schema
from data_pipeline.preprocess import PreprocessConfig
from data_pipeline.prepare import encode_volume
from data_pipeline.release import VolumeEntry, list_volumes, resolve_dataset_dir
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
                record_format_version=schema.RECORD_FORMAT_VERSION, failed={}),
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
        return {split: self._generate_examples(
                    list_volumes(dataset_dir, split, volumes_dir=volume_dirs[split]), split)
                for split in present}

    def _generate_examples(self, entries: list[VolumeEntry], split: str) -> Iterator:
        """(index in VolumeName order, example) for every input that prepares."""
        failed = self.info.metadata["failed"].setdefault(split, [])
        config = self.builder_config.preprocess_config()
        good = []
        for entry in entries:
            if entry.ok:
                good.append(entry)
            else:
                failed.append(_failure(entry, entry.error))
        for key, entry, record, reason in _prepare_in_order(good, config, self._workers):
            if record is None:
                logging.warning("ct_rate: skipping %s: %s", entry.volume_name, reason)
                failed.append(_failure(entry, reason))
                continue
            yield key, record_to_example(record)
        failed.sort(key=lambda failure: failure["volume_name"])


def _failure(entry: VolumeEntry, reason: str) -> dict:
    return {"volume_name": entry.volume_name, "path": entry.path, "reason": reason}


def prepare_record(entry: VolumeEntry, config: PreprocessConfig):
    """(CTRecord, None), or (None, reason) when this input cannot be prepared."""
    try:
        return schema.decode_record(encode_volume(entry, config)), None
    except Exception as error:  # noqa: BLE001 - one bad input is a recorded failure
        return None, f"{type(error).__name__}: {error}"


def _prepare_in_order(entries: list[VolumeEntry], config: PreprocessConfig,
                      workers: int | None) -> Iterator:
    """Yields (index, entry, record or None, reason) in `entries` order.

    With several workers at most 2 * workers volumes are in flight, which bounds
    memory when TFDS's writer is slower than preprocessing.
    """
    workers = max(1, min(workers or os.cpu_count() or 1, max(len(entries), 1)))
    if workers == 1:
        for index, entry in enumerate(entries):
            yield (index, entry, *prepare_record(entry, config))
        return
    # spawn: TFDS's writer may hold threads, which fork would copy half-alive.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        remaining = iter(enumerate(entries))
        pending = collections.deque(
            (index, entry, pool.submit(prepare_record, entry, config))
            for index, entry in itertools.islice(remaining, 2 * workers))
        while pending:
            index, entry, future = pending.popleft()
            for next_index, next_entry in itertools.islice(remaining, 1):
                pending.append((next_index, next_entry,
                                pool.submit(prepare_record, next_entry, config)))
            yield (index, entry, *future.result())
