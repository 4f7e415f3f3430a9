"""Preprocesses one split of a CT-RATE release (or a folder of one's own scans) into shards.

    python -m data_pipeline.prepare --ctrate-root DIR --split train --out SHARD_DIR \
        [--target-spacing 1.5,0.75,0.75] [--target-shape 240,480,480] \
        [--hu-window -1000,1000] [--records-per-shard N | --shard-size-mb M] \
        [--workers N] [--limit N] [--volumes-dir train_fixed] [--overwrite] \
        [--compression zstd:3|zstd:N|none] \
        [--runner beam [-- BEAM_PIPELINE_OPTIONS]]
    python -m data_pipeline.prepare --scans PATH --out SHARD_DIR [same options, local runner]

Each volume is read, converted to HU, resampled, clipped, rounded and cropped or
padded (`data_pipeline.preprocess`) in a process pool; workers receive the file
path and return the encoded `schema.CTRecord`, so a volume crosses process
boundaries once, as int16 bytes.

The inputs, sorted by VolumeName, are assigned to shards before any work starts
(`data_pipeline.shard_plan`): shard i always holds the same inputs, whatever the
number of workers, so shards are byte-identical between runs.  Each shard is
written under a temporary name, renamed to
``{split}-{index:05d}-of-{count:05d}.array_record`` and then recorded as complete.
A run killed at any moment and started again with the same arguments keeps the
shards whose completion record and checksum verify and writes the others again:
it ends with exactly one record per good input.  The manifest (`manifest.json`,
see `Manifest`) is written last, through a temporary file and a rename.  Bad
inputs are listed in the manifest's ``failed`` list and make the exit status 1;
the other volumes are still prepared.  Listing the inputs (`release.split_inputs`),
the plan, resuming and the manifest (`shard_plan.run_plan`) are shared with the
Beam runner (`beam_prepare`), which only writes the shards elsewhere.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import functools
import glob
import itertools
import multiprocessing
import os
import sys
import time
from typing import Iterator, Sequence

import numpy as np

from data_pipeline import failpoints, schema
from data_pipeline.manifest import (  # noqa: F401 - re-exported: the manifest's old home
    DEFAULT_COMPRESSION,
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    TMP_SUFFIX,
    WRITER_OPTIONS,
    Manifest,
    ShardInfo,
    UnsafePathError,
    writer_options,
)
from data_pipeline.preprocess import PreprocessConfig, load_nifti_dhw, preprocess_volume
from data_pipeline.release import VolumeEntry, split_inputs
from data_pipeline.shard_plan import (
    CompletedShard,
    PlannedShard,
    ProgressStore,
    ShardWriter,
    inputs_per_shard,
    run_plan,
    shard_file_name,  # noqa: F401 - part of this module's interface
    write_shard,
)

SCANS_SPLIT = "scans"  # the split name of shards prepared from a user's own scans


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


def _encode_or_reason(entry, config: PreprocessConfig):
    """(encoded bytes, None) or (None, reason): one bad file must not stop the run.

    `entry` is a release `VolumeEntry` or a `user_scans.UserScan`.
    """
    try:
        if isinstance(entry, VolumeEntry):
            return encode_volume(entry, config), None
        from data_pipeline.user_scans import encode_user_scan

        return encode_user_scan(entry, config), None
    except Exception as error:  # noqa: BLE001 - any unreadable input is a recorded failure
        return None, f"{type(error).__name__}: {error}"


def encode_in_order(entries: Sequence, config: PreprocessConfig,
                    workers: int | None) -> Iterator[tuple]:
    """Yields (entry, encoded bytes or None, failure reason or None) in `entries` order.

    `workers` processes (None: all CPUs; 1: this process).  At most 2 * workers
    results are pending, which bounds the parent's memory even when writing is
    slower than preprocessing.
    """
    workers = max(1, min(workers or os.cpu_count() or 1, max(len(entries), 1)))
    if workers == 1:
        for entry in entries:
            yield (entry, *_encode_or_reason(entry, config))
        return
    # spawn: the parent holds writer threads, which fork would copy half-alive.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=_exit_with_parent,
                                                initargs=(os.getpid(),)) as pool:
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


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this worker when the parent dies (e.g. kill -9), instead
    of leaving an orphan holding a volume's worth of memory."""
    import threading

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


# ----------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------


def _write_here(store: ProgressStore, shards: list[PlannedShard], todo: list[PlannedShard],
                *, config: PreprocessConfig, workers: int | None, progress: bool,
                split: str) -> dict[int, CompletedShard]:
    """The local `shard_plan.ShardWriter`: `todo`'s inputs in `workers` processes, its
    shards written here one after another, in plan order."""
    num_inputs = sum(len(shard.inputs) for shard in shards)
    pending_inputs = [item for shard in todo for item in shard.inputs]
    done = {}
    with _progress_bar(num_inputs, split, progress) as bar:
        bar.update(num_inputs - len(pending_inputs))
        if len(todo) < len(shards):
            bar.write(f"resuming {store.out_dir}: {len(shards) - len(todo)} of {len(shards)} "
                      f"shards already complete", file=sys.stderr)
        results = _counted(encode_in_order(pending_inputs, config, workers), bar)
        for shard in todo:
            done[shard.index] = write_shard(store.out_dir, shard, results,
                                            writer_options=store.writer_options)
            store.mark_complete(shard, done[shard.index])
            failpoints.reached("shard_complete")
    return done


def _counted(results: Iterator[tuple], bar) -> Iterator[tuple]:
    for result in results:
        bar.update(1)
        yield result


# ----------------------------------------------------------------------------------
# Whole split
# ----------------------------------------------------------------------------------


def prepare_split(ctrate_root: str, split: str, out_dir: str,
                  config: PreprocessConfig = PreprocessConfig(), *,
                  records_per_shard: int | None = None, shard_size_mb: float = 256,
                  workers: int | None = None, limit: int | None = None,
                  volumes_dir: str | None = None, overwrite: bool = False,
                  progress: bool = True, compression: str = DEFAULT_COMPRESSION) -> Manifest:
    """Preprocesses `split` of the release at `ctrate_root` into shards in `out_dir`.

    Args:
      records_per_shard: inputs per shard (a shard holds fewer records when some
        of its inputs fail); if None, as many target-size volumes as fit in
        `shard_size_mb` MiB of encoded records.  The files are smaller, since
        ArrayRecord compresses each record with zstd.
      workers: worker processes (default: all CPUs); 1 runs in this process.
      limit: prepare only the first `limit` volumes in VolumeName order.
      volumes_dir: volume folder below ``dataset/`` (default: `release.default_volumes_dir`,
        ``{split}_fixed`` when the release has it, else ``{split}``).
      overwrite: replace earlier shards and manifest in `out_dir`.  Without it, an
        unfinished run of the same inputs and settings is resumed, a finished one
        returned as is, and anything else refused.
      compression: shard compression, "zstd:N" (default zstd:3) or "none"
        (`manifest.writer_options`); the input pipeline reads either.

    Volumes named in the release's ``no_chest_{split}.txt`` are left out and listed
    in `manifest.excluded`.  Returns the written `Manifest`; check `manifest.failed`
    for inputs that could not be prepared.
    """
    return prepare_release_split(ctrate_root, split, out_dir, config,
                                 records_per_shard=records_per_shard,
                                 shard_size_mb=shard_size_mb, limit=limit,
                                 volumes_dir=volumes_dir, overwrite=overwrite,
                                 compression=compression,
                                 write_shards=functools.partial(
                                     _write_here, config=config, workers=workers,
                                     progress=progress, split=split))


def prepare_release_split(ctrate_root: str, split: str, out_dir: str,
                          config: PreprocessConfig, *, records_per_shard: int | None,
                          shard_size_mb: float, limit: int | None, volumes_dir: str | None,
                          overwrite: bool, write_shards: ShardWriter,
                          verify_sha256: bool = True,
                          compression: str = DEFAULT_COMPRESSION) -> Manifest:
    """`prepare_split` with the shards written by `write_shards` (local or Beam)."""
    per_shard = inputs_per_shard(config.target_shape, records_per_shard, shard_size_mb)
    inputs = split_inputs(ctrate_root, split, volumes_dir=volumes_dir, limit=limit)
    return run_plan(inputs.entries, split, out_dir, config, ctrate_root, per_shard=per_shard,
                    overwrite=overwrite, failed_before=inputs.failed,
                    excluded=inputs.excluded, write_shards=write_shards,
                    verify_sha256=verify_sha256, compression=compression)


def prepare_scans(scans_path: str, out_dir: str, config: PreprocessConfig = PreprocessConfig(),
                  *, records_per_shard: int | None = None, shard_size_mb: float = 256,
                  workers: int | None = None, limit: int | None = None,
                  overwrite: bool = False, progress: bool = True,
                  compression: str = DEFAULT_COMPRESSION) -> Manifest:
    """Preprocesses a user's own NIfTI files or DICOM series into shards in `out_dir`.

    `scans_path` is anything `user_scans.find_user_scans` accepts.  Records carry
    empty texts and unknown labels (-1), so every shard reader works on them; the
    split is called ``"scans"``.  Otherwise as `prepare_split`.
    """
    from data_pipeline.user_scans import find_user_scans

    per_shard = inputs_per_shard(config.target_shape, records_per_shard, shard_size_mb)
    errors: list = []
    scans = find_user_scans(scans_path, errors=errors)
    if limit is not None:
        scans = scans[:limit]
    failed_before = [{"volume_name": os.path.basename(path), "path": path, "reason": reason}
                     for path, reason in errors]
    root = scans_path if os.path.isdir(scans_path) else os.path.dirname(scans_path)
    return run_plan(scans, SCANS_SPLIT, out_dir, config, os.path.abspath(root),
                    per_shard=per_shard, overwrite=overwrite, failed_before=failed_before,
                    excluded=[], compression=compression, write_shards=functools.partial(
                        _write_here, config=config, workers=workers, progress=progress,
                        split=SCANS_SPLIT))


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


def _compression(text: str) -> str:
    try:
        writer_options(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    defaults = PreprocessConfig()
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.prepare",
        description="Preprocess one split of a CT-RATE release, or a folder of your own "
                    "NIfTI / DICOM scans, into ArrayRecord shards.  Rerunning a killed "
                    "command resumes it.")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--ctrate-root",
                        help="the release's dataset/ folder or the folder containing it")
    inputs.add_argument("--scans", help="a NIfTI file, a folder of NIfTI files, a DICOM "
                                        "series folder or a folder of series folders")
    parser.add_argument("--split", choices=sorted(schema.SPLIT_FILES),
                        help="release split (with --ctrate-root)")
    parser.add_argument("--out", required=True, help="shard directory to create")
    parser.add_argument("--target-spacing", type=_numbers(float, 3),
                        default=defaults.target_spacing_mm, help="z,y,x in mm")
    parser.add_argument("--target-shape", type=_numbers(int, 3),
                        default=defaults.target_shape, help="D,H,W in voxels")
    parser.add_argument("--hu-window", type=_numbers(float, 2), default=defaults.hu_window,
                        help="low,high HU, e.g. -1000,1000")
    parser.add_argument("--min-slices", type=int, default=defaults.min_slices)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--records-per-shard", type=int, default=None,
                       help="inputs per shard (fewer records where inputs fail)")
    sizes.add_argument("--shard-size-mb", type=float, default=256,
                       help="MiB of encoded records per shard (default 256)")
    parser.add_argument("--compression", default=DEFAULT_COMPRESSION, type=_compression,
                        help=f"shard compression: 'zstd:N' (N = 1..22) or 'none' (default "
                             f"{DEFAULT_COMPRESSION}; 'none' reads with no decompression at "
                             f"3-4x the disk space, see docs/data.md)")
    parser.add_argument("--workers", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--limit", type=int, default=None, help="first N volumes only")
    parser.add_argument("--volumes-dir", default=None,
                        help="volume folder below dataset/, e.g. train_fixed")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards and manifest already in --out (otherwise an "
                             "unfinished run of the same command is resumed)")
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
    if args.ctrate_root and not args.split:
        parser.error("--split is required with --ctrate-root")
    if args.scans and (args.split or args.volumes_dir):
        parser.error("--split and --volumes-dir belong to --ctrate-root, not --scans")
    if args.scans and args.runner == "beam":
        parser.error("--scans runs locally; --runner beam prepares a CT-RATE release")
    if beam_args and args.runner != "beam":
        parser.error("options after '--' are Beam pipeline options; they need --runner beam")
    start = time.perf_counter()
    try:
        config = PreprocessConfig(target_spacing_mm=args.target_spacing,
                                  target_shape=args.target_shape, hu_window=args.hu_window,
                                  min_slices=args.min_slices)
        common = dict(records_per_shard=args.records_per_shard,
                      shard_size_mb=args.shard_size_mb, workers=args.workers,
                      limit=args.limit, overwrite=args.overwrite,
                      compression=args.compression)
        if args.runner == "beam":
            from data_pipeline.beam_prepare import prepare_split_beam

            manifest = prepare_split_beam(args.ctrate_root, args.split, args.out, config,
                                          volumes_dir=args.volumes_dir, pipeline_args=beam_args,
                                          **common)
        elif args.scans:
            manifest = prepare_scans(args.scans, args.out, config,
                                     progress=not args.no_progress, **common)
        else:
            manifest = prepare_split(args.ctrate_root, args.split, args.out, config,
                                     volumes_dir=args.volumes_dir,
                                     progress=not args.no_progress, **common)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    seconds = time.perf_counter() - start
    for failure in manifest.failed:
        print(f"FAILED {failure['volume_name']}: {failure['reason']}", file=sys.stderr)
    attempted = manifest.num_records + len(manifest.failed)
    excluded = f"; {len(manifest.excluded)} excluded" if manifest.excluded else ""
    print(f"{manifest.split}: prepared {manifest.num_records} of {attempted} volumes into "
          f"{len(manifest.shards)} shards in {seconds:.1f} s "
          f"({attempted / max(seconds, 1e-9):.2f} volumes/s); {len(manifest.failed)} failed"
          f"{excluded}; manifest {os.path.join(args.out, MANIFEST_NAME)}")
    return 1 if manifest.failed else 0


if __name__ == "__main__":
    sys.exit(main())
