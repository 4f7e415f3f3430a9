"""Grain input pipeline over prepared ArrayRecord shards.

  ArrayRecord shards -> global shuffle (seed; reshuffled every epoch) -> repeat
    -> this host's rows of every global batch -> decode + normalise + tokenise
    -> batch -> prefetch (threads, optionally worker processes)

Every host builds the same shuffled stream and keeps its own contiguous slice of each
global batch, so the global batch (the concatenation of the host batches in process
order) is the same whatever the number of hosts.  The iterator's state (Grain's
`get_state()`, a small JSON-able dict) is saved with every checkpoint, so a resumed
run sees exactly the batches an uninterrupted run would have seen.

Batches are dicts of numpy arrays:
  volume          float32[B, D, H, W]  HU mapped to [-1, 1] (`normalise_hu`); or, with
                  `PipelineConfig.normalise_on_device` (training only), instead:
  volume_hu       int16[B, D, H, W]    the stored HU, normalised by the consumer inside
                                       its jitted step (`schema.model_volume`), and
  intensity_jitter float32[B, 2]       (scale, shift) per row, when augmentation jitters
  input_ids       int32[B, S]
  attention_mask  int32[B, S]
  labels          float32[B, 18]       (-1 where unknown)
  volume_name     str[B]               (host-side only, for logs and evaluation)
  valid           bool[B]              False for padding rows of a final eval batch

With `sentence_views = m > 0` training batches also hold m single sentences per report
(`draw_sentence_views`, for `losses.multi_positive_softmax_loss`):
  sentence_ids    int32[B, m, S_s]     one sentence each, S_s = sentence_view_length
  sentence_mask   int32[B, m, S_s]
  sentence_keys   int32[B, m]          the statement each sentence makes (`statement_hash`)
  report_keys     int32[B, R]          every statement of the report, -1 padded
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
import os
import re
import sys
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from data_pipeline import schema
from data_pipeline.augment import VolumeAugmentation, apply_intensity_jitter
from data_pipeline.tokenizer import TextEncoder

TEXT_SECTIONS = ("findings", "impressions")


# The one normalisation (int16 HU -> float32 [-1, 1]) lives in the shared schema module
# so that jitted model steps can apply it on the device; re-exported here.
normalise_hu = schema.normalise_hu


def report_text(record: schema.CTRecord, sections: Sequence[str] = ("findings",)) -> str:
    """The text a volume is paired with.

    The official trainer uses the Findings section only and strips quotes and
    parentheses; `sections` can add the Impressions.
    """
    unknown = set(sections) - set(TEXT_SECTIONS)
    if unknown:
        raise ValueError(f"unknown report sections {sorted(unknown)}; use {TEXT_SECTIONS}")
    parts = [getattr(record, section) for section in sections]
    text = " ".join(p for p in parts if p and p != "Not given.")
    for char in "\"'()":
        text = text.replace(char, "")
    return text


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sample_sentences(text: str, rng: np.random.Generator) -> str:
    """A random non-empty subset of the text's sentences, in their original order.

    Text augmentation in the spirit of ConVIRT's sentence sampling.  The number of
    sentences kept is geometric (1 with probability 1/2, 2 with 1/4, ...), so the model
    often sees single statements of the form the zero-shot prompts take ("Lung nodule
    is present." / "Pleural effusion is not present.") paired with a volume; that is
    where it learns what a negation does.
    """
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
    if len(sentences) <= 1:
        return text
    count = min(int(rng.geometric(0.5)), len(sentences))
    keep = np.sort(rng.choice(len(sentences), size=count, replace=False))
    return " ".join(sentences[i] for i in keep)


SENTENCE_KEYS = ("text", "synthetic_statement")


def report_sentences(text: str) -> list[str]:
    """The sentences of a training text (split after '.', '!' or '?')."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def sentence_key_fn(kind: str):
    """`sentence -> str` naming the statement a sentence makes; equal keys are the same text
    for the multi-positive sentence loss.

    "text": the normalised sentence itself (lower case, single spaces; any corpus).
    "synthetic_statement": for the synthetic release's reports, "<Abnormality>: present"
      or ": absent" for every sentence written from a finding's templates, so that
      "No pleural effusion was detected." and "Pleural effusion is not present." are one
      statement (`data_pipeline.synthetic.statements`); other sentences key as text.
    """
    from data_pipeline.synthetic import statements  # light: templates and regexes only

    if kind == "text":
        return statements.normalised_sentence
    if kind == "synthetic_statement":
        return statements.statement_key
    raise ValueError(f"sentence_keys must be one of {SENTENCE_KEYS}, got {kind!r}")


def statement_hash(key: str) -> int:
    """A statement key as a non-negative int32 (CRC-32, stable across processes and runs),
    so that the train step can compare statements of the whole global batch on device."""
    return zlib.crc32(key.encode("utf-8")) & 0x7FFFFFFF


def draw_sentence_views(text: str, views: int, key_fn, rng: np.random.Generator,
                        max_report_sentences: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`views` sentences of `text` drawn uniformly (without replacement while there are
    enough), their statement hashes int32[views] and the hashes of every statement of
    the text, int32[max_report_sentences] padded with -1."""
    sentences = report_sentences(text) or [text]
    keys = [statement_hash(key_fn(s)) for s in sentences]
    picked = rng.choice(len(sentences), size=views, replace=len(sentences) < views)
    unique = sorted(set(keys))[:max_report_sentences]
    report_keys = np.full(max_report_sentences, -1, np.int32)
    report_keys[:len(unique)] = unique
    return ([sentences[i] for i in picked], np.asarray([keys[i] for i in picked], np.int32),
            report_keys)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What a pipeline reads and how it batches.

    Attributes:
      shard_dir: folder with the shards and manifest.json written by data_pipeline.prepare.
      global_batch_size: rows per step over all hosts; each host yields its share.
      max_text_length: tokens per report, incl. [CLS] and [SEP].
      text_sections: report sections joined into the training text.
      sentence_sampling_prob: training only; the probability of replacing a report by a
        random subset of its sentences (`sample_sentences`); 0 (default) keeps reports
        whole, as the official trainer does.
      num_workers: Grain worker processes that decode and batch ahead of training
        (`grain.MultiprocessingOptions`; 0: decode in threads of this process).
      read_threads: threads reading (and decompressing) records ahead; ArrayRecord
        releases the GIL while it reads, so they overlap on free cores.
      prefetch_buffer_size: records read ahead per thread pool.
      normalise_on_device: training batches carry the stored int16 `volume_hu` (and
        `intensity_jitter` when augmentation jitters) instead of float32 `volume`;
        the training step normalises with `schema.model_volume` on the device.  Half
        the bytes per batch and no float32 pass on the host (docs/performance.md).
        Evaluation batches (`iterate_eval_batches`) always hold float32 `volume`.
      sentence_views: training only; single sentences drawn per report (uniformly, from
        the text before sentence sampling) as extra text views for the multi-positive
        sentence loss (`draw_sentence_views`); 0 (default): none.
      sentence_view_length: tokens per sentence view, incl. [CLS] and [SEP].
      sentence_keys: which sentences count as the same text: "text" or
        "synthetic_statement" (`sentence_key_fn`).
      max_report_sentences: statements kept per report in `report_keys`.
      augmentation: training-time volume augmentation (`augment.VolumeAugmentation`:
        random crop, flips, intensity jitter); None (default) or the defaults
        change nothing.  Evaluation applies only its centre crop.
      bad_records: what a training record that cannot be read or decoded does:
        "stop" (default) raises `BadRecordError` naming its shard, index and volume;
        "skip" trains on the next readable record in its place and marks the row
        `substituted` (the trainer counts them), so batches keep their size.
    """

    shard_dir: str
    tokenizer_path: str
    global_batch_size: int
    max_text_length: int = 128
    text_sections: tuple[str, ...] = ("findings",)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    sentence_sampling_prob: float = 0.0
    seed: int = 0
    num_workers: int = 0
    bad_records: str = "stop"
    read_threads: int = 2
    prefetch_buffer_size: int = 4
    augmentation: VolumeAugmentation | None = None
    normalise_on_device: bool = False
    sentence_views: int = 0
    sentence_view_length: int = 32
    sentence_keys: str = "text"
    max_report_sentences: int = 64


def _load_manifest(shard_dir: str):
    """The shard folder's manifest, with a clear error when it is missing or empty."""
    from data_pipeline.prepare import Manifest  # the manifest format lives with its writer

    manifest_path = os.path.join(shard_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(
            f"no manifest.json in {shard_dir!r}: prepare shards with "
            "`python -m data_pipeline.prepare --ctrate-root DIR --split train --out SHARD_DIR`")
    manifest = Manifest.load(manifest_path)
    if not manifest.shards:
        raise ValueError(f"the manifest in {shard_dir!r} lists no shards")
    return manifest


def shard_paths(shard_dir: str) -> list[str]:
    """Shard files listed by the manifest (so a half-written shard is never read)."""
    return _load_manifest(shard_dir).shard_paths()


def peek_record(shard_dir: str) -> schema.CTRecord:
    """The first record of a shard folder (to check shapes before training starts)."""
    source = grain.sources.ArrayRecordDataSource(shard_paths(shard_dir))
    return schema.decode_record(source[0])


BAD_RECORD_POLICIES = ("stop", "skip")


class BadRecordError(RuntimeError):
    """A training record that could not be read or decoded (its shard and index named)."""


@dataclasses.dataclass(frozen=True)
class RecordLocator:
    """Maps a global record index to (shard path, index in the shard, VolumeName), from
    the manifest, so that an error can say which file holds the bad record."""

    shard_paths: tuple[str, ...]
    shard_sizes: tuple[int, ...]
    volume_names: tuple[tuple[str, ...], ...]

    @classmethod
    def from_shard_dir(cls, shard_dir: str) -> "RecordLocator":
        manifest = _load_manifest(shard_dir)
        return cls(tuple(manifest.shard_paths()),
                   tuple(shard.num_records for shard in manifest.shards),
                   tuple(tuple(shard.volume_names) for shard in manifest.shards))

    def describe(self, index: int) -> str:
        local = int(index)
        for path, size, names in zip(self.shard_paths, self.shard_sizes, self.volume_names):
            if local < size:
                name = names[local] if local < len(names) else "?"
                return f"record {local} of shard {path} ({name})"
            local -= size
        return f"record {index} (beyond the {sum(self.shard_sizes)} the manifest lists)"


class _IndexedSource:
    """A random-access source whose items are (global index, record bytes or the read
    error): reading never raises, so the decoding step can name the bad record and
    apply the configured policy."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        try:
            return int(index), self._source[index]
        except Exception as error:  # noqa: BLE001 - reported with its location downstream
            return int(index), error


class _HostRowsOfGlobalBatches(grain.MapDataset):
    """Element j of this host = element (j // b) * B + offset + j % b of the parent.

    B is the global batch size, b this host's share and offset = process_index * b:
    each host keeps a contiguous block of rows of every global batch.
    """

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the "
                             f"{process_count} processes")
        self._global = global_batch
        self._local = global_batch // process_count
        self._offset = process_index * self._local
        self._length = (len(parent) // global_batch) * self._local \
            if len(parent) < sys.maxsize else sys.maxsize

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(index, self._local)
        return self._parent[step * self._global + self._offset + row]

    def __str__(self) -> str:
        return f"HostRowsOfGlobalBatches(global={self._global}, offset={self._offset})"


class RecordToExample:
    """Decodes a record into one example (picklable, for Grain worker processes).

    Called with an rng (Grain's `random_map`, training) it applies the configured
    text and volume augmentation; without one (evaluation) it is deterministic.
    The volume stays int16 here: the example holds `volume_hu`, a view of the record
    bytes (cropped and flipped, not copied) and, when intensity jitter is on,
    `intensity_jitter` (float32[2] scale, shift); `BatchExamples` normalises each
    view straight into the float32 batch buffer, so a volume is converted once and
    never stacked.
    """

    def __init__(self, text_encoder: TextEncoder, text_sections, hu_window,
                 sentence_sampling_prob: float = 0.0, *, source=None,
                 locator: RecordLocator | None = None, bad_records: str = "stop",
                 augmentation: VolumeAugmentation | None = None, sentence_views: int = 0,
                 sentence_encoder: TextEncoder | None = None, sentence_keys: str = "text",
                 max_report_sentences: int = 64):
        if bad_records not in BAD_RECORD_POLICIES:
            raise ValueError(f"bad_records must be one of {BAD_RECORD_POLICIES}, got "
                             f"{bad_records!r}")
        self.text_encoder = text_encoder
        self.text_sections = tuple(text_sections)
        self.hu_window = tuple(hu_window)
        self.sentence_sampling_prob = sentence_sampling_prob
        self.source, self.locator, self.bad_records = source, locator, bad_records
        self.augmentation = augmentation
        if sentence_views and sentence_encoder is None:
            raise ValueError("sentence_views needs a sentence_encoder")
        if sentence_views:
            sentence_key_fn(sentence_keys)  # fails here for an unknown kind
        self.sentence_views, self.sentence_encoder = sentence_views, sentence_encoder
        self.sentence_keys, self.max_report_sentences = sentence_keys, max_report_sentences

    def _decode(self, item) -> tuple[schema.CTRecord, bool]:
        """(record, substituted) for bytes or an (index, bytes | read error) item."""
        if not isinstance(item, tuple):
            return schema.decode_record(item), False
        index, data = item
        for attempt in range(len(self.source) if self.source is not None else 1):
            try:
                if isinstance(data, Exception):
                    raise data
                return schema.decode_record(data), attempt > 0
            except Exception as error:  # noqa: BLE001 - any failure names the record
                where = (self.locator.describe(index) if self.locator is not None
                         else f"record {index}")
                if self.bad_records == "stop" or self.source is None:
                    raise BadRecordError(f"cannot read {where}: {error!r} (set "
                                         f"train.bad_records='skip' to train past it)"
                                         ) from error
                logging.warning("skipping unreadable %s: %r", where, error)
                index = (index + 1) % len(self.source)
                data = self.source[index][1]
        raise BadRecordError("no readable record in the whole dataset")

    def __call__(self, data, rng: np.random.Generator | None = None) -> dict[str, Any]:
        record, substituted = self._decode(data)
        full_text = text = report_text(record, self.text_sections)
        if rng is not None and rng.random() < self.sentence_sampling_prob:
            text = sample_sentences(text, rng)
        input_ids, attention_mask = self.text_encoder.encode(text)
        example = {"volume_hu": record.volume_hu}
        # Volume draws after the text draws, so that switching augmentation on leaves
        # the text augmentation unchanged.
        augmentation = self.augmentation
        if augmentation is not None and augmentation.active:
            if rng is None:
                example["volume_hu"] = augmentation.centre_crop(record.volume_hu)
            else:
                example["volume_hu"], jitter = augmentation.draw(record.volume_hu, rng)
                if jitter is not None:
                    example["intensity_jitter"] = jitter
        if rng is not None and self.sentence_views:  # last: the draws above stay the same
            sentences, example["sentence_keys"], example["report_keys"] = draw_sentence_views(
                full_text, self.sentence_views, sentence_key_fn(self.sentence_keys), rng,
                self.max_report_sentences)
            example["sentence_ids"], example["sentence_mask"] = (
                self.sentence_encoder.encode_batch(sentences))
        return example | {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": record.labels.astype(np.float32),
            "volume_name": np.asarray(record.volume_name),
            "valid": np.asarray(True),
            "substituted": np.asarray(substituted),
        }


class BatchExamples:
    """Examples -> a batch (picklable, Grain's `batch_fn`).

    `volume` float32[B, D, H, W] is written row by row by `normalise_hu` from each
    example's int16 `volume_hu` (then intensity-jittered where the example says so);
    every other field is stacked.  One conversion per volume and no float32 copy.
    With `normalise=False` the int16 views are copied into `volume_hu`
    int16[B, D, H, W] instead (plus `intensity_jitter` float32[B, 2], (1, 0) for
    rows without, when any example has one), for `schema.model_volume` on the device.
    """

    def __init__(self, hu_window, normalise: bool = True):
        self.hu_window = tuple(hu_window)
        self.normalise = normalise

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        first = examples[0]
        if not self.normalise:
            return self._int16_batch(examples)
        volume = np.empty((len(examples), *first["volume_hu"].shape), np.float32)
        for row, example in zip(volume, examples):
            normalise_hu(example["volume_hu"], self.hu_window, out=row)
            if "intensity_jitter" in example:
                apply_intensity_jitter(row, example["intensity_jitter"])
        batch = {"volume": volume}
        for key in first:
            if key not in ("volume_hu", "intensity_jitter"):
                batch[key] = np.stack([example[key] for example in examples])
        return batch

    def _int16_batch(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        first = examples[0]
        volume_hu = np.empty((len(examples), *first["volume_hu"].shape), np.int16)
        for row, example in zip(volume_hu, examples):
            row[...] = example["volume_hu"]  # the one copy of the record's voxels
        batch = {"volume_hu": volume_hu}
        if any("intensity_jitter" in example for example in examples):
            identity = np.array([1.0, 0.0], np.float32)
            batch["intensity_jitter"] = np.stack(
                [example.get("intensity_jitter", identity) for example in examples])
        for key in first:
            if key not in ("volume_hu", "intensity_jitter"):
                batch[key] = np.stack([example[key] for example in examples])
        return batch


def _text_encoder(config: PipelineConfig) -> TextEncoder:
    return TextEncoder.from_path(config.tokenizer_path, config.max_text_length)


def make_train_dataset(config: PipelineConfig, *, process_index: int = 0,
                       process_count: int = 1, num_epochs: int | None = None
                       ) -> grain.IterDataset:
    """An endless (or `num_epochs`-long) stream of this host's training batches."""
    locator = RecordLocator.from_shard_dir(config.shard_dir)  # reads the manifest once
    source = grain.sources.ArrayRecordDataSource(list(locator.shard_paths))
    if len(source) < config.global_batch_size:
        raise ValueError(f"{config.shard_dir!r} holds {len(source)} records, fewer than one "
                         f"global batch of {config.global_batch_size}")
    indexed = _IndexedSource(source)
    dataset = (grain.MapDataset.source(indexed)
               .shuffle(seed=config.seed)
               .repeat(num_epochs))
    # The augmentation's random stream is drawn from the global element index (before
    # the host's rows are picked; MapDataset is lazy, so only those rows are decoded):
    # the global batch does not depend on the number of hosts.
    dataset = dataset.random_map(
        RecordToExample(_text_encoder(config), config.text_sections, config.hu_window,
                        config.sentence_sampling_prob, source=indexed, locator=locator,
                        bad_records=config.bad_records, augmentation=config.augmentation,
                        sentence_views=config.sentence_views,
                        sentence_encoder=(TextEncoder.from_path(config.tokenizer_path,
                                                                config.sentence_view_length)
                                          if config.sentence_views else None),
                        sentence_keys=config.sentence_keys,
                        max_report_sentences=config.max_report_sentences),
        seed=config.seed)
    dataset = _HostRowsOfGlobalBatches(dataset, config.global_batch_size, process_index,
                                       process_count)
    dataset = dataset.batch(config.global_batch_size // process_count, drop_remainder=True,
                            batch_fn=BatchExamples(config.hu_window,
                                                   normalise=not config.normalise_on_device))
    return _prefetch(dataset, config)


def _prefetch(dataset: grain.MapDataset, config: PipelineConfig) -> grain.IterDataset:
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_buffer_size))
    if config.num_workers > 0:
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.num_workers))
    return iter_dataset


def iterate_eval_batches(config: PipelineConfig, *, process_index: int = 0,
                         process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every record once, in shard order, in batches padded to a fixed size.

    The final batch is padded with copies of its first row marked `valid=False`, so
    that a jitted model sees one batch shape only.  Volumes are float32 `volume`
    whatever `normalise_on_device` says (evaluation code embeds `volume`).
    """
    source = grain.sources.ArrayRecordDataSource(shard_paths(config.shard_dir))
    host_batch = config.global_batch_size // process_count
    dataset = grain.MapDataset.source(source)
    num_batches = -(-len(dataset) // config.global_batch_size)
    to_example = RecordToExample(_text_encoder(config), config.text_sections, config.hu_window,
                                 augmentation=config.augmentation)
    to_batch = BatchExamples(config.hu_window)
    for step in range(num_batches):
        start = step * config.global_batch_size + process_index * host_batch
        indices = [i for i in range(start, start + host_batch) if i < len(dataset)]
        examples = [to_example(dataset[i]) for i in indices] if indices else []
        if not examples:  # this host has no rows left but must still join the step
            examples = [dict(to_example(dataset[0]), valid=np.asarray(False))]
        while len(examples) < host_batch:
            examples.append(dict(examples[0], valid=np.asarray(False)))
        yield to_batch(examples)
