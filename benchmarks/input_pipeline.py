r"""Input pipeline throughput: raw shard reads, the Grain pipeline, and the original's way.

  python -m benchmarks.input_pipeline [--volumes 16] [--shape 256,256,120]
      [--target-shape 120,240,240] [--compression zstd:3,none] [--workers 0,1,2]
      [--outputs float32,int16] [--read-threads 2] [--batch-size 2] [--epochs 2]
      [--repeats 3] [--baseline-volumes 4] [--no-stages] [--workdir DIR] [--keep]

On the same data in one run, each figure the median of `--repeats` measurements, for
shards written with each `--compression` (`prepare --compression`; the same records):

  raw read   every shard file read sequentially in 4 MiB blocks.  "cold": the files
             are evicted from the page cache first (fsync, then
             posix_fadvise(DONTNEED); no root needed), so this is the storage limit;
             "warm": read again straight after, from the page cache (memory speed).
  grain      `input_pipeline.make_train_dataset` (shuffle, decode, tokenise, batch)
             with 0..N Grain worker processes, after its first batch (start-up):
             volumes/s and MB/s of shard file bytes consumed, the same basis as the
             raw read.  Output "float32": the batch's `volume` normalised on the host;
             "int16": `normalise_on_device`, the batch carries the stored int16 voxels
             and the training step normalises them on the accelerator (what
             `experiments.pretrain` does; that device cost is not in these figures).
             "cold": the shard files are evicted before the iterator is made and
             every 20 ms while it runs, so every record comes from storage; "warm":
             from the page cache.
  stages     single-thread cost of each step per volume (wall and CPU ms): ArrayRecord
             read (incl. decompression), header decode, text, the float32 or int16
             batch; CPU ms x volumes/s = cores needed.
  original   what the PyTorch original does per sample in `__getitem__`
             (CT-CLIP `scripts/data.py`, `nii_img_to_tensor`): nibabel `get_fdata`
             (float64), HU, transpose, `torch.nn.functional.interpolate` (trilinear)
             to the target spacing, clip, / 1000, crop / pad; one process.

Inputs are the phantoms of `benchmarks.prepare` (0.7 mm in-plane, 1.0 mm slices),
prepared to `--target-shape` at 1.5 x 0.75 x 0.75 mm.  Prints markdown tables for
docs/performance.md, with the load average.  A measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time

import numpy as np

from benchmarks.prepare import SOURCE_SPACING_ZYX, write_phantom_nifti


def evict_from_page_cache(paths) -> None:
    """Drops the files' pages from the page cache (dirty pages are written first)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class KeepEvicting:
    """Context manager: evicts `paths` from the page cache every `interval_s` in a
    thread, so that a pipeline reading ahead still reads every record from storage."""

    def __init__(self, paths, interval_s: float = 0.02):
        self._paths, self._interval = list(paths), interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self._interval):
            evict_from_page_cache(self._paths)

    def __enter__(self):
        evict_from_page_cache(self._paths)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def raw_read_seconds(paths, cold: bool) -> float:
    """Seconds to read the files once; `cold`: evicted from the page cache first."""
    if cold:
        evict_from_page_cache(paths)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.read(1 << 22):
                pass
    return time.perf_counter() - start


def pipeline_seconds(pipeline_config, steps: int, paths, cold: bool) -> tuple[float, float]:
    """(wall, CPU of this process) seconds for `steps` batches after the first (start-up
    is not throughput).  The CPU time misses worker processes: it is the pipeline's
    whole cost only with 0 workers."""
    from data_pipeline import input_pipeline

    if cold:
        evict_from_page_cache(paths)
    else:
        raw_read_seconds(paths, cold=False)  # into the page cache
    with KeepEvicting(paths) if cold else contextlib.nullcontext():
        iterator = iter(input_pipeline.make_train_dataset(pipeline_config))
        next(iterator)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch = next(iterator)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert batch["volume" if "volume" in batch else "volume_hu"].dtype in (np.float32, np.int16)
    del iterator
    return seconds, cpu


def _drop(result) -> None:
    """Lets a batch go at once (a list of batches would keep them all in memory)."""
    del result


def stage_costs(pipeline_config, paths, batch_size: int,
                read_label: str) -> list[tuple[str, float, float]]:
    """(stage, wall ms, CPU ms) per volume, one thread, page cache warm."""
    import grain

    from data_pipeline import input_pipeline, schema

    source = grain.sources.ArrayRecordDataSource(paths)
    to_example = input_pipeline.RecordToExample(
        input_pipeline._text_encoder(pipeline_config), pipeline_config.text_sections,
        pipeline_config.hu_window)
    count = len(source) - len(source) % batch_size
    raw_read_seconds(paths, cold=False)
    stages = []

    def timed(name, function):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        stages.append((name, (time.perf_counter() - wall) * 1e3 / count,
                       (time.process_time() - cpu) * 1e3 / count))
        return result

    data = timed(f"ArrayRecord read ({read_label})", lambda: [source[i] for i in range(count)])
    records = timed("header decode + int16 view (schema.decode_record)",
                    lambda: [schema.decode_record(d) for d in data])
    timed("text: report_text + tokenise", lambda: [
        to_example.text_encoder.encode(input_pipeline.report_text(r)) for r in records])
    examples = [to_example(d) for d in data]
    groups = [examples[i:i + batch_size] for i in range(0, count, batch_size)]
    # Each batch is dropped before the next is made, as in the pipeline's steady state;
    # the two batch kinds alternate so that both see the same load.
    for _ in range(3):
        for name, normalise in (("float32 batch: normalise each volume into its row", True),
                                ("int16 batch: copy each volume into its row", False)):
            to_batch = input_pipeline.BatchExamples(pipeline_config.hu_window, normalise)
            timed(name, lambda: [_drop(to_batch(group)) for group in groups])
    by_name = {}
    for name, wall_ms, cpu_ms in stages[3:]:
        by_name.setdefault(name, []).append((wall_ms, cpu_ms))
    stages[3:] = [(f"{name} (median of 3)", statistics.median(w for w, _ in runs),
                   statistics.median(c for _, c in runs)) for name, runs in by_name.items()]
    return stages


def original_per_sample(path: str, config) -> np.ndarray:
    """The official per-sample preprocessing, float64 as there (torch if installed)."""
    import nibabel as nib

    from data_pipeline.preprocess import center_crop_or_pad, resampled_shape

    data = nib.load(path).get_fdata()  # float64, header scaling applied (HU)
    data = np.transpose(data, (2, 0, 1))
    new_shape = resampled_shape(data.shape, SOURCE_SPACING_ZYX, config.target_spacing_mm)
    try:
        import torch
        import torch.nn.functional as F

        tensor = torch.tensor(data).unsqueeze(0).unsqueeze(0)
        data = F.interpolate(tensor, size=new_shape, mode="trilinear",
                             align_corners=False)[0, 0].numpy()
    except ImportError:  # same interpolation in numpy
        from data_pipeline.preprocess import resample_trilinear

        data = resample_trilinear(data, SOURCE_SPACING_ZYX, config.target_spacing_mm)
    data = np.clip(data, -1000, 1000) / 1000.0
    return center_crop_or_pad(data, config.target_shape, pad_value=-1.0).astype(np.float32)


def _median_rate(measure, repeats: int, amount: float) -> float:
    return statistics.median(amount / measure() for _ in range(repeats))


def _median_rate_and_cpu(measure, repeats: int, volumes: int) -> tuple[float, float]:
    """(median volumes/s, median CPU ms per volume) of `measure() -> (wall, cpu)`."""
    runs = [measure() for _ in range(repeats)]
    return (statistics.median(volumes / wall for wall, _ in runs),
            statistics.median(cpu * 1e3 / volumes for _, cpu in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=16)
    parser.add_argument("--shape", default="256,256,120", help="H,W,D of the inputs")
    parser.add_argument("--target-shape", default="120,240,240", help="D,H,W of the records")
    parser.add_argument("--compression", default="zstd:3,none",
                        help="shard compressions to compare (prepare --compression)")
    parser.add_argument("--workers", default="0,1,2", help="Grain worker processes to try")
    parser.add_argument("--outputs", default="float32,int16",
                        help="batch volume: float32 (host-normalised) and/or int16 "
                             "(normalise_on_device)")
    parser.add_argument("--read-threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-volumes", type=int, default=4)
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage table")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    from absl import flags

    from data_pipeline import input_pipeline
    from data_pipeline.manifest import Manifest
    from data_pipeline.prepare import prepare_scans
    from data_pipeline.preprocess import PreprocessConfig
    from data_pipeline.tokenizer import train_wordpiece_tokenizer

    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
    shape = tuple(int(v) for v in args.shape.split(","))
    config = PreprocessConfig(target_shape=tuple(int(v) for v in args.target_shape.split(",")))
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_input_")
    scans_dir = os.path.join(workdir, "scans")
    os.makedirs(scans_dir, exist_ok=True)
    load_before = os.getloadavg()
    try:
        for index in range(args.volumes):
            path = os.path.join(scans_dir, f"phantom_{index:03d}.nii.gz")
            if not os.path.exists(path):
                write_phantom_nifti(path, shape, seed=index)
        tokenizer = os.path.join(workdir, "tokenizer.json")
        train_wordpiece_tokenizer(["no acute findings. lung nodule is present."] * 20, 64,
                                  tokenizer)
        voxel_mb = 2 * int(np.prod(config.target_shape)) / 1e6
        rows = []  # (compression, path, cold, volumes/s, MB per volume, CPU ms or None)
        stages = []
        raw_cold = {}
        records = steps = None
        for compression in args.compression.split(","):
            shard_dir = os.path.join(workdir, "shards_" + compression.replace(":", ""))
            prepare_scans(scans_dir, shard_dir, config, records_per_shard=4, progress=False,
                          compression=compression)
            manifest = Manifest.load(shard_dir)
            paths = manifest.shard_paths()
            records = manifest.num_records
            mb_per_volume = sum(shard.bytes for shard in manifest.shards) / records / 1e6
            for cold in (True, False):
                raw_read_seconds(paths, cold=False)  # the warm run reads a cached copy
                rate = _median_rate(lambda: raw_read_seconds(paths, cold), args.repeats,
                                    records)
                rows.append((compression, "raw sequential read of the shard files", cold,
                             rate, mb_per_volume, None))
            raw_cold[compression] = rows[-2][3]

            steps = args.epochs * (records // args.batch_size)
            volumes = steps * args.batch_size
            pipeline = None
            for output in args.outputs.split(","):
                for workers in [int(v) for v in args.workers.split(",")]:
                    pipeline = input_pipeline.PipelineConfig(
                        shard_dir=shard_dir, tokenizer_path=tokenizer,
                        global_batch_size=args.batch_size, max_text_length=32,
                        num_workers=workers, read_threads=args.read_threads,
                        normalise_on_device=output == "int16")
                    for cold in (True, False):
                        rate, cpu_ms = _median_rate_and_cpu(
                            lambda: pipeline_seconds(pipeline, steps, paths, cold),
                            args.repeats, volumes)
                        rows.append((compression, f"Grain, {output} batch, {workers} worker "
                                     f"processes", cold, rate, mb_per_volume,
                                     cpu_ms if workers == 0 else None))
            if not args.no_stages:
                stages += [(compression, *stage) for stage in stage_costs(
                    pipeline, paths, args.batch_size, compression)]

        scans = sorted(os.path.join(scans_dir, n) for n in os.listdir(scans_dir))
        baseline_paths = scans[:args.baseline_volumes]
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401 - imported before the clock starts, not timed
        start, cpu = time.perf_counter(), time.process_time()
        for path in baseline_paths:
            original_per_sample(path, config)
        baseline = len(baseline_paths) / (time.perf_counter() - start)
        baseline_cpu_ms = (time.process_time() - cpu) * 1e3 / len(baseline_paths)
        load_after = os.getloadavg()
        allocator = {k: v for k, v in os.environ.items()
                     if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}

        print(f"{records} records of {config.target_shape} int16 ({voxel_mb:.1f} MB of "
              f"voxels) from {shape} inputs; batch {args.batch_size}, {steps} steps per "
              f"pipeline measurement; {args.read_threads} read threads; median of "
              f"{args.repeats} repeats")
        print()
        print("| shards | path | page cache | volumes/s | MB/s of shard file "
              "| vs raw cold read (same shards) | vs original | CPU ms / volume "
              "| vs original, CPU |")
        print("|---|---|---|---|---|---|---|---|---|")
        for compression, name, cold, rate, mb, cpu_ms in rows:
            cpu = (f"{cpu_ms:.1f} | {baseline_cpu_ms / cpu_ms:.1f}x" if cpu_ms else "- | -")
            print(f"| {compression} ({mb:.2f} MB/volume) | {name} | "
                  f"{'cold' if cold else 'warm'} | {rate:.2f} | {rate * mb:.1f} "
                  f"| {rate / raw_cold[compression]:.1%} | {rate / baseline:.1f}x | {cpu} |")
        print(f"| NIfTI | original: load NIfTI, resample, normalise per sample (1 process) "
              f"| - | {baseline:.2f} | - | - | 1.0x | {baseline_cpu_ms:.0f} | 1.0x |")
        if stages:
            print()
            print("| shards | stage (1 thread, warm page cache) | wall ms / volume "
                  "| CPU ms / volume |")
            print("|---|---|---|---|")
            for compression, name, wall_ms, cpu_ms in stages:
                print(f"| {compression} | {name} | {wall_ms:.1f} | {cpu_ms:.1f} |")
        print()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; "
              f"python {platform.python_version()}; load average (1, 5, 15 min) "
              f"before {tuple(round(v, 1) for v in load_before)}, "
              f"after {tuple(round(v, 1) for v in load_after)}; allocator: "
              f"{allocator or 'glibc defaults'}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
