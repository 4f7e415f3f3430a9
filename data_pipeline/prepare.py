"""Preprocesses one split of a CT-RATE release into ArrayRecord shards.

    python -m data_pipeline.prepare --ctrate-root DIR --split train --out SHARD_DIR \
        [--target-spacing 1.5,0.75,0.75] [--target-shape 240,480,480] \
        [--hu-window -1000,1000] [--records-per-shard N | --shard-size-mb M] \
        [--workers N] [--limit N] [--volumes-dir train_fixed] [--overwrite] \
        [--runner beam [-- BEAM_PIPELINE_OPTIONS]]

Each volume is read, converted to HU, resampled, clipped, rounded and cropped or
padded (`data_pipeline.preprocess`) in a process pool; workers receive the file
path and return the encoded `schema.CTRecord`, so a volume crosses process
boundaries once, as int16 bytes.  Records are written in sorted VolumeName order
whatever the number of workers, so the shards are byte-identical between runs.
Shards are first written under temporary names and renamed to
``{split}-{index:05d}-of-{count:05d}.array_record`` when all are complete; the
manifest (`manifest.json`, see `Manifest`) is written last, through a temporary
file and a rename.  Bad inputs are listed in the manifest's ``failed`` list and
make the exit status 1; the other volumes are still prepared.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import datetime
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from typing import Iterator

import numpy as np

from data_pipeline import schema
from data_pipeline.preprocess import PreprocessConfig, load_nifti_dhw, preprocess_volume
from data_pipeline.release import VolumeEntry, list_volumes

MANIFEST_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# One record per chunk, so that reading record i decompresses only record i.
# zstd:3 is ArrayRecord's default compressor, written out so the manifest says it.
WRITER_OPTIONS = "group_size:1,zstd:3"
_TMP_SUFFIX = ".tmp"


@dataclasses.dataclass
class ShardInfo:
    """One shard file: its name (relative to the manifest), size and content."""

    file: str
    num_records: int
    sha256: str
    bytes: int
    volume_names: list[str]


@dataclasses.dataclass
class Manifest:
    """Contents of ``manifest.json`` in a shard directory.

    `directory` is where the manifest was loaded from or written to (not stored).
    `failed` lists {volume_name, path, reason} for every input that was skipped.
    """

    split: str
    num_records: int
    shards: list[ShardInfo]
    preprocessing: dict
    source_root: str
    failed: list[dict]
    created: str
    writer_options: str = WRITER_OPTIONS
    format_version: int = MANIFEST_FORMAT_VERSION
    record_format_version: int = schema.RECORD_FORMAT_VERSION
    directory: str = dataclasses.field(default="", compare=False)

    @classmethod
    def load(cls, path: str) -> "Manifest":
        """Reads a manifest, given its path or its shard directory."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("format_version") != MANIFEST_FORMAT_VERSION:
            raise ValueError(f"{path}: manifest format {data.get('format_version')} is not "
                             f"supported (this code reads {MANIFEST_FORMAT_VERSION})")
        data["shards"] = [ShardInfo(**shard) for shard in data["shards"]]
        return cls(**data, directory=os.path.dirname(os.path.abspath(path)))

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        del data["directory"]
        return data

    def save(self, directory: str) -> str:
        """Writes ``directory/manifest.json`` atomically; returns its path."""
        path = os.path.join(directory, MANIFEST_NAME)
        _write_atomically(path, json.dumps(self.to_json(), indent=2, ensure_ascii=False))
        self.directory = os.path.abspath(directory)
        return path

    def shard_paths(self) -> list[str]:
        """Absolute paths of the shards, in record order."""
        return [os.path.join(self.directory, shard.file) for shard in self.shards]


# ----------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------


def encode_volume(entry: VolumeEntry, config: PreprocessConfig) -> bytes:
    """Reads, preprocesses and encodes one volume (runs in a worker process)."""
    loaded = load_nifti_dhw(entry.path)
    # Files whose header already scales to HU must not be rescaled with the CSV values.
    slope, intercept = (1.0, 0.0) if loaded.header_scaling_applied else (
        entry.slope, entry.intercept)
    original_shape = loaded.volume_dhw.shape
    volume_hu = preprocess_volume(loaded.volume_dhw, slope, intercept, entry.spacing_zyx,
                                  config, overwrite_input=True)
    metadata = dict(entry.metadata or {})
    metadata.update({
        "original_shape_dhw": list(original_shape),
        "original_spacing_mm": list(entry.spacing_zyx),
        "nifti_header_spacing_mm": list(loaded.header_spacing_zyx),
        "header_scaling_applied": loaded.header_scaling_applied,
        "applied_slope_intercept": [slope, intercept],
    })
    record = schema.CTRecord(
        volume_hu=volume_hu,
        volume_name=entry.volume_name,
        findings=entry.findings,
        impressions=entry.impressions,
        labels=np.asarray(entry.labels, np.int8),
        spacing_mm=tuple(float(s) for s in config.target_spacing_mm),
        metadata=metadata,
    )
    return schema.encode_record(record)


def _encode_or_reason(entry: VolumeEntry, config: PreprocessConfig):
    """(encoded bytes, None) or (None, reason): one bad file must not stop the run."""
    try:
        return encode_volume(entry, config), None
    except Exception as error:  # noqa: BLE001 - any unreadable input is a recorded failure
        return None, f"{type(error).__name__}: {error}"


def _results_in_order(entries, config, workers):
    """Yields (entry, encoded, reason) in `entries` order, `workers` volumes at a time.

    At most 2 * workers results are pending, which bounds the parent's memory
    even when writing is slower than preprocessing.
    """
    if workers <= 1:
        for entry in entries:
            yield (entry, *_encode_or_reason(entry, config))
        return
    # spawn: the parent holds writer threads, which fork would copy half-alive.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending = collections.deque()
        remaining = iter(entries)

        def submit(count: int) -> None:
            for entry in itertools.islice(remaining, count):
                pending.append((entry, pool.submit(_encode_or_reason, entry, config)))

        submit(2 * workers)
        while pending:
            entry, future = pending.popleft()
            encoded, reason = future.result()
            submit(1)  # keep the workers busy while the caller writes this one
            yield entry, encoded, reason


# ----------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------


class _ShardWriter:
    """Writes records into numbered temporary shards; `finish` gives them final names.

    A new shard starts when the current one holds `records_per_shard` records or,
    if that is None, when the next record would take its encoded (uncompressed)
    size past `max_shard_bytes`.  Both rules depend only on the records, never
    on timing, so the sharding is deterministic.
    """

    def __init__(self, out_dir: str, split: str, records_per_shard: int | None,
                 max_shard_bytes: int):
        self.out_dir, self.split = out_dir, split
        self.records_per_shard, self.max_shard_bytes = records_per_shard, max_shard_bytes
        self._writer = None
        self._names: list[str] = []
        self._bytes = 0
        self._done: list[tuple[str, list[str]]] = []  # (temporary path, names)

    def write(self, volume_name: str, encoded: bytes) -> None:
        if self._writer is not None and self._shard_is_full(len(encoded)):
            self._close_current()
        if self._writer is None:
            self._open_next()
        self._writer.write(encoded)
        self._names.append(volume_name)
        self._bytes += len(encoded)

    def finish(self) -> list[ShardInfo]:
        """Closes the last shard and renames all to ``{split}-i-of-n.array_record``."""
        self._close_current()
        shards = []
        for index, (tmp_path, names) in enumerate(self._done):
            name = shard_file_name(self.split, index, len(self._done))
            final_path = os.path.join(self.out_dir, name)
            os.replace(tmp_path, final_path)
            shards.append(ShardInfo(file=name, num_records=len(names),
                                    sha256=_sha256(final_path),
                                    bytes=os.path.getsize(final_path), volume_names=names))
        return shards

    def _shard_is_full(self, next_record_bytes: int) -> bool:
        if self.records_per_shard is not None:
            return len(self._names) >= self.records_per_shard
        return self._bytes + next_record_bytes > self.max_shard_bytes

    def _open_next(self) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        path = os.path.join(self.out_dir, f"{self.split}-{len(self._done):05d}.array_record"
                                          f"{_TMP_SUFFIX}")
        self._writer = ArrayRecordWriter(path, WRITER_OPTIONS)
        self._path, self._names, self._bytes = path, [], 0

    def _close_current(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._done.append((self._path, self._names))
        self._writer = None


def shard_file_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: str, text: str) -> None:
    tmp_path = path + _TMP_SUFFIX
    with open(tmp_path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Creates `out_dir`; refuses (or, with `overwrite`, clears) earlier outputs."""
    os.makedirs(out_dir, exist_ok=True)
    earlier = [path for pattern in (MANIFEST_NAME, "*.array_record", f"*{_TMP_SUFFIX}")
               for path in glob.glob(os.path.join(out_dir, pattern))]
    if earlier and not overwrite:
        raise FileExistsError(f"{out_dir} already holds prepared shards ({len(earlier)} "
                              f"files); choose another folder or pass overwrite=True "
                              f"(--overwrite)")
    for path in earlier:
        os.remove(path)


# ----------------------------------------------------------------------------------
# Whole split
# ----------------------------------------------------------------------------------


def prepare_split(ctrate_root: str, split: str, out_dir: str,
                  config: PreprocessConfig = PreprocessConfig(), *,
                  records_per_shard: int | None = None, shard_size_mb: float = 256,
                  workers: int | None = None, limit: int | None = None,
                  volumes_dir: str | None = None, overwrite: bool = False,
                  progress: bool = True) -> Manifest:
    """Preprocesses `split` of the release at `ctrate_root` into shards in `out_dir`.

    Args:
      records_per_shard: records per shard; if None, shards are cut at
        `shard_size_mb` MiB of encoded (uncompressed) records.  The files are
        smaller, since ArrayRecord compresses each record with zstd.
      workers: worker processes (default: all CPUs); 1 runs in this process.
      limit: prepare only the first `limit` volumes in VolumeName order.
      volumes_dir: volume folder below ``dataset/`` if not the split's default.
      overwrite: replace earlier shards and manifest in `out_dir`.

    Returns the written `Manifest`; check `manifest.failed` for skipped inputs.
    """
    if records_per_shard is not None and records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    entries = list_volumes(ctrate_root, split, volumes_dir=volumes_dir)
    if limit is not None:
        entries = entries[:limit]
    workers = max(1, min(workers or os.cpu_count() or 1, max(len(entries), 1)))
    _prepare_out_dir(out_dir, overwrite)

    failed = [_failure(entry, entry.error) for entry in entries if not entry.ok]
    good = [entry for entry in entries if entry.ok]
    writer = _ShardWriter(out_dir, split, records_per_shard, int(shard_size_mb * 2**20))
    with _progress_bar(len(good), split, progress) as bar:
        for entry, encoded, reason in _results_in_order(good, config, workers):
            if encoded is None:
                failed.append(_failure(entry, reason))
            else:
                writer.write(entry.volume_name, encoded)
            bar.update(1)
    shards = writer.finish()

    manifest = Manifest(
        split=split,
        num_records=sum(shard.num_records for shard in shards),
        shards=shards,
        preprocessing={**config.to_dict(), "voxel_dtype": "int16",
                       "voxel_unit": "HU, rounded half to even", "layout": "DHW"},
        source_root=os.path.abspath(ctrate_root),
        failed=sorted(failed, key=lambda failure: failure["volume_name"]),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    manifest.save(out_dir)
    return manifest


def _failure(entry: VolumeEntry, reason: str) -> dict:
    return {"volume_name": entry.volume_name, "path": entry.path, "reason": reason}


def _progress_bar(total: int, split: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"preparing {split}", unit="vol", disable=not enabled,
                dynamic_ncols=True)


def read_records(shard_dir: str) -> Iterator[schema.CTRecord]:
    """Decodes every record of a shard directory in order (for tests and debugging).

    Uses the manifest's shard order when there is one, else the sorted shard names.
    """
    from array_record.python.array_record_module import ArrayRecordReader

    if os.path.isfile(os.path.join(shard_dir, MANIFEST_NAME)):
        paths = Manifest.load(shard_dir).shard_paths()
    else:
        paths = sorted(glob.glob(os.path.join(shard_dir, "*.array_record")))
    for path in paths:
        reader = ArrayRecordReader(path)
        try:
            for index in range(reader.num_records()):
                yield schema.decode_record(reader.read([index])[0])
        finally:
            reader.close()


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------


def _numbers(kind, count):
    def parse(text: str):
        values = tuple(kind(v) for v in text.split(","))
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated values, "
                                             f"got {text!r}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    defaults = PreprocessConfig()
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.prepare",
        description="Preprocess one split of a CT-RATE release into ArrayRecord shards.")
    parser.add_argument("--ctrate-root", required=True,
                        help="the release's dataset/ folder or the folder containing it")
    parser.add_argument("--split", required=True, choices=sorted(schema.SPLIT_FILES))
    parser.add_argument("--out", required=True, help="shard directory to create")
    parser.add_argument("--target-spacing", type=_numbers(float, 3),
                        default=defaults.target_spacing_mm, help="z,y,x in mm")
    parser.add_argument("--target-shape", type=_numbers(int, 3),
                        default=defaults.target_shape, help="D,H,W in voxels")
    parser.add_argument("--hu-window", type=_numbers(float, 2), default=defaults.hu_window,
                        help="low,high HU, e.g. -1000,1000")
    parser.add_argument("--min-slices", type=int, default=defaults.min_slices)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--records-per-shard", type=int, default=None)
    sizes.add_argument("--shard-size-mb", type=float, default=256,
                       help="MiB of encoded records per shard (default 256)")
    parser.add_argument("--workers", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--limit", type=int, default=None, help="first N volumes only")
    parser.add_argument("--volumes-dir", default=None,
                        help="volume folder below dataset/, e.g. train_fixed")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards and manifest already in --out")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--runner", choices=("local", "beam"), default="local",
                        help="local: worker processes on this machine; beam: an Apache Beam "
                             "pipeline (data_pipeline/beam_prepare.py) with the Beam "
                             "pipeline options given after '--'")
    return parser


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--hu-window -1000,1000`` -> ``--hu-window=-1000,1000``.

    argparse takes "-1000,1000" for an option (it is not a plain negative number).
    """
    joined, tokens = [], iter(argv)
    for token in tokens:
        if token == "--hu-window":
            value = next(tokens, None)
            joined.append(token if value is None else f"{token}={value}")
        else:
            joined.append(token)
    return joined


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns 1 if any volume failed, 2 on a usage error, else 0."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # Beam pipeline options (which have their own --runner) follow a "--".
    beam_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = parser.parse_args(_attach_negative_values(argv))
    if beam_args and args.runner != "beam":
        parser.error("options after '--' are Beam pipeline options; they need --runner beam")
    start = time.perf_counter()
    try:
        config = PreprocessConfig(target_spacing_mm=args.target_spacing,
                                  target_shape=args.target_shape, hu_window=args.hu_window,
                                  min_slices=args.min_slices)
        if args.runner == "beam":
            from data_pipeline.beam_prepare import prepare_split_beam

            manifest = prepare_split_beam(
                args.ctrate_root, args.split, args.out, config,
                records_per_shard=args.records_per_shard, shard_size_mb=args.shard_size_mb,
                limit=args.limit, volumes_dir=args.volumes_dir, overwrite=args.overwrite,
                workers=args.workers, pipeline_args=beam_args)
        else:
            manifest = prepare_split(args.ctrate_root, args.split, args.out, config,
                                     records_per_shard=args.records_per_shard,
                                     shard_size_mb=args.shard_size_mb, workers=args.workers,
                                     limit=args.limit, volumes_dir=args.volumes_dir,
                                     overwrite=args.overwrite, progress=not args.no_progress)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    seconds = time.perf_counter() - start
    for failure in manifest.failed:
        print(f"FAILED {failure['volume_name']}: {failure['reason']}", file=sys.stderr)
    attempted = manifest.num_records + len(manifest.failed)
    print(f"{args.split}: prepared {manifest.num_records} of {attempted} volumes into "
          f"{len(manifest.shards)} shards in {seconds:.1f} s "
          f"({attempted / max(seconds, 1e-9):.2f} volumes/s); {len(manifest.failed)} failed; "
          f"manifest {os.path.join(args.out, MANIFEST_NAME)}")
    return 1 if manifest.failed else 0


if __name__ == "__main__":
    sys.exit(main())
