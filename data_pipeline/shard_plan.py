"""Deterministic shard assignment and per-shard completion records, for resumable preparation.

Preparation decides up front which inputs go into which shard: the sorted list of
inputs is cut into consecutive groups of `inputs_per_shard` (from
``--records-per-shard`` or ``--shard-size-mb`` and the target shape, never from
timing or results).  Shard i is therefore the same file in every run of the same
command, and its completion can be recorded on its own:

    out/.prepare_progress/plan.json                      fingerprint of inputs + settings
    out/.prepare_progress/train-00003-of-00040.array_record.json   shard 3 is complete

A shard is written to ``<name>.tmp``, synced, renamed to its final name, and only
then is its completion record written (atomically).  A rerun of the same command
(`ProgressStore.completed`) keeps a shard only if its record exists, names the
same inputs, and the file's size and sha256 match; everything else is written
again.  When every shard is complete the manifest is written and the progress
folder removed, so a finished directory holds only shards and ``manifest.json``.

`run_plan` is that whole sequence, and `write_shard` writes one planned shard; the
local runner (`prepare`) and the Beam runner (`beam_prepare`) differ only in the
`ShardWriter` that calls `write_shard` for the shards still to do, so they write
the same shards and manifest.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import itertools
import json
import os
import shutil
import uuid
from typing import Any, Callable, Iterator, Sequence

from data_pipeline import failpoints, schema
from data_pipeline.manifest import (
    DEFAULT_COMPRESSION,
    MANIFEST_NAME,
    TMP_SUFFIX,
    WRITER_OPTIONS,
    Manifest,
    ShardInfo,
    resolve_inside,
    write_atomically,
    writer_options,
)
from data_pipeline.release import failure_record

PROGRESS_DIR = ".prepare_progress"
_PLAN_FILE = "plan.json"


def shard_file_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def inputs_per_shard(target_shape: Sequence[int], records_per_shard: int | None,
                     shard_size_mb: float) -> int:
    """Inputs assigned to each shard.

    `records_per_shard` if given; else as many target-size volumes (int16 voxels;
    the JSON header of a record adds a few KiB) as fit in `shard_size_mb` MiB of
    encoded records, at least one.
    """
    if records_per_shard is not None:
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        return int(records_per_shard)
    if shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb must be > 0, got {shard_size_mb}")
    voxel_bytes = 2
    for size in target_shape:
        voxel_bytes *= int(size)
    return max(1, int(shard_size_mb * 2**20 // voxel_bytes))


@dataclasses.dataclass(frozen=True)
class PlannedShard:
    """Shard `index` of the plan: its final file name and its inputs, in order."""

    index: int
    file: str
    inputs: tuple[Any, ...]  # items with `volume_name` and `path`

    @property
    def input_names(self) -> list[str]:
        return [item.volume_name for item in self.inputs]


def plan_shards(split: str, items: Sequence[Any], per_shard: int) -> list[PlannedShard]:
    """Consecutive groups of `per_shard` items (already in their final order)."""
    count = -(-len(items) // per_shard)
    return [PlannedShard(index, shard_file_name(split, index, count),
                         tuple(items[index * per_shard:(index + 1) * per_shard]))
            for index in range(count)]


def plan_fingerprint(split: str, shards: Sequence[PlannedShard], preprocessing: dict,
                     source_root: str, writer_options: str = WRITER_OPTIONS) -> str:
    """sha256 naming the inputs, their shard assignment and every setting that changes
    the bytes of a shard; two runs with the same fingerprint write identical shards."""
    description = {
        "split": split,
        "source_root": os.path.abspath(source_root),
        "preprocessing": preprocessing,
        "writer_options": writer_options,
        "record_format_version": schema.RECORD_FORMAT_VERSION,
        "shards": [[shard.file, [[item.volume_name, os.path.relpath(item.path, source_root)]
                                 for item in shard.inputs]] for shard in shards],
    }
    text = json.dumps(description, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclasses.dataclass
class CompletedShard:
    """The completion record of one shard: its file (None when every input failed)
    and the inputs of it that failed."""

    shard: ShardInfo | None
    failed: list[dict]


def sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: str) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


class ProgressStore:
    """The completion records of one shard directory (see the module docstring).

    `writer_options` are the ArrayRecord options its shards are written with
    (`manifest.writer_options`), part of the plan like its fingerprint.
    """

    def __init__(self, out_dir: str, fingerprint: str, writer_options: str = WRITER_OPTIONS):
        self.out_dir, self.fingerprint = out_dir, fingerprint
        self.writer_options = writer_options
        self.directory = os.path.join(out_dir, PROGRESS_DIR)

    # -- the directory as a whole ------------------------------------------------------

    def earlier_plan(self) -> str | None:
        """The fingerprint of the run that started this directory, if one did."""
        try:
            with open(os.path.join(self.directory, _PLAN_FILE), encoding="utf-8") as handle:
                return json.load(handle).get("plan_sha256")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def begin(self, summary: dict) -> None:
        """Records this run's plan (before any shard is written)."""
        os.makedirs(self.directory, exist_ok=True)
        write_atomically(os.path.join(self.directory, _PLAN_FILE),
                         json.dumps({"plan_sha256": self.fingerprint, **summary}, indent=2))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- one shard ---------------------------------------------------------------------

    def _record_path(self, shard: PlannedShard) -> str:
        return os.path.join(self.directory, shard.file + ".json")

    def completed(self, shard: PlannedShard, verify_sha256: bool = True) -> CompletedShard | None:
        """The shard's completion record if it is complete and its file verifies, else None.

        Without `verify_sha256` only the file's size is checked (the Beam launcher:
        its workers hashed each file as written, and hashing them all again would
        read the whole dataset on one machine).
        """
        try:
            with open(self._record_path(shard), encoding="utf-8") as handle:
                record = json.load(handle)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if (record.get("plan_sha256") != self.fingerprint
                or record.get("inputs") != shard.input_names):
            return None
        info = ShardInfo(**record["shard"]) if record.get("shard") else None
        if info is not None:
            path = resolve_inside(self.out_dir, info.file, self._record_path(shard))
            if (not os.path.isfile(path) or os.path.getsize(path) != info.bytes
                    or (verify_sha256 and sha256_of_file(path) != info.sha256)):
                return None  # damaged or replaced since: write it again
        return CompletedShard(info, record.get("failed", []))

    def mark_complete(self, shard: PlannedShard, done: CompletedShard) -> None:
        record = {"plan_sha256": self.fingerprint, "inputs": shard.input_names,
                  "shard": dataclasses.asdict(done.shard) if done.shard else None,
                  "failed": done.failed}
        # A temporary name of its own: Beam may run two attempts of a shard at once,
        # which write identical records but must not share a temporary file.
        path = self._record_path(shard)
        tmp_path = f"{path}.{uuid.uuid4().hex}{TMP_SUFFIX}"
        with open(tmp_path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)


def earlier_outputs(out_dir: str) -> list[str]:
    """Files of an earlier preparation in `out_dir` (manifest, shards, temporaries)."""
    return [path for pattern in (MANIFEST_NAME, "*.array_record", f"*{TMP_SUFFIX}")
            for path in glob.glob(os.path.join(out_dir, pattern))]


def open_out_dir(out_dir: str, store: ProgressStore, overwrite: bool) -> Manifest | None:
    """Prepares `out_dir` for this plan; returns its manifest if this plan already finished.

    A folder holding the finished output of the same plan is returned as is (a
    rerun after a kill that came after the manifest was written); the partial
    output of the same plan is resumed; anything else is refused unless
    `overwrite`, which clears it.
    """
    os.makedirs(out_dir, exist_ok=True)
    if overwrite:
        for path in earlier_outputs(out_dir):
            os.remove(path)
        store.remove()
        return None
    if os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
        manifest = Manifest.load(out_dir)
        if manifest.plan_sha256 != store.fingerprint:
            raise FileExistsError(f"{out_dir} already holds prepared shards of other inputs "
                                  f"or settings; choose another folder or pass "
                                  f"overwrite=True (--overwrite)")
        for shard, path in zip(manifest.shards, manifest.shard_paths()):
            if not os.path.isfile(path) or sha256_of_file(path) != shard.sha256:
                raise FileExistsError(f"{path} is missing or no longer matches the sha256 in "
                                      f"{out_dir}/{MANIFEST_NAME}; pass overwrite=True "
                                      f"(--overwrite) to prepare again")
        store.remove()
        return manifest
    earlier_plan = store.earlier_plan()
    if earlier_plan is not None and earlier_plan != store.fingerprint:
        raise FileExistsError(f"{out_dir} holds an unfinished preparation of other inputs or "
                              f"settings; rerun the command that started it, choose another "
                              f"folder or pass overwrite=True (--overwrite)")
    if earlier_plan is None and earlier_outputs(out_dir):
        raise FileExistsError(f"{out_dir} already holds shard files of unknown origin "
                              f"({len(earlier_outputs(out_dir))} files); choose another "
                              f"folder or pass overwrite=True (--overwrite)")
    return None


# ----------------------------------------------------------------------------------
# Writing shards and the whole plan (shared by the local and the Beam runner)
# ----------------------------------------------------------------------------------


def write_shard(out_dir: str, shard: PlannedShard, results: Iterator[tuple],
                tmp_path: str | None = None, writer_options: str = WRITER_OPTIONS
                ) -> CompletedShard:
    """Writes the next len(shard.inputs) (item, encoded or None, reason) results into
    `shard`'s file, with the ArrayRecord `writer_options` (`manifest.writer_options`).

    The records go to `tmp_path` (default ``<file>.tmp``), which is synced and
    renamed to the shard's name when complete; a shard whose inputs all failed
    has no file.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    final_path = os.path.join(out_dir, shard.file)
    tmp_path = tmp_path or final_path + TMP_SUFFIX
    writer, names, failed = None, [], []
    try:
        for item, encoded, reason in itertools.islice(results, len(shard.inputs)):
            if encoded is None:
                failed.append(failure_record(item, reason))
                continue
            if writer is None:
                writer = ArrayRecordWriter(tmp_path, writer_options)
            writer.write(encoded)
            names.append(item.volume_name)
            failpoints.reached("record_written")
    finally:
        if writer is not None:
            writer.close()
    if len(names) + len(failed) != len(shard.inputs):
        raise RuntimeError(f"{shard.file}: got {len(names) + len(failed)} results for "
                           f"{len(shard.inputs)} inputs")
    if not names:
        return CompletedShard(None, failed)
    fsync_file(tmp_path)
    os.replace(tmp_path, final_path)
    failpoints.reached("shard_renamed")
    info = ShardInfo(file=shard.file, num_records=len(names), sha256=sha256_of_file(final_path),
                     bytes=os.path.getsize(final_path), volume_names=names)
    return CompletedShard(info, failed)


# (store, all planned shards, the shards still to write) -> their CompletedShards by
# index; it records each completion with store.mark_complete as the shard is done.
ShardWriter = Callable[[ProgressStore, list[PlannedShard], list[PlannedShard]],
                       dict[int, CompletedShard]]


def run_plan(items: Sequence[Any], split: str, out_dir: str, config, source_root: str, *,
             per_shard: int, overwrite: bool, failed_before: list[dict],
             excluded: list[dict], write_shards: ShardWriter,
             verify_sha256: bool = True, compression: str = DEFAULT_COMPRESSION) -> Manifest:
    """Prepares `items` into the resumable shards of `plan_shards` and writes the manifest.

    Args:
      items: the inputs in their final order (each with volume_name and path).
      config: the `preprocess.PreprocessConfig` the records are made with.
      failed_before, excluded: manifest entries for inputs that never reach a shard.
      write_shards: writes the shards not yet complete (`ShardWriter`): worker
        processes here (`prepare`), or a Beam pipeline (`beam_prepare`).
      verify_sha256: re-hash already complete shards before keeping them (else size only).
      compression: "zstd:N" or "none" (`manifest.writer_options`); recorded in the
        manifest, and part of the plan (a rerun with another compression is refused).

    Both runners go through here, so for the same inputs and settings they plan the
    same shards, write files of the same names and bytes and the same manifest
    (but for `created`), and each can resume what the other left unfinished.
    """
    options = writer_options(compression)
    preprocessing = {**config.to_dict(), "voxel_dtype": "int16",
                     "voxel_unit": "HU, rounded half to even", "layout": "DHW"}
    shards = plan_shards(split, items, per_shard)
    fingerprint = plan_fingerprint(split, shards, {
        "preprocessing": preprocessing, "failed_before": failed_before,
        "excluded": excluded}, source_root, options)
    store = ProgressStore(out_dir, fingerprint, options)
    finished = open_out_dir(out_dir, store, overwrite)
    if finished is not None:
        return finished
    store.begin({"split": split, "num_inputs": len(items), "num_shards": len(shards)})

    done = {shard.index: store.completed(shard, verify_sha256) for shard in shards}
    todo = [shard for shard in shards if done[shard.index] is None]
    done.update(write_shards(store, shards, todo))

    completed = [done[shard.index] for shard in shards]
    written = [c.shard for c in completed if c.shard is not None]
    failed = failed_before + [f for c in completed for f in c.failed]
    manifest = Manifest(
        split=split,
        num_records=sum(shard.num_records for shard in written),
        shards=written,
        preprocessing=preprocessing,
        source_root=os.path.abspath(source_root),
        failed=sorted(failed, key=lambda failure: failure["volume_name"]),
        excluded=excluded,
        plan_sha256=fingerprint,
        writer_options=options,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    manifest.save(out_dir)
    failpoints.reached("manifest_written")
    store.remove()
    return manifest
