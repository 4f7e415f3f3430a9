"""Preparation on Apache Beam: the same shards and manifest as `prepare`, on a cluster.

    python -m data_pipeline.prepare --ctrate-root DIR --split train --out SHARD_DIR \
        --records-per-shard 8 --runner beam [-- BEAM_PIPELINE_OPTIONS]

    # e.g. on Dataflow (the release and --out on a file system every worker mounts):
    ... --runner beam -- --runner=DataflowRunner --project=P --region=R \
        --temp_location=gs://B/tmp --sdk_container_image=IMAGE

Everything after ``--`` is handed to Beam's `PipelineOptions`: the DirectRunner
when no ``--runner=`` is given there, Dataflow, Flink or Spark by their usual
options.  ``--workers N`` becomes ``--direct_num_workers=N
--direct_running_mode=multi_processing`` (N local processes; other runners
ignore it).

The plan is made on the launching machine: `release.list_volumes` joins the
volume files with the CSVs and the good inputs, in VolumeName order, are cut
into consecutive groups of `records_per_shard` (or as many target-size volumes
as fit in `shard_size_mb`), one group per shard.  The pipeline is

    Create(group indices) | Reshuffle | Map(write_group)

(the groups are saved in ``.beam_prepare/plan.json``, the pipeline carries their
indices), where `write_group` prepares each volume of its group with
`prepare.encode_volume` (the project's one preprocessing) and writes the records,
in order, into a temporary ArrayRecord file with `prepare.WRITER_OPTIONS`; then
it writes a small completion file (``.beam_prepare/<group>.json``: the temporary file's name, size,
sha256, the names written and the inputs that failed).  Beam may run a bundle
more than once (retries, speculative execution); every attempt writes its own
temporary file and the identical completion content, so whichever attempt's
completion file lands names a complete file.  After the pipeline, the launcher
renames the named files to ``{split}-i-of-n.array_record`` (groups whose inputs
all failed give no shard), deletes the other attempts' files and writes
``manifest.json`` last, as `prepare` does.  So each good input is exactly one
record and each bad one exactly one ``failed`` entry.

A rerun of the same command after a crash or kill keeps the groups whose
completion file is there, for the same inputs and settings, and whose file still
has its recorded size (not re-hashed: that would read the whole dataset on the
launching machine), and runs only the rest.

Paths are ordinary file paths: on a cluster, the release and `--out` must be on
a file system that every worker mounts (NFS, Filestore, a GCS FUSE mount), since
nibabel and ArrayRecord read and write local paths.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import glob
import hashlib
import json
import math
import os
import shutil
import uuid
from typing import Sequence

from data_pipeline import prepare, schema
from data_pipeline.preprocess import PreprocessConfig
from data_pipeline.release import VolumeEntry, list_volumes

PROGRESS_DIR = ".beam_prepare"


@dataclasses.dataclass(frozen=True)
class ShardGroup:
    """Inputs of one planned shard: `index` in the plan, the entries in record order,
    and `plan_key`, a sha256 of the inputs and every setting that changes the bytes."""

    index: int
    entries: tuple[VolumeEntry, ...]
    plan_key: str

    @property
    def names(self) -> list[str]:
        return [entry.volume_name for entry in self.entries]


def inputs_per_shard(target_shape: Sequence[int], records_per_shard: int | None,
                     shard_size_mb: float) -> int:
    """`records_per_shard`, or as many target-size int16 volumes as fit in `shard_size_mb`
    MiB (at least one); every record has the target shape, so this is known up front."""
    if records_per_shard is not None:
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        return int(records_per_shard)
    if shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb must be > 0, got {shard_size_mb}")
    voxel_bytes = 2 * math.prod(int(size) for size in target_shape)
    return max(1, int(shard_size_mb * 2**20 // voxel_bytes))


def plan_groups(split: str, entries: Sequence[VolumeEntry], per_shard: int,
                config: PreprocessConfig) -> list[ShardGroup]:
    """Consecutive groups of `per_shard` entries (already in VolumeName order)."""
    groups = []
    for index in range(-(-len(entries) // per_shard)):
        members = tuple(entries[index * per_shard:(index + 1) * per_shard])
        description = json.dumps({
            "split": split, "preprocessing": config.to_dict(),
            "writer_options": prepare.WRITER_OPTIONS,
            "record_format_version": schema.RECORD_FORMAT_VERSION,
            "inputs": [[entry.volume_name, entry.path] for entry in members]},
            sort_keys=True)
        groups.append(ShardGroup(index, members,
                                 hashlib.sha256(description.encode()).hexdigest()))
    return groups


# ----------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomically(path: str, data: dict) -> None:
    tmp_path = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)


def _completion_path(out_dir: str, group: ShardGroup) -> str:
    return os.path.join(out_dir, PROGRESS_DIR, f"group-{group.index:05d}.json")


def write_group(group: ShardGroup, out_dir: str, split: str,
                config: PreprocessConfig) -> dict:
    """Prepares the inputs of `group` into one temporary shard; returns its completion.

    Holds one volume at a time.  An input that fails is recorded, not raised.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp_name = f"{split}-group-{group.index:05d}.{uuid.uuid4().hex}.array_record.tmp"
    tmp_path = os.path.join(out_dir, PROGRESS_DIR, tmp_name)
    written, failed = [], []
    writer = None
    try:
        for entry in group.entries:
            try:
                encoded = prepare.encode_volume(entry, config)
            except Exception as error:  # noqa: BLE001 - one bad input is a recorded failure
                failed.append({"volume_name": entry.volume_name, "path": entry.path,
                               "reason": f"{type(error).__name__}: {error}"})
                continue
            if writer is None:
                writer = ArrayRecordWriter(tmp_path, prepare.WRITER_OPTIONS)
            writer.write(encoded)
            written.append(entry.volume_name)
    finally:
        if writer is not None:
            writer.close()
    completion = {"plan_key": group.plan_key, "inputs": group.names, "names": written,
                  "failed": failed, "tmp_file": tmp_name if written else None,
                  "bytes": os.path.getsize(tmp_path) if written else 0,
                  "sha256": _sha256(tmp_path) if written else None}
    _write_json_atomically(_completion_path(out_dir, group), completion)
    return completion


def _completed(out_dir: str, group: ShardGroup) -> dict | None:
    """The group's completion if it is for the same plan and its file has its size."""
    try:
        with open(_completion_path(out_dir, group), encoding="utf-8") as handle:
            completion = json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if completion.get("plan_key") != group.plan_key or completion.get("inputs") != group.names:
        return None
    if completion["tmp_file"] is not None:
        # Size only: hashing every shard again here would read the whole dataset on
        # the launching machine; the workers hashed each file once, as written.
        path = os.path.join(out_dir, PROGRESS_DIR, os.path.basename(completion["tmp_file"]))
        if not os.path.isfile(path) or os.path.getsize(path) != completion["bytes"]:
            return None
    return completion


# ----------------------------------------------------------------------------------
# Launcher side
# ----------------------------------------------------------------------------------


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Creates `out_dir`; refuses (or, with `overwrite`, clears) a finished preparation.

    Files of an unfinished Beam run (no manifest yet) are kept for resuming.
    """
    os.makedirs(os.path.join(out_dir, PROGRESS_DIR), exist_ok=True)
    earlier = [path for pattern in (prepare.MANIFEST_NAME, "*.array_record", "*.tmp")
               for path in glob.glob(os.path.join(out_dir, pattern))]
    if earlier and not overwrite:
        raise FileExistsError(f"{out_dir} already holds prepared shards ({len(earlier)} "
                              f"files); choose another folder or pass overwrite=True "
                              f"(--overwrite)")
    for path in earlier:
        os.remove(path)
    if overwrite:
        shutil.rmtree(os.path.join(out_dir, PROGRESS_DIR))
        os.makedirs(os.path.join(out_dir, PROGRESS_DIR))


def _plan_path(out_dir: str) -> str:
    return os.path.join(out_dir, PROGRESS_DIR, "plan.json")


def save_plan(out_dir: str, groups: Sequence[ShardGroup]) -> tuple[str, str]:
    """Writes the groups to ``.beam_prepare/plan.json``; returns (its path, run id).

    The pipeline then carries only group indices: 50k entries with their metadata
    rows are tens of MB, more than a runner's job graph should hold.
    """
    path = _plan_path(out_dir)
    run = uuid.uuid4().hex
    _write_json_atomically(path, {"run": run, "groups": [
        {"index": g.index, "plan_key": g.plan_key,
         "entries": [dataclasses.asdict(e) for e in g.entries]} for g in groups]})
    return path, run


@functools.lru_cache(maxsize=2)
def _load_plan(path: str, run: str) -> dict[int, ShardGroup]:
    """The plan saved by run `run`, read once per worker process and run."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if data["run"] != run:
        raise RuntimeError(f"{path} was replaced by another run ({data['run']}, not {run}); "
                           f"two preparations write to the same folder")
    return {g["index"]: ShardGroup(g["index"], tuple(_entry(e) for e in g["entries"]),
                                   g["plan_key"]) for g in data["groups"]}


def _entry(data: dict) -> VolumeEntry:
    for key in ("spacing_zyx", "labels"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return VolumeEntry(**data)


def _write_planned_group(index: int, plan_path: str, run: str, out_dir: str, split: str,
                         config: PreprocessConfig) -> dict:
    return write_group(_load_plan(plan_path, run)[index], out_dir, split, config)


def run_pipeline(groups: Sequence[ShardGroup], out_dir: str, split: str,
                 config: PreprocessConfig, pipeline_args: Sequence[str]) -> None:
    """Writes every group with Beam (`pipeline_args` are Beam's PipelineOptions)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    plan_path, run = save_plan(out_dir, groups)
    options = PipelineOptions(list(pipeline_args))
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | "Plan" >> beam.Create([group.index for group in groups])
             # One group per element and a Reshuffle so runners spread the groups
             # over workers instead of fusing them with Create on one worker.
             | "Spread" >> beam.Reshuffle()
             | "WriteShards" >> beam.Map(_write_planned_group, plan_path=plan_path, run=run,
                                         out_dir=out_dir, split=split, config=config))


def prepare_split_beam(ctrate_root: str, split: str, out_dir: str,
                       config: PreprocessConfig = PreprocessConfig(), *,
                       records_per_shard: int | None = None, shard_size_mb: float = 256,
                       limit: int | None = None, volumes_dir: str | None = None,
                       overwrite: bool = False, workers: int | None = None,
                       pipeline_args: Sequence[str] = ()) -> prepare.Manifest:
    """`prepare.prepare_split` on Apache Beam; same arguments, same shards and manifest.

    `pipeline_args` are Beam pipeline options (``["--runner=DataflowRunner", ...]``);
    none runs the DirectRunner, with `workers` processes if given.  Returns the
    written `prepare.Manifest`.
    """
    try:
        import apache_beam  # noqa: F401
    except ImportError:
        raise ValueError("--runner beam needs Apache Beam: pip install "
                         "'ct-rate-jax[beam]'") from None
    pipeline_args = list(pipeline_args)
    if workers is not None and not any("direct_num_workers" in a for a in pipeline_args):
        pipeline_args += [f"--direct_num_workers={workers}",
                          "--direct_running_mode=multi_processing"]
    per_shard = inputs_per_shard(config.target_shape, records_per_shard, shard_size_mb)
    entries = list_volumes(ctrate_root, split, volumes_dir=volumes_dir)
    if limit is not None:
        entries = entries[:limit]
    _check_out_dir(out_dir, overwrite)
    groups = plan_groups(split, [entry for entry in entries if entry.ok], per_shard, config)
    todo = [group for group in groups if _completed(out_dir, group) is None]
    if todo:
        run_pipeline(todo, out_dir, split, config, pipeline_args)
    completions = []
    for group in groups:
        completion = _completed(out_dir, group)
        if completion is None:
            raise RuntimeError(f"the Beam pipeline finished without completing shard group "
                               f"{group.index} ({', '.join(group.names)}); rerun to retry it")
        completions.append(completion)
    return _finish(ctrate_root, split, out_dir, config, entries, completions)


def _finish(ctrate_root, split, out_dir, config, entries, completions) -> prepare.Manifest:
    """Renames the completed files to their shard names, writes the manifest last."""
    progress_dir = os.path.join(out_dir, PROGRESS_DIR)
    with_records = [c for c in completions if c["tmp_file"] is not None]
    shards = []
    for index, completion in enumerate(with_records):
        name = prepare.shard_file_name(split, index, len(with_records))
        os.replace(os.path.join(progress_dir, completion["tmp_file"]),
                   os.path.join(out_dir, name))
        shards.append(prepare.ShardInfo(file=name, num_records=len(completion["names"]),
                                        sha256=completion["sha256"],
                                        bytes=completion["bytes"],
                                        volume_names=completion["names"]))
    failed = [{"volume_name": e.volume_name, "path": e.path, "reason": e.error}
              for e in entries if not e.ok]
    failed += [failure for completion in completions for failure in completion["failed"]]
    manifest = prepare.Manifest(
        split=split, num_records=sum(shard.num_records for shard in shards), shards=shards,
        preprocessing={**config.to_dict(), "voxel_dtype": "int16",
                       "voxel_unit": "HU, rounded half to even", "layout": "DHW"},
        source_root=os.path.abspath(ctrate_root),
        failed=sorted(failed, key=lambda failure: failure["volume_name"]),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    manifest.save(out_dir)
    # Only now is the progress folder (other attempts' files included) not needed.
    shutil.rmtree(progress_dir, ignore_errors=True)
    return manifest
