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
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
from typing import Any, Sequence

from data_pipeline import schema
from data_pipeline.manifest import (
    MANIFEST_NAME,
    TMP_SUFFIX,
    WRITER_OPTIONS,
    Manifest,
    ShardInfo,
    resolve_inside,
    write_atomically,
)

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
                     source_root: str) -> str:
    """sha256 naming the inputs, their shard assignment and every setting that changes
    the bytes of a shard; two runs with the same fingerprint write identical shards."""
    description = {
        "split": split,
        "source_root": os.path.abspath(source_root),
        "preprocessing": preprocessing,
        "writer_options": WRITER_OPTIONS,
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
    """The completion records of one shard directory (see the module docstring)."""

    def __init__(self, out_dir: str, fingerprint: str):
        self.out_dir, self.fingerprint = out_dir, fingerprint
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

    def completed(self, shard: PlannedShard) -> CompletedShard | None:
        """The shard's completion record if it is complete and its file verifies, else None."""
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
                    or sha256_of_file(path) != info.sha256):
                return None  # damaged or replaced since: write it again
        return CompletedShard(info, record.get("failed", []))

    def mark_complete(self, shard: PlannedShard, done: CompletedShard) -> None:
        record = {"plan_sha256": self.fingerprint, "inputs": shard.input_names,
                  "shard": dataclasses.asdict(done.shard) if done.shard else None,
                  "failed": done.failed}
        write_atomically(self._record_path(shard), json.dumps(record, ensure_ascii=False))


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
