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

Only the writing of the shards differs from the local runner.  Listing the inputs
(`release.split_inputs`, with the ``no_chest_*.txt`` exclusions), the plan
(`shard_plan.plan_shards`: shard i and its file name), the completion records,
resuming and the manifest are `shard_plan.run_plan`'s, as for `prepare_split`; Beam
is its `ShardWriter`.  So a Beam run and a local run of the same command write
identically named, byte-identical shards and equal manifests (but for ``created``),
and either can resume what the other left unfinished.  The pipeline is

    Create(shard indices) | Reshuffle | Map(_write_planned_shard)

(the planned shards are saved in ``.prepare_progress/beam-plan-<run>.json``; the
pipeline carries only their indices).  Each element writes its shard as the local
runner does (`shard_plan.write_shard`, one volume at a time with
`prepare.encode_in_order`) and then records its completion
(`ProgressStore.mark_complete`).  Beam may run a bundle more than once (retries,
speculative execution): every attempt writes its own temporary file (in the
progress folder) before renaming it to the shard's name, and records are written
through their own temporary names too; the attempts write identical bytes, so the
shard file and its record agree whichever lands last.

After the pipeline the launcher checks that every shard has its completion record
and that the file has the recorded size (not re-hashed: that would read the whole
dataset on the launching machine), then writes ``manifest.json`` last.  A rerun of
the same command after a crash or kill runs only the shards without such a record.

Paths are ordinary file paths: on a cluster, the release and `--out` must be on
a file system that every worker mounts (NFS, Filestore, a GCS FUSE mount), since
nibabel and ArrayRecord read and write local paths.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import uuid
from typing import Sequence

from data_pipeline import prepare
from data_pipeline.manifest import TMP_SUFFIX, write_atomically
from data_pipeline.preprocess import PreprocessConfig
from data_pipeline.release import VolumeEntry
from data_pipeline.shard_plan import CompletedShard, PlannedShard, ProgressStore, write_shard


def save_plan(store: ProgressStore, shards: Sequence[PlannedShard]) -> str:
    """Writes `shards` to ``.prepare_progress/beam-plan-<run>.json``; returns its path.

    The pipeline then carries only shard indices: 50k entries with their metadata
    rows are tens of MB, more than a runner's job graph should hold.  A new name
    per run, so a worker never reads another run's plan.
    """
    path = os.path.join(store.directory, f"beam-plan-{uuid.uuid4().hex}.json")
    write_atomically(path, json.dumps([
        {"index": shard.index, "file": shard.file,
         "inputs": [dataclasses.asdict(entry) for entry in shard.inputs]}
        for shard in shards], ensure_ascii=False))
    return path


@functools.lru_cache(maxsize=2)
def _load_plan(path: str) -> dict[int, PlannedShard]:
    """The planned shards saved at `path`, read once per worker process."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return {shard["index"]: PlannedShard(shard["index"], shard["file"],
                                         tuple(_entry(entry) for entry in shard["inputs"]))
            for shard in data}


def _entry(data: dict) -> VolumeEntry:
    for key in ("spacing_zyx", "labels"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return VolumeEntry(**data)


def _write_planned_shard(index: int, plan_path: str, out_dir: str, fingerprint: str,
                         config: PreprocessConfig, writer_options: str) -> None:
    """One element of the pipeline: writes shard `index` and records its completion.

    Holds one volume at a time; an input that fails is recorded, not raised.
    """
    shard = _load_plan(plan_path)[index]
    store = ProgressStore(out_dir, fingerprint, writer_options)
    # A temporary file per attempt: two attempts of one shard may run at once.
    tmp_path = os.path.join(store.directory, f"{shard.file}.{uuid.uuid4().hex}.tmp")
    done = write_shard(out_dir, shard, prepare.encode_in_order(shard.inputs, config, 1),
                       tmp_path=tmp_path, writer_options=writer_options)
    store.mark_complete(shard, done)


def run_pipeline(store: ProgressStore, todo: Sequence[PlannedShard], config: PreprocessConfig,
                 pipeline_args: Sequence[str]) -> None:
    """Writes the `todo` shards with Beam (`pipeline_args` are Beam's PipelineOptions)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    plan_path = save_plan(store, todo)
    with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as pipeline:
        _ = (pipeline
             | "Plan" >> beam.Create([shard.index for shard in todo])
             # One shard per element and a Reshuffle so runners spread the shards
             # over workers instead of fusing them with Create on one worker.
             | "Spread" >> beam.Reshuffle()
             | "WriteShards" >> beam.Map(_write_planned_shard, plan_path=plan_path,
                                         out_dir=store.out_dir,
                                         fingerprint=store.fingerprint, config=config,
                                         writer_options=store.writer_options))


def _write_with_beam(store: ProgressStore, shards: list[PlannedShard],
                     todo: list[PlannedShard], *, config: PreprocessConfig,
                     pipeline_args: Sequence[str]) -> dict[int, CompletedShard]:
    """The Beam `shard_plan.ShardWriter`: runs the pipeline, then reads the completions."""
    if todo:
        for shard in todo:  # what a local run killed while writing it leaves
            if os.path.exists(os.path.join(store.out_dir, shard.file + TMP_SUFFIX)):
                os.remove(os.path.join(store.out_dir, shard.file + TMP_SUFFIX))
        run_pipeline(store, todo, config, pipeline_args)
    done = {}
    for shard in todo:
        done[shard.index] = store.completed(shard, verify_sha256=False)
        if done[shard.index] is None:
            raise RuntimeError(f"the Beam pipeline finished without completing {shard.file} "
                               f"({', '.join(shard.input_names)}); rerun to retry it")
    return done


def prepare_split_beam(ctrate_root: str, split: str, out_dir: str,
                       config: PreprocessConfig = PreprocessConfig(), *,
                       records_per_shard: int | None = None, shard_size_mb: float = 256,
                       limit: int | None = None, volumes_dir: str | None = None,
                       overwrite: bool = False, workers: int | None = None,
                       pipeline_args: Sequence[str] = (),
                       compression: str = prepare.DEFAULT_COMPRESSION) -> prepare.Manifest:
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
    # Already complete shards are checked by size only (see the module docstring).
    return prepare.prepare_release_split(
        ctrate_root, split, out_dir, config, records_per_shard=records_per_shard,
        shard_size_mb=shard_size_mb, limit=limit, volumes_dir=volumes_dir,
        overwrite=overwrite, verify_sha256=False, compression=compression,
        write_shards=functools.partial(_write_with_beam, config=config,
                                       pipeline_args=pipeline_args))
